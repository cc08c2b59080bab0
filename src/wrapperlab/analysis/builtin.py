"""The analyses that ship with wrapperlab, registered under the names the CLI, the experiment specs and the report
use: probe, prune, attention, attention_signature, revival, verdict, feature_probe, story_loss, and the measures of
a model pair on a capability file: weight_diff, patching, direction (probe, prune, revival and verdict have a pair
form too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from wrapperlab.analysis import capability as pair_tools
from wrapperlab.analysis.attention import attention, attention_signature
from wrapperlab.analysis.common import AnalysisError, Result, Settings
from wrapperlab.analysis.direction import DirectionSettings, direction
from wrapperlab.analysis.feature_probes import FeatureProbeRunSettings, feature_probe_run
from wrapperlab.analysis.patching import PatchSettings, patching
from wrapperlab.analysis.probing import ProbeSettings, probe, probe_run
from wrapperlab.analysis.pruning import PruneSettings, prune
from wrapperlab.analysis.registry import Analysis, Context, register
from wrapperlab.analysis.revival import RevivalSettings, revival, revival_runs
from wrapperlab.analysis.story_loss import StoryLossSettings, story_loss_run
from wrapperlab.analysis.verdict import Thresholds, verdict
from wrapperlab.analysis.weight_diff import WeightDiffSettings, weight_diff


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
    on_pair=lambda pair, s, ctx: _probe_pair(pair, s), pair_settings=pair_tools.PairSettings,
    needs=("residual",), cost=0.6, run_defaults=_probe_defaults, run_settings=("preset",),
    description="linear probes of O_PT and O_FT per block, with the pretrained and a random-init model as controls "
                "(paper §4.2, Fig. 8)"))


def _probe_pair(pair, s) -> Result:
    """Probes of the fine-tuned model, the base model and the control (given, else random-init), as the verdict
    reads them."""
    from wrapperlab.models.registry import random_like

    f = pair.finetuned.model
    ctl = pair.control.model if pair.control is not None else random_like(f, s.seed)
    subjects = [("finetune", f)] + ([("pretrained", pair.base.model)] if pair.base else []) + [("random-init", ctl)]
    return pair_tools.probe_pair(subjects, pair.capability, s)


# ------------------------------------------------------------------------------------------------ prune
def _prune_run(run: Path, s: PruneSettings, ctx: Context) -> Result:
    cfg, task, model, _ = _load(run, ctx)
    return prune(model, task, family=cfg.eval_family, settings=s)


def _prune_defaults(cfg, given: dict) -> dict:
    given.setdefault("c_tests", tuple(cfg.eval.c_test))
    return given


register(Analysis(
    "prune", PruneSettings, on_run=_prune_run, on_model=lambda model, task, s: prune(model, task, settings=s),
    on_pair=lambda pair, s, ctx: pair_tools.prune_pair(pair.finetuned.model, pair.capability, s),
    pair_settings=pair_tools.PairSettings,
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


def _revival_pair(pair, s, ctx: Context) -> Result:
    if ctx.out is None:
        raise AnalysisError("revival on a pair trains: give the directory its relearning runs go to")
    subjects = [("reft", pair.finetuned)] + ([("scr+ft", pair.control)] if pair.control is not None else [])
    return pair_tools.relearn_pair(subjects, pair.capability, ctx.out, pair.need_base("revival").model, s,
                                   progress=ctx.progress, log=ctx.log)


register(Analysis(
    "revival", RevivalSettings, on_run=_revival_run, on_pair=_revival_pair, pair_settings=pair_tools.RelearnSettings,
    runs=lambda cfg, s: revival_runs(cfg, s)[0], stages=("finetune",),
    description="reverse fine-tuning against the Scr.+FT and Scr. baselines: steps to revive (paper §4.4, Fig. 9)"))


# ------------------------------------------------------------------------------------------------ verdict
def _verdict_run(run: Path, th: Thresholds, ctx: Context) -> Result:
    from wrapperlab.training import checkpoint as ck

    return verdict(ck.read_sidecar(run), probe=ctx.inputs.get("probe"), prune=ctx.inputs.get("prune"),
                   revival=ctx.inputs.get("revival"), thresholds=th)


def _verdict_pair(pair, th: Thresholds, ctx: Context) -> Result:
    """The pair verdict on the evidence in ``ctx.inputs`` (probe, prune, revival; each computed with default
    settings when absent, except revival, which trains and is left out unless given)."""
    res, _ = pair_tools.verdict_pair(pair.need_base("verdict").model, pair.finetuned.model, pair.capability,
                                     control=pair.control.model if pair.control else None, thresholds=th,
                                     probe=ctx.inputs.get("probe"), prune=ctx.inputs.get("prune"),
                                     revival=ctx.inputs.get("revival"), log=ctx.log)
    return res


register(Analysis(
    "verdict", Thresholds, on_run=_verdict_run, on_pair=_verdict_pair, inputs=("probe", "prune", "revival"),
    stages=("finetune",),
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


# ------------------------------------------------------------------------------------------------ pair measures
def _two(pair, name: str) -> tuple:
    return pair.need_base(name).model, pair.finetuned.model


register(Analysis(
    "weight_diff", WeightDiffSettings, on_pair=lambda pair, s, ctx: weight_diff(*_two(pair, "weight_diff"), s),
    needs=("matrices",),
    description="structure of ΔW = fine-tuned − base per matrix: relative size, effective rank, rank for 90 % of "
                "the change, share in the top-k rows and columns, share per block"))

register(Analysis(
    "patching", PatchSettings,
    on_pair=lambda pair, s, ctx: patching(*_two(pair, "patching"), pair.capability, s), needs=("residual",),
    description="cross-model activation patching: the fine-tuned model with one block's write taken from the base "
                "model, block by block; which block restores the capability"))

register(Analysis(
    "direction", DirectionSettings,
    on_pair=lambda pair, s, ctx: direction(*_two(pair, "direction"), pair.capability, s), needs=("residual",),
    description="difference-in-means direction (fine-tuned − base residual) ablated per boundary: does removing "
                "one direction restore the capability"))
