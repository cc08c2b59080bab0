"""The analyses that ship with wrapperlab, registered under the names the CLI, the experiment specs and the report
use: probe, prune, attention, attention_signature, revival, verdict, feature_probe, story_loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from wrapperlab.analysis.attention import attention, attention_signature
from wrapperlab.analysis.common import AnalysisError, Result, Settings
from wrapperlab.analysis.feature_probes import FeatureProbeRunSettings, feature_probe_run
from wrapperlab.analysis.probing import ProbeSettings, probe, probe_run
from wrapperlab.analysis.pruning import PruneSettings, prune
from wrapperlab.analysis.registry import Analysis, Context, register
from wrapperlab.analysis.revival import RevivalSettings, revival, revival_runs
from wrapperlab.analysis.story_loss import StoryLossSettings, story_loss_run
from wrapperlab.analysis.verdict import Thresholds, verdict


def _load(run: Path, ctx: Context):
    from wrapperlab.analysis.evaluate import load_run

    return load_run(run, ctx.device)


# ------------------------------------------------------------------------------------------------ probe
def _probe_defaults(cfg, given: dict) -> dict:
    """The preset's probe recipe (the paper's for ``paper`` runs), then the given settings."""
    base = ProbeSettings.for_preset(given.pop("preset", cfg.preset)).model_dump()
    return {**base, **given}


register(Analysis(
    "probe", ProbeSettings,
    on_run=lambda run, s, ctx: probe_run(run, settings=s, device=ctx.device),
    on_model=lambda model, task, s: probe(model, task, settings=s),
    needs=("residual",), cost=0.6, run_defaults=_probe_defaults, run_settings=("preset",),
    description="linear probes of O_PT and O_FT per block, with the pretrained and a random-init model as controls "
                "(paper §4.2, Fig. 8)"))


# ------------------------------------------------------------------------------------------------ prune
def _prune_run(run: Path, s: PruneSettings, ctx: Context) -> Result:
    cfg, task, model, _ = _load(run, ctx)
    return prune(model, task, family=cfg.eval_family, settings=s)


def _prune_defaults(cfg, given: dict) -> dict:
    given.setdefault("c_tests", tuple(cfg.eval.c_test))
    return given


register(Analysis(
    "prune", PruneSettings, on_run=_prune_run, on_model=lambda model, task, s: prune(model, task, settings=s),
    needs=("matrices",), cost=0.3, run_defaults=_prune_defaults,
    description="single-step grad·w pruning on the pretraining-task loss: accuracy against K (paper §4.1, Fig. 7)"))


# ------------------------------------------------------------------------------------------------ attention
class AttentionSettings(Settings):
    family: str | None = Field(None, description="task family of the inputs (default: the run's)")
    operand: str | None = Field(None, description="operand of the inputs (default: O_PT)")
    c_test: float = Field(0.0, ge=0, le=1)
    average: int = Field(0, ge=0, description="average over this many samples (0 = one example)")
    index: int = Field(0, ge=0, description="which sample when not averaging")
    layers: tuple[int, ...] | None = None
    seed: int = Field(0, ge=0)


def attention_inputs(task, s: AttentionSettings, family: str | None = None):
    """The sampled input(s) the attention maps are drawn for (``family`` when the settings name none, else the
    task's default; operand O_PT), truncated to what the model reads, and the batch."""
    from wrapperlab.tasks.registry import get_task_kind

    fam = s.family or family or get_task_kind(task.config.kind).default_family(task.config)
    op = s.operand or task.config.o_pt
    n = s.average or s.index + 1
    try:
        b = task.sample(n, np.random.default_rng([s.seed, 11]), family=fam, operand=op, c=s.c_test)
    except (KeyError, ValueError) as e:
        raise AnalysisError(f"family/operand: {e}") from None
    return task.answer_inputs(b.tokens if s.average else b.tokens[s.index:s.index + 1]), b


def _attention_model(model, task, s: AttentionSettings, family: str | None = None) -> Result:
    toks, b = attention_inputs(task, s, family)
    res = attention(model, toks, vocab=task.vocab, query=task.readout, layers=list(s.layers) if s.layers else None)
    res.meta |= {"family": b.family[0], "operand": b.operand[0], "settings": s.to_dict()}
    if not s.average:
        res.meta["answer"] = task.output_names[int(b.answer[s.index])]
    return res


def _attention_run(run: Path, s: AttentionSettings, ctx: Context) -> Result:
    cfg, task, model, _ = _load(run, ctx)
    return _attention_model(model, task, s, cfg.eval_family)


register(Analysis(
    "attention", AttentionSettings, on_run=_attention_run, on_model=_attention_model, needs=("attention",),
    cost=0.05,
    description="attention maps per block and head, and where the readout query puts its weight (paper Fig. 10)"))


class SignatureSettings(Settings):
    n: int = Field(200, ge=1)
    seed: int = Field(5, ge=0)


register(Analysis(
    "attention_signature", SignatureSettings,
    on_run=lambda run, s, ctx: attention_signature(run, n=s.n, seed=s.seed), needs=("attention",), cost=0.05,
    description="the Tracr attention facts: Counter's block-1 mass on a and b, Max-identifier's sorting head "
                "(paper Fig. 10, App. G)"))


# ------------------------------------------------------------------------------------------------ revival
def _revival_run(run: Path, s: RevivalSettings, ctx: Context) -> Result:
    return revival(run, ctx.out or run / "analysis" / "revival", settings=s, progress=ctx.progress, log=ctx.log,
                   runs_root=ctx.runs_root)


register(Analysis(
    "revival", RevivalSettings, on_run=_revival_run, runs=lambda cfg, s: revival_runs(cfg, s)[0], stages=("finetune",),
    description="reverse fine-tuning against the Scr.+FT and Scr. baselines: steps to revive (paper §4.4, Fig. 9)"))


# ------------------------------------------------------------------------------------------------ verdict
def _verdict_run(run: Path, th: Thresholds, ctx: Context) -> Result:
    from wrapperlab.training import checkpoint as ck

    return verdict(ck.read_sidecar(run), probe=ctx.inputs.get("probe"), prune=ctx.inputs.get("prune"),
                   revival=ctx.inputs.get("revival"), thresholds=th)


register(Analysis(
    "verdict", Thresholds, on_run=_verdict_run, inputs=("probe", "prune", "revival"), stages=("finetune",),
    description="wrapper / deletion / amplification / unchanged, with every piece of evidence and its threshold"))


# ------------------------------------------------------------------------------------------------ feature probes
register(Analysis(
    "feature_probe", FeatureProbeRunSettings,
    on_run=lambda run, s, ctx: feature_probe_run(run, settings=s, device=ctx.device), needs=("residual",),
    cost=0.3, description="per-block multi-label probes of story features (paper Fig. 11a)"))

register(Analysis(
    "story_loss", StoryLossSettings,
    on_run=lambda run, s, ctx: story_loss_run(run, settings=s, device=ctx.device),
    cost=0.05, description="held-out LM loss of a story model split into instruction, the feature's sentence and "
                           "the rest of the story, on texts with and without the feature (paper Figs. 11b/33)"))
