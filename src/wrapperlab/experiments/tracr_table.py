"""Table 3 analog (paper Table 3; App. C.1 recipe): fine-tune the compiled Counter and Max-identifier at every learning
rate and c_train, evaluate O_PT / O_FT accuracy at C_Te = 1 and 0, and set each cell beside the paper's.

Runs are ordinary wrapperlab run directories (``OUT/<program>-<lr>-c<c_train>``): finished runs are reused, an
interrupted one resumes. The cpu preset sweeps c_train over {0, 0.5, 0.8, 1} (the PCFG grid) to fit this machine;
``c_trains=PAPER_C_TRAIN`` gives the paper's seven values.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

LRS = ("L", "M", "S", "VS")
CPU_C_TRAIN = (0.0, 0.5, 0.8, 1.0)
PAPER_C_TRAIN = (0.0, 0.2, 0.5, 0.6, 0.8, 0.9, 1.0)
PROGRAMS = ("counter", "max-identifier")


def paper_table3() -> list[dict]:
    return json.loads(resources.files("wrapperlab.data").joinpath("paper_table3.json").read_text())["rows"]


def plan(programs=PROGRAMS, lrs=LRS, c_trains=CPU_C_TRAIN, preset: str = "tracr-cpu", out: str | Path = "runs/tracr",
         overrides: tuple[str, ...] = ()) -> list[tuple[Path, dict]]:
    """(run directory, raw config) for every cell, in execution order."""
    from wrapperlab.training.config import build_config

    cells = []
    for prog in programs:
        for lr in lrs:
            for c in c_trains:
                raw = build_config("finetune", preset, overrides=[f"task.program={prog}", f"lr={lr}",
                                                                  f"c_train={c:g}", *overrides])
                cells.append((Path(out) / f"{prog}-{lr}-c{c:g}", raw))
    return cells


def run_table(programs=PROGRAMS, lrs=LRS, c_trains=CPU_C_TRAIN, preset: str = "tracr-cpu",
              out: str | Path = "runs/tracr", overrides: tuple[str, ...] = (), threads: int = 0, workers: int = 1,
              log: Callable[[str], None] | None = None) -> list[dict]:
    """Train (or reuse) every cell and return one row per (program, lr, c_train, c_test)."""
    from wrapperlab.analysis.attention import attention_signature
    from wrapperlab.training.stage import Stage, resolve

    log = log or (lambda s: None)
    cells = plan(programs, lrs, c_trains, preset, out, overrides)
    for _, raw in cells:
        if threads:
            raw["threads"] = threads
        resolve(dict(raw))  # every cell's config is valid before anything trains
    todo = [c for c in cells if not _done(c[0])]
    log(f"{len(cells)} runs planned, {len(cells) - len(todo)} already finished, {len(todo)} to train "
        f"({workers} worker{'s' if workers > 1 else ''})")
    t0 = time.perf_counter()
    if workers > 1 and len(todo) > 1:
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers) as pool:
            futs = [pool.submit(_train_cell, str(d), raw) for d, raw in todo]
            for i, f in enumerate(as_completed(futs)):
                _progress(log, f.result(), i + 1, len(todo), t0)
    else:
        for i, (d, raw) in enumerate(todo):
            _progress(log, _train_cell(str(d), raw), i + 1, len(todo), t0)
    rows = []
    for run_dir, raw in cells:
        cfg, parent = resolve(dict(raw))
        side = Stage(cfg, parent, run_dir).existing() or {}
        attn = attention_signature(run_dir).rows[0] if side.get("status") == "done" else {}
        rows += [dict(r, **attn) for r in cell_rows(cfg, side, run_dir)]
    return rows


def _train_cell(run_dir: str, raw: dict) -> tuple[str, str]:
    from wrapperlab.training.stage import Stage, resolve

    cfg, parent = resolve(dict(raw))
    side = Stage(cfg, parent, run_dir).run(progress=False)
    return Path(run_dir).name, str(side.get("status"))


def _progress(log, result: tuple[str, str], done: int, total: int, t0: float) -> None:
    el = time.perf_counter() - t0
    log(f"[{done}/{total}] {result[0]}: {result[1]} (elapsed {el:.0f} s, ETA {el / done * (total - done):.0f} s)")


def _done(run_dir: Path) -> bool:
    from wrapperlab.training import checkpoint as ck

    try:
        return ck.read_sidecar(run_dir).get("status") == "done"
    except ck.CheckpointError:
        return False


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
