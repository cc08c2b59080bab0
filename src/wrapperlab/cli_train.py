"""Training commands' shared body: parse ``[CONFIG.yaml] key=value ...``, resolve, run a stage, print the result.
Used by ``wrapperlab pretrain | finetune | reft | scratch | scratch-ft`` and ``wrapperlab tracr finetune``."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from wrapperlab.cli_common import UserError, _fail, err, out


def _split_args(args: list[str] | None) -> tuple[str | None, list[str]]:
    """Positional args: an optional YAML file, then key=value overrides."""
    file, overrides = None, []
    for a in args or []:
        if "=" in a:
            overrides.append(a)
        elif file is None:
            file = a
        else:
            raise UserError(f"unexpected argument {a!r}: give one config file and key=value overrides")
    return file, overrides


OVERRIDE_HELP = ("[CONFIG.yaml] [key=value ...]  Overrides use dotted paths (task.window=64, train.optimizer=sgd, "
                 "model.d_model=128) or the short names lr, steps, c_train, c_test, prior, seed, batch_size, loss, "
                 "family, operand, window, parent. lr also takes the preset's names L, M, S, VS.")


def _train(stage: str, args, preset, out_dir, device, threads, as_json, progress) -> None:
    from wrapperlab.training import checkpoint as ck
    from wrapperlab.training.config import ConfigError, build_config
    from wrapperlab.training.stage import Stage, resolve

    try:
        file, overrides = _split_args(args)
        extra = {"device": device} if device else {}
        if threads is not None:
            extra["threads"] = threads
        raw = build_config(stage, preset, file, overrides, extra)
        notes = raw.get("_notes", [])
        cfg, parent = resolve(raw)
        st = Stage(cfg, parent, out_dir)
        prev = st.existing()
    except (ConfigError, ck.CheckpointError, UserError) as e:
        _fail(str(e))
    for note in notes:
        err.print(f"{cfg.preset} preset: {note}", highlight=False, markup=False)
    if prev and prev.get("status") == "done":
        err.print(f"{st.run_dir}: already complete (step {prev['step']}); nothing to do", highlight=False)
    elif prev:
        err.print(f"{st.run_dir}: resuming from step {prev['step']}", highlight=False)
    else:
        err.print(f"{st.run_dir}: {stage} for {cfg.train.steps} steps ({cfg.preset} preset)", highlight=False)
    if cfg.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            _fail(f"device: {cfg.device} requested but torch sees no CUDA device")
    try:
        side = st.run(progress=progress and not as_json, log=lambda s: err.print(s, highlight=False, markup=False))
    except ck.CheckpointError as e:
        _fail(str(e))
    except OSError as e:  # disk full, permissions...: the last checkpoint was not replaced
        _fail(f"write failed in {st.run_dir}: {e.strerror or e}; the last checkpoint is intact, rerun the same "
              f"command to resume once the problem is fixed")
    _print_summary(side, st.run_dir, as_json)
    if side.get("status") == "diverged":
        raise typer.Exit(3)


def _final_rows(side: dict) -> list[dict]:
    step = side.get("step", 0)
    return [r for r in side.get("metrics", []) if r["step"] == step]


def _print_summary(side: dict, run_dir: Path, as_json: bool) -> None:
    rows = _final_rows(side)
    if as_json:
        print(json.dumps({"run_dir": str(run_dir), "run_id": side.get("run_id"), "stage": side.get("stage"),
                          "status": side.get("status"), "step": side.get("step"), "wall_s": side.get("wall_s"),
                          "metrics": rows}))
        return
    _metrics_table(rows, f"{side.get('stage')} {run_dir} — status {side.get('status')}, step {side.get('step')}, "
                         f"{side.get('wall_s')} s")


def _metrics_table(rows: list[dict], title: str) -> None:
    t = Table(title=title, title_justify="left")
    for col in ("family", "operand", "c_test", "accuracy %", "majority %", "follows r(x,O_PT)+q %"):
        t.add_column(col, justify="right" if col not in ("family", "operand") else "left")
    for r in rows:
        fs = r.get("follows_spurious")
        t.add_row(r["family"], r["operand"], f"{r['c_test']:g}", f"{100 * r['acc']:.1f}",
                  f"{100 * r['majority']:.1f}", "" if fs is None else f"{100 * fs:.1f}")
    out.print(t)
