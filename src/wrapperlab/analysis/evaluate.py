"""Evaluate a run's checkpoint, and assemble fine-tuning runs into the paper's Table 5/7 layout.

Tables 5–8 of the paper: per (eta, prior, c_train), accuracy on O_PT and O_FT at c_test = 0 and 1, after 1K and 10K
fine-tuning steps. Our runs are shorter, so "1K" and "10K" are read at 10 % and 100 % of the run's steps (the
same fractions of the paper's 10K-step runs); the column headers say so.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from wrapperlab.analysis.common import protocol
from wrapperlab.tasks.priors import prior_name, resolve_prior
from wrapperlab.training import checkpoint as ck
from wrapperlab.training.config import RunConfig, validate
from wrapperlab.training.evaluation import build_eval_sets, evaluate_sets
from wrapperlab.training.presets import named_lrs
from wrapperlab.training.stage import build_model, make_task


def load_run(run_dir: str | Path, device: str = "cpu"):
    """(config, task, model, sidecar) of a run's latest checkpoint; the file is verified and never unpickled."""
    side = ck.read_sidecar(run_dir)
    cfg: RunConfig = validate(side["config"])
    task = make_task(cfg)
    task.attach(run_dir, None, cfg.train.seed, cfg.stage)  # a story run's tokenizer
    model = build_model(cfg, task)
    _, tensors = ck.load_tensors(run_dir, side)
    ck.load_model_state(model, ck.split_prefix(tensors, "model"), str(run_dir))
    model.to(device).eval()
    return cfg, task, model, side


def load_story_run(run_dir: str | Path, device: str, tool: str):
    """:func:`load_run` of a finished story run; ``AnalysisError`` (one line naming ``tool``) otherwise."""
    from wrapperlab.analysis.common import AnalysisError

    cfg, task, model, side = load_run(run_dir, device)
    if side.get("status") != "done":
        raise AnalysisError(f"{run_dir}: the run is not finished (status {side.get('status')})")
    if cfg.task.kind != "story":
        raise AnalysisError(f"{run_dir}: {tool} needs a story run (this is a {cfg.task.kind} run)")
    return cfg, task, model, side


def evaluate_run(run_dir: str | Path, c_test: list[float] | None = None, n: int | None = None,
                 family: str | None = None, all_families: bool | None = None, seed: int | None = None,
                 device: str = "cpu") -> tuple[dict, list[dict]]:
    cfg, task, model, side = load_run(run_dir, device)
    sets = build_eval_sets(
        task, family or cfg.eval_family, c_test if c_test is not None else cfg.eval.c_test,
        n or cfg.eval.n, cfg.eval.seed if seed is None else seed,
        cfg.report_all_families if all_families is None else all_families)
    return side, evaluate_sets(model, task, sets, device)


def paper_tables() -> dict:
    return json.loads(resources.files("wrapperlab.data").joinpath("paper_tables.json").read_text())


def _lr_name(lr: float, preset: str) -> str:
    for name, v in named_lrs(preset).items():
        if abs(v - lr) <= 1e-9 * max(v, lr):
            return name
    return f"{lr:g}"


def _at(metrics: list[dict], step: int, family: str, operand: str, c: float) -> float | None:
    rows = [r for r in metrics if r["family"] == family and r["operand"] == operand and r["c_test"] == c
            and r["step"] <= step]
    if not rows:
        return None
    return 100 * max(rows, key=lambda r: r["step"])["acc"]


def table_grid(root: str | Path) -> list[dict]:
    """One row per finished PCFG fine-tuning run under ``root`` (searched recursively), with the measured cells,
    the paper's cells for the same (eta name, prior, c_train), and the pretrained model's accuracy."""
    rows = []
    for side_path in sorted(Path(root).rglob(ck.SIDECAR)):
        try:
            side = ck.read_sidecar(side_path.parent)
        except ck.CheckpointError:
            continue
        row = grid_row(side, side_path.parent)
        if row is not None:
            rows.append(row)
    return sort_grid(rows)


def sort_grid(rows: list[dict]) -> list[dict]:
    order = {"L": 0, "M": 1, "S": 2}
    return sorted(rows, key=lambda r: (order.get(r["eta"], 9), -r["p_a"], r["c_train"], r["run"]))


def grid_row(side: dict, run_dir: str | Path, paper: dict | None = None) -> dict | None:
    """The Table 5-8 row of one finished PCFG fine-tuning run (None for any other run)."""
    if side.get("stage") != "finetune" or side.get("status") != "done":
        return None
    cfg = side["config"]
    if cfg["task"].get("kind", "pcfg") != "pcfg" or protocol(cfg):  # the appendix protocols are not table rows
        return None
    paper = paper or paper_tables()
    fam = cfg["train"]["family"]
    o_pt, o_ft = cfg["task"]["o_pt"], cfg["task"]["o_ft"]
    steps = cfg["train"]["steps"]
    early = max(1, steps // 10)
    m = side["metrics"]
    probs = resolve_prior(cfg["task"]["prior"])
    row = {"run": str(run_dir), "family": fam, "lr": cfg["train"]["lr"],
           "eta": _lr_name(cfg["train"]["lr"], cfg["preset"]), "prior": prior_name(probs),
           "p_a": probs[0], "c_train": cfg["train"]["c_train"], "steps": steps, "early_step": early}
    for op_key, op in (("o_pt", o_pt), ("o_ft", o_ft)):
        row[op_key] = {f"c{c:g}@{tag}": _at(m, s, fam, op, c)
                       for c in (0.0, 1.0) for tag, s in (("1K", early), ("10K", steps))}
    row["pretrained"] = {"o_pt": _at(m, 0, fam, o_pt, 0.0), "o_ft": _at(m, 0, fam, o_ft, 0.0)}
    fs = [r for r in m if r["step"] == steps and r["operand"] == o_ft and r["c_test"] == 0.0
          and r["family"] == fam]
    row["follows_spurious_c0"] = 100 * fs[0]["follows_spurious"] if fs and "follows_spurious" in fs[0] else None
    maj = [r for r in m if r["step"] == steps and r["family"] == fam]
    row["majority"] = {f"{r['operand']}/c{r['c_test']:g}": 100 * r["majority"] for r in maj}
    key = "count_200k" if fam == "count" else "index_200k"
    ref = next((p for p in paper[key]["rows"]
                if paper["lr_names"].get(f"{p['lr']:g}") == row["eta"]
                and abs(p["p_a"] - probs[0]) < 1e-9 and abs(p["c_train"] - row["c_train"]) < 1e-9), None)
    row["paper"] = ref
    row["paper_pretrained"] = paper[key]["pretrained"].get(f"{probs[0]:g}")
    return row
