"""wrapperlab command line. Thin: it parses, calls the library and prints.

Every command that prints results takes ``--json``. Configuration errors and unreadable files exit with
code 2 and one line on stderr naming what is wrong; nothing is written before the configuration is valid.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.table import Table

from wrapperlab.cli_analyze import analyze_app
from wrapperlab.cli_bench import register as register_bench
from wrapperlab.cli_common import UserError, _fail, out
from wrapperlab.cli_experiments import register as register_experiments
from wrapperlab.cli_stories import stories_app
from wrapperlab.cli_tracr import tracr_app
from wrapperlab.cli_train import OVERRIDE_HELP, _metrics_table, _train

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="wrapperlab: did fine-tuning remove a capability, or only wrap it? "
                       "Pretrain on PCFG tasks, fine-tune under the paper's protocols, reverse-fine-tune, evaluate.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect the procedurally generated PCFG data.")
app.add_typer(data_app, name="data")
app.add_typer(analyze_app, name="analyze")
app.add_typer(tracr_app, name="tracr")
app.add_typer(stories_app, name="stories")
register_experiments(app)
register_bench(app)


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


for _stage in STAGE_HELP:
    app.command(_stage)(_stage_command(_stage))


@app.command()
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


# ------------------------------------------------------------------------------------------------ data
def _task_from(preset: str, overrides: list[str]):
    from wrapperlab.tasks.task import PCFGTask
    from wrapperlab.training.config import build_config, validate

    raw = build_config("pretrain", preset, None, overrides)
    return PCFGTask(validate(raw).task)


@data_app.command("sample")
def data_sample(
    overrides: list[str] | None = typer.Argument(None, help="task overrides, e.g. task.window=64 prior=high"),
    family: str | None = typer.Option(None, help="count | count-composition | index-of-occurrence | "
                                                    "index-of-composition | token-value (default: the mix)"),
    operand: str | None = typer.Option(None, help="a | b | c (default: drawn from the prior)"),
    n: int = typer.Option(5, help="number of samples"),
    c_test: float = typer.Option(0.0, "--c-test", help="probability of the spurious edit"),
    seed: int = typer.Option(0),
    preset: str = typer.Option("paper", help="paper (window 250) or cpu (window 64)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
) -> None:
    """Print samples: the model input, the answer, and whether the spurious edit was applied."""
    import numpy as np

    from wrapperlab.tasks.families import get_family
    from wrapperlab.training.config import ConfigError

    if n < 1:
        _fail(f"n: must be >= 1, got {n}")
    try:
        if family is not None:
            get_family(family)
        task = _task_from(preset, overrides or [])
        b = task.sample(n, np.random.default_rng(seed), family=family, operand=operand, c=c_test, keep_source=True)
    except (ConfigError, ValueError) as e:
        _fail(str(e))
    terms = task.sampler.grammar.terminals
    for i in range(n):
        toks = task.vocab.decode(b.tokens[i])
        text = [terms[t] for t in b.text[i] if t >= 0]
        ans = task.vocab.tokens[b.answer[i]]
        rec = {"family": b.family[i], "operand": b.operand[i], "o2": int(b.o2[i]),
               "source": [terms[t] for t in b.source[i]], "text": text,
               "answer": int(ans) if ans.isdigit() else ans, "spurious": bool(b.spurious[i]),
               "edits": int(b.n_edits[i]), "tokens": toks}
        if as_json:
            print(json.dumps(rec))
        else:
            shown = " ".join(t for t in toks if t != "#")
            out.print(f"[{b.family[i]} {b.operand[i]} O'={b.o2[i]}] answer={rec['answer']} "
                      f"spurious={rec['spurious']} (edits {rec['edits']}, source {len(rec['source'])} tokens)\n"
                      f"  {shown}", highlight=False, markup=False)


@data_app.command("spurious")
def data_spurious(
    overrides: list[str] | None = typer.Argument(None, help="task overrides, e.g. task.o2.count=16"),
    family: str = typer.Option("count", help="count or index-of-occurrence"),
    c: list[float] = typer.Option([0.0, 0.5, 0.8, 1.0], "--c", help="spurious rates to report"),
    n: int = typer.Option(5000, help="samples per setting"),
    seed: int = typer.Option(0),
    preset: str = typer.Option("paper"),
    png: Path | None = typer.Option(None, help="also draw the label histograms (paper Fig. 16) to this PNG"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Realised spurious rate and label histograms of O_PT and O_FT per c (the paper's Fig. 16)."""
    import numpy as np

    from wrapperlab.training.config import ConfigError

    if n < 1:
        _fail(f"n: must be >= 1, got {n}")
    try:
        task = _task_from(preset, overrides or [])
        cfg = task.config
        results = []
        for cv in c:
            rng = np.random.default_rng([seed, int(cv * 1000)])
            res = {"c": cv, "n": n}
            for op in (cfg.o_pt, cfg.o_ft):
                b = task.sample(n, rng, family=family, operand=op, c=cv)
                hist = np.bincount(b.value, minlength=1)
                res[f"hist_{op}"] = hist.tolist()
                if op == cfg.o_ft:
                    rel = (b.value - b.value_pt) == cfg.q
                    res["edited_rate"] = float(b.spurious.mean())
                    res["relation_rate"] = float(rel.mean())
                    res["mean_edits"] = float(b.n_edits[b.spurious].mean()) if b.spurious.any() else 0.0
                    res["redrawn"] = int(b.rejected)
            results.append(res)
    except (ConfigError, ValueError) as e:
        _fail(str(e))
    if png:
        _plot_hists(results, cfg, family, png)
    if as_json:
        print(json.dumps({"family": family, "o_pt": cfg.o_pt, "o_ft": cfg.o_ft, "q": cfg.q, "results": results}))
        return
    t = Table(title=f"spurious correlation r(x,{cfg.o_ft}) - r(x,{cfg.o_pt}) = {cfg.q} on {family}, n={n} per row",
              title_justify="left")
    for col in ("c", "edited %", "relation holds %", "edits/edited sample", "redrawn",
                f"mode {cfg.o_pt} (share %)", f"mode {cfg.o_ft} (share %)"):
        t.add_column(col, justify="right")
    for r in results:
        ha, hb = np.array(r[f"hist_{cfg.o_pt}"]), np.array(r[f"hist_{cfg.o_ft}"])
        t.add_row(f"{r['c']:g}", f"{100 * r['edited_rate']:.1f}", f"{100 * r['relation_rate']:.1f}",
                  f"{r['mean_edits']:.2f}", str(r["redrawn"]), f"{ha.argmax()} ({100 * ha.max() / n:.1f})",
                  f"{hb.argmax()} ({100 * hb.max() / n:.1f})")
    out.print(t)
    for r in results:
        for op in (cfg.o_pt, cfg.o_ft):
            h = np.array(r[f"hist_{op}"])
            nz = np.flatnonzero(h)
            bars = "  ".join(f"{v}:{100 * h[v] / n:.0f}%" for v in range(nz.min(), nz.max() + 1) if h[v] >= n / 200)
            out.print(f"c={r['c']:g} labels of {family}({op}): {bars}", highlight=False)
    if png:
        out.print(f"histograms written to {png}")


def _plot_hists(results, cfg, family, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for ax, op in zip(axes, (cfg.o_pt, cfg.o_ft)):
        for r in results:
            h = r[f"hist_{op}"]
            ax.plot(range(len(h)), [x / r["n"] for x in h], marker="o", ms=3, label=f"c={r['c']:g}")
        ax.set_title(f"{family}({op}) labels")
        ax.set_xlabel("class label")
    axes[0].set_ylabel("fraction")
    axes[1].legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)


def main() -> None:
    """The console entry point. SIGTERM stops a command the way Ctrl-C does (cleanup runs, one line on stderr),
    with exit code 143 (130 for Ctrl-C)."""
    import signal

    from wrapperlab.cli_common import install_stop_handlers, note_interrupt, stop_exit_code, stop_signal

    install_stop_handlers()
    try:
        app()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # raised outside the command (typer turns one inside it into exit 130)
        pass
    except SystemExit as e:
        if stop_signal() is None or e.code in (0, None):
            raise
    else:
        return
    note_interrupt(f"interrupted by {signal.Signals(stop_signal() or signal.SIGINT).name}")
    sys.exit(stop_exit_code())


if __name__ == "__main__":
    main()
