"""Table 3 analog (paper Table 3; App. C.1 recipe): fine-tune the compiled Counter and Max-identifier at every learning
rate and c_train, evaluate O_PT / O_FT accuracy at C_Te = 1 and 0, and set each cell beside the paper's.

The grid is an experiment spec run into the store ``OUT`` by the one planner and executor (local pool or Ray):
finished runs are reused, an interrupted one resumes, and ``seeds`` adds a seed axis. The cpu preset sweeps c_train
over {0, 0.5, 0.8, 1} (the PCFG grid) to fit this machine; ``c_trains=PAPER_C_TRAIN`` gives the paper's seven.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from wrapperlab.experiments.spec import AnalysisSpec, ExperimentSpec, RunGroup

LRS = ("L", "M", "S", "VS")
CPU_C_TRAIN = (0.0, 0.5, 0.8, 1.0)
PAPER_C_TRAIN = (0.0, 0.2, 0.5, 0.6, 0.8, 0.9, 1.0)
PROGRAMS = ("counter", "max-identifier")


def paper_table3() -> list[dict]:
    return json.loads(resources.files("wrapperlab.data").joinpath("paper_table3.json").read_text())["rows"]


def table_spec(programs=PROGRAMS, lrs=LRS, c_trains=CPU_C_TRAIN, preset: str = "tracr-cpu",
               overrides: dict | None = None, seeds: tuple[int, ...] | None = None) -> ExperimentSpec:
    """The grid as an experiment spec: one fine-tuning group per program over lr x c_train (x seed), with the
    attention signature of every run."""
    grid = {"lr": list(lrs), "c_train": list(c_trains), **({"seed": list(seeds)} if seeds else {})}
    runs = {p.replace("-", "_"): RunGroup(stage="finetune", preset=preset, set={"task.program": p, **(overrides or {})},
                                          grid=grid) for p in programs}
    return ExperimentSpec(name="tracr-table3", description="Table 3 analog (paper App. C.1, Table 3)", runs=runs,
                          analyses=[AnalysisSpec(tool="attention_signature", on=g) for g in runs])


def run_table(programs=PROGRAMS, lrs=LRS, c_trains=CPU_C_TRAIN, preset: str = "tracr-cpu",
              out: str | Path = "runs/tracr", overrides: dict | None = None, threads: int = 0, workers: int = 1,
              executor: str = "local", address: str | None = None, seeds: tuple[int, ...] | None = None,
              log: Callable[[str], None] | None = None, progress: bool = False) -> list[dict]:
    """Train (or reuse) every cell in the store ``out`` on the chosen executor and return one row per
    (program, lr, c_train, c_test), with the cell's attention signature."""
    from wrapperlab.analysis.common import Result
    from wrapperlab.experiments.run import raise_failures, run_spec
    from wrapperlab.training import checkpoint as ck
    from wrapperlab.training.config import validate

    spec = table_spec(programs, lrs, c_trains, preset, overrides, seeds)
    plan, outcome = run_spec(spec, out, workers=workers, threads=threads, executor=executor, address=address,
                             log=log, progress=progress)
    raise_failures(outcome)
    rows = []
    for node in plan.runs():
        side = ck.read_sidecar(node.run_dir) if Path(node.run_dir, ck.SIDECAR).is_file() else {}
        sig = [a for a in plan.analyses("attention_signature") if a.run_id == node.run_id]
        attn = (Result.load(sig[0].payload["result"]).rows[0]
                if sig and Path(sig[0].payload["result"]).is_file() else {})
        rows += [dict(r, **attn) for r in cell_rows(validate(node.side["config"]), side, Path(node.run_dir))]
    return rows


def cell_rows(cfg, side: dict, run_dir: Path) -> list[dict]:
    """Final O_PT / O_FT accuracy at each c_test of one run, with the paper's cell beside it."""
    from wrapperlab.training.presets import named_lrs

    names = {v: k for k, v in named_lrs(cfg.preset).items()}
    step = side.get("step")
    final = [r for r in side.get("metrics", []) if r["step"] == step]
    paper = {(r["program"], r["lr"], r["c_train"], r["c_test"]): r for r in paper_table3()}
    out = []
    for c_test in sorted({r["c_test"] for r in final}, reverse=True):
        acc = {r["operand"]: r for r in final if r["c_test"] == c_test}
        opt, oft = acc.get(cfg.task.o_pt), acc.get(cfg.task.o_ft)
        p = paper.get((cfg.task.program, cfg.train.lr, cfg.train.c_train, c_test), {})
        out.append({"program": cfg.task.program, "lr_name": names.get(cfg.train.lr, ""), "lr": cfg.train.lr,
                    "c_train": cfg.train.c_train, "c_test": c_test,
                    "acc_opt": 100 * opt["acc"] if opt else None, "acc_oft": 100 * oft["acc"] if oft else None,
                    "follows_spurious": 100 * oft["follows_spurious"] if oft and "follows_spurious" in oft else None,
                    "paper_opt": p.get("acc_opt"), "paper_oft": p.get("acc_oft"), "status": side.get("status"),
                    "run_dir": str(run_dir)})
    return out
