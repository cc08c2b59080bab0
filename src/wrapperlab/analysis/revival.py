"""Revival by reverse fine-tuning, against the Scr.+FT and Scr. baselines (paper §5, App. D; Figs. 9, 26).

For a fine-tuned run this trains, through ``wrapperlab.training`` (never a loop of its own):
- ``reft``: the fine-tuned model, trained back on the pretraining task (family, O_PT) at an LR below the
  fine-tuning LR (the paper's rule). Default LR: the preset's reFT LR if it is below the fine-tuning LR,
  otherwise the largest named LR below it (η_S after η_M, η_VS after η_S).
- ``scr+ft`` (Scr.+FT): a model trained from scratch on (family, O_FT) — "pretrained on the other operand", with
  the preset's scratch recipe — then trained on (family, O_PT) with exactly the reFT recipe.
- ``scr`` (Scr.): a model trained from scratch on (family, O_PT) with exactly the reFT recipe (App. E.4).

All three use the fine-tuned run's task and model shape, evaluate on the same seeded sets, and evaluate at
log-spaced steps (1, 2, 5, 10, …) besides the regular cadence, for a log-x curve. Summary per curve: the first
evaluated step at which O_PT accuracy (c_test = 0) reaches ``fraction`` (default 90 %) of the pretrained model's
accuracy, or "not reached" within the steps run. The pretrained accuracy is the fine-tuned run's step-0 value
(the pretrained model on the same evaluation set).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from wrapperlab.analysis.common import AnalysisError, Result, Settings, metric_at
from wrapperlab.training import checkpoint as ck
from wrapperlab.training.config import ConfigError, build_config, validate
from wrapperlab.training.presets import named_lrs, preset_dict
from wrapperlab.training.stage import Stage, default_run_dir, resolve

CURVES = ("reft", "scr+ft", "scr")


class RevivalSettings(Settings):
    lr: float | str | None = None  # None: see module docstring; a name (S, VS, ...) or a number
    steps: int | None = Field(None, ge=1)  # None: the preset's reFT steps
    baselines: tuple[Literal["scr+ft", "scr"], ...] = ("scr+ft", "scr")
    fraction: float = Field(0.9, gt=0, le=1)
    every: int | None = Field(None, ge=1)  # evaluation/checkpoint cadence; None: steps // 10
    scratch_steps: int | None = Field(None, ge=1)  # steps of the O_FT scratch model behind Scr.+FT; None: the preset's
    threads: int = Field(0, ge=0)


def default_reft_lr(preset: str, ft_lr: float) -> float:
    lrs = named_lrs(preset)
    pre = preset_dict(preset, "reft")["train"]["lr"]
    pre = lrs[pre] if isinstance(pre, str) else pre
    if pre < ft_lr * (1 - 1e-9):
        return pre
    below = [v for v in lrs.values() if v < ft_lr * (1 - 1e-9)]
    if not below:
        raise AnalysisError(f"lr: no named LR is below the fine-tuning LR {ft_lr:g}; give lr=<number>")
    return max(below)


@dataclass(frozen=True)
class RevivalRun:
    """One training run behind a revival curve: a stage, its overrides, and which run it starts from
    ("ft" = the fine-tuned run, another RevivalRun's ``name``, or None)."""

    name: str
    curve: str | None
    stage: str
    values: dict  # overrides, as data ({dotted key or short name: value})
    extra: dict  # whole sections merged last (the fine-tuned run's task and model)
    parent: str | None

    def raw(self, parent_dir: str | Path | None) -> dict:
        extra, values = dict(self.extra), dict(self.values)
        if parent_dir is not None:
            values["parent"] = str(Path(parent_dir).resolve())
        return build_config(self.stage, extra.pop("preset"), values=values, extra=extra)


def revival_runs(cfg, s: RevivalSettings) -> tuple[list[RevivalRun], dict]:
    """The runs ``revival`` trains for a fine-tuned run of config ``cfg``, in dependency order, and the resolved
    recipe (lr, steps). The experiment planner uses the same list to make them nodes of its DAG."""
    fam, o_pt, o_ft = cfg.eval_family, cfg.task.o_pt, cfg.task.o_ft
    lrs = named_lrs(cfg.preset)
    lr = default_reft_lr(cfg.preset, cfg.train.lr) if s.lr is None else s.lr
    lr = lrs.get(lr, lr) if isinstance(lr, str) else lr
    if isinstance(lr, str):
        raise AnalysisError(f"lr: unknown name {lr!r}; use one of {', '.join(lrs)} or a number")
    steps = s.steps or preset_dict(cfg.preset, "reft")["train"]["steps"]
    every = s.every or max(1, steps // 10)
    # every run here is a replicate of the fine-tuned run's seed: the baselines too (they have no parent to
    # inherit it from), so each seed of a grid gets its own Scr.+FT and Scr. baselines
    recipe = {"lr": lr, "steps": steps, "eval.every": every, "eval.log_spaced": True, "family": fam,
              "eval.n": cfg.eval.n, "eval.seed": cfg.eval.seed, "seed": cfg.train.seed}
    base = {"preset": cfg.preset, "threads": s.threads, "device": cfg.device}
    shape = {"task": cfg.task.model_dump(mode="json"), "model": cfg.model.model_dump(mode="json")}
    reft = RevivalRun("reft", "reft", "reft", recipe, base, "ft")
    runs = [reft]
    if "scr+ft" in s.baselines:
        scr = {"family": fam, "operand": o_ft, "seed": cfg.train.seed,
               **({"steps": s.scratch_steps} if s.scratch_steps else {})}
        runs.append(RevivalRun(f"scratch-{o_ft}", None, "scratch", scr, {**base, **shape}, None))
        runs.append(RevivalRun("scratch-ft", "scr+ft", "scratch+ft", recipe, base, f"scratch-{o_ft}"))
    if "scr" in s.baselines:
        # exactly the reFT recipe, from scratch, on (family, O_PT)
        ft_side = {"config": cfg.model_dump(mode="json"), "run_id": "planned", "stage": "finetune",
                   "status": "done"}
        try:
            reft_cfg, _ = resolve(reft.raw("ft-run"), parent_side=ft_side)
        except ConfigError as e:
            raise AnalysisError(str(e)) from None
        train = {k: v for k, v in reft_cfg.train.model_dump(mode="json").items() if k != "c_train"}
        train["operand"] = o_pt
        runs.append(RevivalRun("scratch", "scr", "scratch", {"eval.every": every, "eval.log_spaced": True,
                                                              "eval.n": cfg.eval.n, "eval.seed": cfg.eval.seed},
                               {**base, **shape, "train": train}, None))
    return runs, {"lr": lr, "steps": steps}


def _run(r: RevivalRun, parent_dir: Path | None, run_dir: Path, progress: bool, log,
         runs_root: Path | None = None) -> tuple[dict, Path]:
    """Train (or reuse) one stage; returns its sidecar and its directory. With ``runs_root`` the run goes to
    ``runs_root/<stage>-<run id>`` (a store's canonical place, shared by every revival that needs the same
    run, e.g. one Scr.+FT baseline for all fine-tuned runs of a grid) instead of ``run_dir``."""
    try:
        cfg, parent = resolve(r.raw(parent_dir))
    except ConfigError as e:
        raise AnalysisError(str(e)) from None
    if runs_root is not None:
        run_dir = default_run_dir(cfg, parent["run_id"] if parent else None, runs_root)
    log(f"{r.stage} -> {run_dir}")
    side = Stage(cfg, parent, run_dir).run(progress=progress, log=log)
    if side.get("status") != "done":
        raise AnalysisError(f"{run_dir}: {r.stage} ended with status {side.get('status')!r}")
    return side, run_dir


def revival(ft_run: str | Path, out: str | Path, *, settings: RevivalSettings | None = None,
            progress: bool = False, log: Callable[[str], None] | None = None,
            runs_root: str | Path | None = None) -> Result:
    """Train the reFT curve and the baselines under ``out`` (reusing finished runs) and summarise them; with
    ``runs_root`` (an experiment store's run directory) every run goes there under its canonical name instead.
    Rows: curve, step, acc (O_PT, c_test = 0), majority. Side table ``summary``: curve, lr, steps,
    steps_to_target (None = not reached), target, final_acc."""
    s = settings or RevivalSettings()
    log = log or (lambda _m: None)
    side = ck.read_sidecar(ft_run)
    if side.get("stage") != "finetune" or side.get("status") != "done":
        raise AnalysisError(f"{ft_run}: revival needs a finished finetune run (this is a {side.get('stage')} run, "
                            f"status {side.get('status')})")
    cfg = validate(side["config"])
    fam, o_pt = cfg.eval_family, cfg.task.o_pt
    pretrained = metric_at(side["metrics"], fam, o_pt, 0.0, step=0)
    if pretrained is None:
        raise AnalysisError(f"{ft_run}: no step-0 evaluation of {fam}/{o_pt} at c_test=0 to compare with")
    plan, recipe = revival_runs(cfg, s)
    lr, steps = recipe["lr"], recipe["steps"]
    out = Path(out)
    root = Path(runs_root) if runs_root is not None else None
    dirs: dict[str, Path] = {"ft": Path(ft_run)}
    sides, curve_dirs = {}, {}
    for r in plan:
        sd, dirs[r.name] = _run(r, dirs[r.parent] if r.parent else None, out / r.name, progress, log, root)
        if r.curve:
            sides[r.curve], curve_dirs[r.curve] = sd, dirs[r.name]
    target = s.fraction * pretrained
    rows, summary = [], []
    for curve, sd in sides.items():
        pts = sorted((r for r in sd["metrics"] if r["family"] == fam and r["operand"] == o_pt
                      and r["c_test"] == 0.0), key=lambda r: r["step"])
        for r in pts:
            rows.append({"curve": curve, "step": r["step"], "acc": r["acc"], "majority": r["majority"]})
        hit = next((r["step"] for r in pts if r["acc"] >= target), None)
        summary.append({"curve": curve, "lr": sd["config"]["train"]["lr"], "steps": sd["config"]["train"]["steps"],
                        "steps_to_target": hit, "target": target, "start_acc": pts[0]["acc"],
                        "final_acc": pts[-1]["acc"], "run": str(curve_dirs[curve])})
    meta = {"settings": s.to_dict(), "run": str(ft_run), "lr": lr, "steps": steps, "pretrained_acc": pretrained,
            "target": target, "family": fam, "operand": o_pt, "ft_lr": cfg.train.lr}
    return Result("revival", rows, meta, {"summary": summary})
