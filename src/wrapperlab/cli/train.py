"""Training commands' shared body: parse ``[CONFIG.yaml] key=value ...``, resolve, run a stage, print the result.
Used by ``wrapperlab pretrain | finetune | reft | scratch | scratch-ft`` and ``wrapperlab tracr finetune``."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from wrapperlab.cli.common import UserError, _fail, err, out


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


STAGE_HELP = {
    "pretrain": "Pretrain from scratch on the PCFG family mix and operand prior (paper §4, App. C.2).",
    "finetune": "Fine-tune a pretrained run on one (family, O_FT) pair with spurious rate c_train "
                "(needs parent=RUN_DIR).",
    "reft": "Reverse fine-tune: train a fine-tuned run back on the pretraining task (family, O_PT) at a smaller "
            "LR (needs parent=RUN_DIR of a finetune run).",
    "scratch": "Baseline Scr.: train from scratch on one (family, operand) pair (operand=b gives the starting "
               "point of Scr.+FT).",
    "scratch-ft": "Baseline Scr.+FT: fine-tune a scratch run on (family, O_PT) like reft "
                  "(needs parent=RUN_DIR of a scratch run).",
}

def _stage_command(stage: str):
    def cmd(
        args: list[str] | None = typer.Argument(None, help=OVERRIDE_HELP, show_default=False),
        preset: str = typer.Option("cpu", help="cpu (this machine, minutes) or paper (the paper's scale)"),
        out_dir: Path | None = typer.Option(None, "--out", help="run directory (default runs/<stage>-<id>)"),
        device: str | None = typer.Option(None, help="cpu or cuda[:N]"),
        threads: int | None = typer.Option(None, help="torch threads (default: torch's choice)"),
        as_json: bool = typer.Option(False, "--json", help="print the final summary as one JSON object"),
        progress: bool = typer.Option(True, help="show a progress bar with ETA"),
    ) -> None:
        _train(stage.replace("scratch-ft", "scratch+ft"), args, preset, out_dir, device, threads, as_json, progress)

    cmd.__doc__ = STAGE_HELP[stage] + " Running the same command again resumes an interrupted run exactly."
    return cmd


def evaluate(
    run: Path | None = typer.Argument(None, help="run directory to evaluate"),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="same as RUN"),
    c_test: list[float] | None = typer.Option(None, "--c-test", help="spurious rate(s) of the test sets"),
    n: int | None = typer.Option(None, help="samples per test set"),
    all_families: bool | None = typer.Option(None, "--all-families/--stage-family",
                                                help="report every family (default: pretrain runs only)"),
    table: bool = typer.Option(False, "--table", help="print the Table-5-shaped grid of the fine-tuning runs "
                                                      "under --runs beside the paper's numbers"),
    runs: Path = typer.Option(Path("runs"), help="where --table looks for fine-tuning runs"),
    plot: Path | None = typer.Option(None, "--plot", help="also draw the run's stored learning curves "
                                                           "(accuracy vs step, majority class dashed) to this PNG"),
    device: str = typer.Option("cpu"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Accuracy of a run on O_PT and O_FT at c_test 0 and 1, each beside its majority-class rate; or, with
    --table, the paper's Table 5 layout for every fine-tuning run found."""
    from wrapperlab.analysis.evaluate import evaluate_run, table_grid
    from wrapperlab.training import checkpoint as ck
    from wrapperlab.training.config import ConfigError

    if table:
        if not runs.is_dir():
            _fail(f"runs: {runs} is not a directory")
        rows = table_grid(runs)
        if as_json:
            print(json.dumps(rows))
        else:
            _print_grid(rows)
        return
    target = run or checkpoint
    if target is None:
        _fail("give a run directory (wrapperlab evaluate RUN) or --table")
    if not target.exists():
        _fail(f"checkpoint: {target} does not exist")
    if target.is_file():
        _fail(f"checkpoint: {target} is a file; wrapperlab checkpoints are run directories holding "
              "checkpoint.json + a safetensors file (pickled .pt files are never loaded)")
    for c in c_test or []:
        if not 0 <= c <= 1:
            _fail(f"c_test: must be in [0, 1], got {c}")
    if n is not None and n < 1:
        _fail(f"n: must be >= 1, got {n}")
    try:
        side, rows = evaluate_run(target, c_test, n, None, all_families, None, device)
    except (ck.CheckpointError, ConfigError, KeyError) as e:
        _fail(str(e))
    if plot:
        from wrapperlab.report.figures import plot_curves

        plot_curves(side.get("metrics", []), plot, f"{side.get('stage')} {target}")
    if as_json:
        print(json.dumps({"run_dir": str(target), "stage": side.get("stage"), "step": side.get("step"),
                          "metrics": rows}))
    else:
        _metrics_table(rows, f"{side.get('stage')} {target} at step {side.get('step')}")
        if plot:
            out.print(f"learning curves written to {plot}")


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.1f}"


def _print_grid(rows: list[dict]) -> None:
    if not rows:
        out.print("no finished fine-tuning runs found")
        return
    t = Table(title="Table 5 analog: measured / paper (accuracy %). '1K' and '10K' = 10 % and 100 % of the "
                    "run's fine-tuning steps (the paper's 1K and 10K of 10K).", title_justify="left")
    for c in ("eta", "prior", "C_Tr", "PT acc a / b"):
        t.add_column(c)
    for op in ("O_PT", "O_FT"):
        for c in ("c0@1K", "c0@10K", "c1@1K", "c1@10K"):
            t.add_column(f"{op} {c}", justify="right")
    t.add_column("O_FT c0: =r(a)+q", justify="right")
    for r in rows:
        p = r["paper"] or {}
        pp = r["paper_pretrained"] or {}
        cells = []
        for op in ("o_pt", "o_ft"):
            for c in ("c0@1K", "c0@10K", "c1@1K", "c1@10K"):
                pv = (p.get(op) or {}).get(c)
                cells.append(f"{_fmt(r[op][c])} / {_fmt(pv)}")
        pre = f"{_fmt(r['pretrained']['o_pt'])}/{_fmt(r['pretrained']['o_ft'])} (paper " \
              f"{_fmt(pp.get('o_pt'))}/{_fmt(pp.get('o_ft'))})"
        t.add_row(r["eta"], r["prior"], f"{r['c_train']:g}", pre, *cells, _fmt(r["follows_spurious_c0"]))
    out.print(t)
    maj = rows[0]["majority"]
    out.print("majority-class rates of the test sets (first run): "
              + ", ".join(f"{k} {v:.1f}%" for k, v in maj.items()), highlight=False)


def register(app: typer.Typer) -> None:
    for stage in STAGE_HELP:
        app.command(stage)(_stage_command(stage))
    app.command("evaluate")(evaluate)
