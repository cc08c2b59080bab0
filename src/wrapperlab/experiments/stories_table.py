"""The TinyStories protocol end to end: the Table 1 and Fig. 11a analogs (paper §5.2, App. F).

One call trains (or reuses) every run of the protocol under ``OUT``:

- ``pretrain`` ("present in pretraining") and ``control`` ("not in pretraining": the pretraining split without
  Twist), sharing one tokenizer (App. F.1);
- ``delete-{F,F+R,F+MM}-{M,S}``: deletion fine-tuning of ``pretrain`` at η_M and η_S, constant LR (App. F.1);
- ``recover-…`` for each deleted model and ``recover-control``: reFT on the recovery set (Twist stories) at one LR
  for every model, evaluated at the Table 1 columns (App. F.1, Table 1);

then probes the Twist feature per block in pretrain, control and the six deleted models (App. F.2, Fig. 11a; on the
paper's last 10 positions and, as a control, over the whole story), splits each final model's held-out loss into
instruction, Twist sentence and the rest of the story (``analysis/story_loss.py``), and returns the rows of the
tables beside the paper's values. A run directory is an ordinary story run
(a story task trained by the one stage loop): a finished one is reused, an interrupted one resumes exactly.

Presets (choices the paper does not make for us, written down here):

- ``paper``: App. F.1's values: d 768, 12 layers, 12 heads, context 1024, BPE 8192, batch 128; pretraining 30,000 steps
  at 1e-3 (warmup 1000, cosine); deletion 4000 steps at η_M = 1e-4, η_S = 1e-5; reFT 4000 steps at 1e-5, columns
  0 / 30 / 270 / 3000 (the authors' notebook reads "300" at 270); ≤ 350 new tokens. Needs real shards (``--data``)
  and a judge (``--judge``), and a GPU.
- ``cpu``: ≤ 30 minutes on 2 cores with procedural stories. The model of ``benchmarks/stories_learnability.py``
  (d 128, 4 layers, context 256, BPE 512, batch 32) pretrains 800 steps at 2e-3 on 24,000 stories in which Twist is
  drawn with probability 0.5 (the other features 0.25): measured, 1000 steps at 1e-3 with Twist at 0.25 gave a model
  that writes a twist in only 6 of 16 stories asked for one, 800 at 2e-3 gave 10 of 16, and Twist at 0.5 learns
  faster still (docs/stories.md). The capability has to be there before deleting it means anything. It sees ~1/400
  of the paper's deletion tokens (150 steps of 8K tokens vs 4000 of 131K), so the LR grid moves one decade up: η_M =
  1e-3, η_S = 1e-4 (the authors' sweep was {1e-3, 1e-4, 1e-5}; the paper reports the lower two), and reFT runs at
  η_S = 1e-4, as the paper's reFT LR equals its η_S. The columns 0 / 10 / 30 / 100 stand in for 0 / 30 / 300 / 3000:
  log spaced like the paper's, the last near the run's end. ≤ 250 new tokens (procedural stories are ~140 tokens).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from wrapperlab.experiments.spec import AnalysisSpec, ExperimentSpec, RunGroup

KINDS = ("F", "F+R", "F+MM")
ETAS = ("M", "S")
POOLS = ("last", "story")  # the paper's probe input (the last 10 positions), and the whole story as a control

# Table 1 (paper §5.2): percent of reFT generations with a twist at reFT iteration 0 / 30 / 300 / 3000
PAPER_TABLE1 = {
    ("F", "M"): (44, 81, 81, 82), ("F+R", "M"): (12, 56, 69, 75), ("F+MM", "M"): (31, 88, 50, 75),
    ("F", "S"): (69, 88, 75, 94), ("F+R", "S"): (12, 44, 81, 81), ("F+MM", "S"): (50, 81, 62, 81),
    ("control", ""): (12, 31, 44, 81),
}
PAPER_COLUMNS = (0, 30, 300, 3000)
# Fig. 11a / 35 (paper §5.2, App. F.2), qualitative: the captions give no per-layer numbers
PAPER_PROBE_CLAIM = ("Twist probe accuracy (y-range 0.84-0.95) is barely reduced relative to the pretrained model "
                     "at η_S, a bit more at η_M, and both stay far above the not-in-pretraining model")


@dataclass(frozen=True)
class StoriesPreset:
    name: str
    model: dict
    vocab_size: int
    batch_size: int
    pretrain_steps: int
    pretrain_lr: float
    warmup_frac: float
    delete_steps: int
    etas: dict  # "M" / "S" -> deletion LR
    recover_steps: int
    recover_lr: float
    columns: tuple[int, ...]  # reFT steps of the Table 1 columns
    max_new_tokens: int
    precision: str = "fp32"
    eval_n: int = 16
    probe_train: int = 1500
    probe_test: int = 500
    probe_iters: int = 2000
    data: dict = field(default_factory=dict)  # procedural shards: shards, per_shard, feature_rate, seed


PRESETS = {
    "cpu": StoriesPreset("cpu", {"d_model": 128, "n_layer": 4, "n_head": 4, "seq_len": 256}, 512, 32,
                         800, 2e-3, 0.05, 150, {"M": 1e-3, "S": 1e-4}, 100, 1e-4, (0, 10, 30, 100), 250,
                         data={"shards": 12, "per_shard": 2000, "seed": 0,
                               "feature_rate": {"Twist": 0.5, "Foreshadowing": 0.25, "Dialogue": 0.25,
                                                "BadEnding": 0.25, "MoralValue": 0.25, "Conflict": 0.25}}),
    "paper": StoriesPreset("paper", {"d_model": 768, "n_layer": 12, "n_head": 12, "seq_len": 1024}, 8192, 128,
                           30000, 1e-3, 1000 / 30000, 4000, {"M": 1e-4, "S": 1e-5}, 4000, 1e-5, (0, 30, 270, 3000),
                           350, precision="bf16", probe_train=10000, probe_test=2000),
}


def preset(name: str, **changes) -> StoriesPreset:
    from wrapperlab.training.config import ConfigError

    if name not in PRESETS:
        raise ConfigError(f"preset: {name!r} is not one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **changes) if changes else PRESETS[name]


def check_preset(p: StoriesPreset) -> StoriesPreset:
    """One-line ``ConfigError`` for a preset that cannot run (after key=value changes)."""
    from wrapperlab.training.config import ConfigError

    for name in ("pretrain_steps", "delete_steps", "recover_steps", "batch_size", "max_new_tokens", "eval_n",
                 "probe_train", "probe_test", "probe_iters"):
        v = getattr(p, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name}: must be an integer >= 1 (got {v!r})")
    for name, v in (("pretrain_lr", p.pretrain_lr), ("recover_lr", p.recover_lr), ("eta_M", p.etas["M"]),
                    ("eta_S", p.etas["S"])):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise ConfigError(f"{name}: must be a number > 0 (got {v!r})")
    cols = p.columns
    if (not isinstance(cols, tuple) or len(cols) != len(PAPER_COLUMNS) or cols[0] != 0
            or any(not isinstance(c, int) for c in cols) or list(cols) != sorted(set(cols))
            or cols[-1] > p.recover_steps):
        raise ConfigError(f"columns: need {len(PAPER_COLUMNS)} increasing reFT steps from 0 to at most "
                          f"recover_steps={p.recover_steps}, like the paper's {list(PAPER_COLUMNS)} (got {cols!r})")
    return p


def protocol_spec(p: StoriesPreset, data: str | Path, judge: str | None = None,
                  seeds: tuple[int, ...] = (0,)) -> ExperimentSpec:
    """The protocol as an experiment spec of the ``stories`` preset: pretrain and the control, deletion of each
    kind at η_M and η_S below pretrain, reFT below every deletion and below the control (a child inherits its
    parent's model, tokenizer, data and seed), Fig. 11a's probes on pretrain, the control and the deleted
    models (both poolings), and the loss split of pretrain and every reFT run; once per training seed (the spec's
    ``seeds``)."""
    every = {"train.precision": p.precision, "batch_size": p.batch_size}
    root = {**every, "task.data": str(data), "task.vocab_size": p.vocab_size, "task.seq_len": p.model["seq_len"],
            "task.max_new_tokens": p.max_new_tokens, "task.eval_n": p.eval_n, "task.judge": judge,
            **{f"model.{k}": v for k, v in p.model.items() if k != "seq_len"},
            "steps": p.pretrain_steps, "lr": p.pretrain_lr, "train.warmup_frac": p.warmup_frac,
            "eval.every": p.pretrain_steps}
    rec = {**every, "steps": p.recover_steps, "lr": p.recover_lr, "task.dataset": "recovery",
           "eval.every": p.recover_steps, "eval.at": [c for c in p.columns if 0 < c < p.recover_steps]}
    runs = {
        "pretrain": RunGroup(stage="pretrain", preset="stories", set={**root, "task.dataset": "all"}),
        "control": RunGroup(stage="pretrain", preset="stories", set={**root, "task.dataset": "filter"}),
        "delete": RunGroup(stage="finetune", preset="stories", parent="pretrain",
                           set={**every, "steps": p.delete_steps, "eval.every": p.delete_steps},
                           grid={"task.dataset": list(KINDS), "lr": [p.etas[e] for e in ETAS]}),
        "recover": RunGroup(stage="reft", preset="stories", parent="delete", set=rec),
        "recover_control": RunGroup(stage="reft", preset="stories", parent="control", set=rec),
    }
    probe = {"n_train": p.probe_train, "n_test": p.probe_test, "iters": p.probe_iters, "seed": seeds[0]}
    # the paper's pooling keeps its settings (and analysis ids) as written before pooling was a setting
    analyses = [AnalysisSpec(tool="feature_probe", on=g, settings=probe if pool == "last" else {**probe, "pool": pool})
                for pool in POOLS for g in ("pretrain", "control", "delete")]
    analyses += [AnalysisSpec(tool="story_loss", on=g, settings={"seed": seeds[0]})
                 for g in ("pretrain", "recover", "recover_control")]
    return ExperimentSpec(name=f"stories-{p.name}", description="the TinyStories protocol (paper App. F; Table 1, "
                          "Fig. 11a)", runs=runs, seeds=list(seeds), analyses=analyses)


def protocol_runs(p: StoriesPreset, plan, seed: int) -> dict[str, Path]:
    """The run directory of every run of the protocol under training seed ``seed`` by its name in the tables
    (pretrain, control, delete-F-M, ..., recover-F-M, ..., recover-control)."""
    out: dict[str, Path] = {}
    for node in plan.runs():
        if node.side["config"]["train"]["seed"] != seed:
            continue
        if node.group in ("pretrain", "control", "recover_control"):
            out[node.group.replace("_", "-")] = Path(node.run_dir)
        elif node.group in ("delete", "recover"):
            eta = next(e for e in ETAS if abs(node.point["train.lr"] - p.etas[e]) < 1e-12)
            out[f"{node.group}-{node.point['task.dataset']}-{eta}"] = Path(node.run_dir)
    return out


PROBED = ("pretrain", "control") + tuple(f"delete-{k}-{e}" for e in ETAS for k in KINDS)


def _results(plan, runs: dict[str, Path], tool: str, defaults: dict | None = None, **settings) -> dict[str, Path]:
    """The planned ``tool`` result of each named run, among the analyses with these settings (a setting the spec
    leaves out reads as its value in ``defaults``)."""
    base = defaults or {}
    by_dir = {Path(n.run_dir): Path(n.payload["result"]) for n in plan.analyses(tool)
              if all(n.payload["settings"].get(k, base.get(k)) == v for k, v in settings.items())}
    return {name: by_dir[d] for name, d in runs.items() if d in by_dir}


# ------------------------------------------------------------------------------------------------- tables


def _metrics(runs: dict[str, Path], name: str) -> list[dict]:
    from wrapperlab.training import checkpoint as ck

    return ck.read_sidecar(runs[name]).get("metrics", [])


def _at(metrics: list[dict], step: int, key: str):
    hit = [m for m in metrics if m["step"] == step]
    return hit[-1][key] if hit else None


def table1_rows(p: StoriesPreset, runs: dict[str, Path]) -> list[dict]:
    """One row per deleted model and the control: the twist rate and held-out loss at each reFT column, the
    pretrained and post-deletion values, and the paper's Table 1 row."""
    out = runs
    pt = _metrics(out, "pretrain")[-1]
    rows = []
    for eta in ETAS:
        for kind in KINDS:
            rows.append(_row(out, p, f"{kind} (η_{eta})", f"recover-{kind}-{eta}", PAPER_TABLE1[(kind, eta)],
                             pt, _metrics(out, f"delete-{kind}-{eta}")[-1], p.etas[eta]))
    rows.append(_row(out, p, "not in PT (control)", "recover-control", PAPER_TABLE1[("control", "")], pt,
                     _metrics(out, "control")[-1], None))
    return rows


def _row(out: dict[str, Path], p: StoriesPreset, label: str, name: str, paper: tuple, pt: dict, before: dict,
         lr: float | None) -> dict:
    m = _metrics(out, name)
    row = {"model": label, "run": name, "delete_lr": lr, "pretrained_rate": pt["score"],
           "pretrained_loss": pt["heldout_loss"], "before_reft_loss": before["heldout_loss"]}
    for i, c in enumerate(p.columns):
        row[f"rate@{c}"] = _at(m, c, "score")
        row[f"loss@{c}"] = _at(m, c, "heldout_loss")
        row[f"paper@{PAPER_COLUMNS[i]}"] = paper[i] / 100
    return row


def probe_rows(results: dict[str, Path], feature: str = "Twist") -> list[dict]:
    """Fig. 11a analog: the feature's probe accuracy per block for every probed model (with the base rate)."""
    from wrapperlab.analysis.common import Result

    rows = []
    for name in PROBED:
        path = results.get(name)
        if path is None or not path.is_file():
            continue
        res = Result.load(path)
        hits = [r for r in res.rows if r["feature"] == feature]
        row = {"model": name, "base_rate": hits[0]["base_rate"] if hits else None}
        row |= {r["layer"]: r["acc"] for r in hits}
        row["mean"] = float(np.mean([r["acc"] for r in hits])) if hits else None
        rows.append(row)
    return rows


LOSSED = ("pretrain",) + tuple(f"recover-{k}-{e}" for e in ETAS for k in KINDS) + ("recover-control",)


def loss_rows(results: dict[str, Path], feature: str = "Twist") -> list[dict]:
    """Where the held-out loss comes from, per model at the end of its run (the reFT runs: the last column):
    mean loss on texts with the feature (all tokens, the instruction, the feature's sentence, the rest of the
    story) and on texts without it."""
    from wrapperlab.analysis.common import Result

    rows = []
    for name in LOSSED:
        path = results.get(name)
        if path is None or not path.is_file():
            continue
        got = {(r["stories"], r["part"]): r["loss"] for r in Result.load(path).rows}
        w, wo = f"with {feature}", f"without {feature}"
        rows.append({"model": name, "all": got.get((w, "all")), "instruction": got.get((w, "instruction")),
                     "feature sentence": got.get((w, "feature sentence")),
                     "rest of story": got.get((w, "rest of story")), f"without {feature}": got.get((wo, "all"))})
    return rows


def summary(p: StoriesPreset, out: str | Path, plan, wall_s: float | None = None) -> dict:
    """The tables of every seed under ``by_seed``; ``runs``, ``table1``, ``probes`` (the paper's pooling),
    ``probes_story`` (pooled over the story) and ``losses`` at the top are the first seed's (the whole summary when
    there is one seed)."""
    out = Path(out)
    by_seed = {}
    for seed in plan.spec.seeds:
        runs = protocol_runs(p, plan, seed)
        by_seed[str(seed)] = {"runs": {k: str(v) for k, v in runs.items()}, "table1": table1_rows(p, runs),
                              "probes": probe_rows(_results(plan, runs, "feature_probe", {"pool": "last"},
                                                            pool="last")),
                              "probes_story": probe_rows(_results(plan, runs, "feature_probe", pool="story")),
                              "losses": loss_rows(_results(plan, runs, "story_loss"))}
    res = {"preset": asdict(p), "columns": list(p.columns), "paper_columns": list(PAPER_COLUMNS),
           "seeds": list(plan.spec.seeds), **by_seed[str(plan.spec.seeds[0])], "by_seed": by_seed,
           "paper_probe_claim": PAPER_PROBE_CLAIM}
    if wall_s is not None:
        res["wall_s"] = round(wall_s, 1)
    from wrapperlab.fileio import atomic_write_text

    atomic_write_text(out / "stories_table.json", json.dumps(res, indent=1))
    return res


def run_table(p: StoriesPreset, out: str | Path, data: str | Path | None = None, judge: str | Path | None = None,
              workers: int = 1, threads: int = 0, seeds: tuple[int, ...] = (0,), probes: bool = True,
              log: Callable[[str], None] | None = None, device: str = "cpu", executor: str = "local",
              address: str | None = None, progress: bool = False) -> dict:
    """The whole protocol in the store ``out``: procedural shards (when ``data`` is None and the preset has a
    recipe), every run and the probes on the chosen executor, and the summary (also ``OUT/stories_table.json``)."""
    from wrapperlab.experiments.plan import build_plan
    from wrapperlab.experiments.run import raise_failures, run_spec
    from wrapperlab.training.config import ConfigError
    from wrapperlab.training.story_judge import load_judge

    check_preset(p)
    out = Path(out)
    say = log or (lambda s: None)
    if data is None and not p.data:
        raise ConfigError(f"--data: the {p.name} preset needs real TinyStories-Instruct shards")
    shards = Path(data) if data is not None else out / "shards"
    spec = protocol_spec(p, shards.resolve(), str(Path(judge).resolve()) if judge else None, tuple(seeds))
    if not probes:
        spec = spec.model_copy(update={"analyses": []})
    build_plan(spec, out, threads=threads, device=device)  # every config is valid before anything is written
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {device} requested but torch sees no CUDA device")
    if judge is not None:
        load_judge(judge)  # a bad file fails now, not after hours of training
    if data is None and not list(shards.glob("data*.json")):
        from wrapperlab.tasks.stories import generate_records, write_shards

        rng = np.random.default_rng(p.data["seed"])
        write_shards([generate_records(p.data["per_shard"], rng, feature_rate=p.data["feature_rate"])
                      for _ in range(p.data["shards"])], shards, source="wrapperlab procedural")
        say(f"wrote {p.data['shards']} × {p.data['per_shard']} procedural stories to {shards}")
    t0 = time.perf_counter()
    per = threads or (max(1, 2 // workers) if workers > 1 else 0)
    plan, outcome = run_spec(spec, out, workers=workers, threads=per, executor=executor, address=address,
                             device=device, log=log, progress=progress)
    raise_failures(outcome)
    return summary(p, out, plan, time.perf_counter() - t0)
