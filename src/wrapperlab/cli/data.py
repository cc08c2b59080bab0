"""``wrapperlab data sample | spurious``: look at the procedurally generated PCFG data."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from wrapperlab.cli.common import _fail, out

data_app = typer.Typer(no_args_is_help=True, help="Inspect the procedurally generated PCFG data.")


def _task_from(preset: str, overrides: list[str]):
    from wrapperlab.tasks.task import PCFGTask
    from wrapperlab.training.config import build_config, validate

    raw = build_config("pretrain", preset, None, overrides)
    return PCFGTask(validate(raw).task)


@data_app.command("sample")
def data_sample(
    overrides: list[str] | None = typer.Argument(None, help="task overrides, e.g. task.window=64 prior=high"),
    family: str | None = typer.Option(None, help="count | count-composition | index-of-occurrence | "
                                                    "index-of-composition | token-value (default: the mix); "
                                                    "count-j1 | count-j2 where task.families names them "
                                                    "(the jailbreak tokens, App. E.2)"),
    operand: str | None = typer.Option(None, help="a | b | c (default: drawn from the prior)"),
    n: int = typer.Option(5, help="number of samples"),
    c_test: float = typer.Option(0.0, "--c-test", help="probability of the spurious edit"),
    seed: int = typer.Option(0),
    preset: str = typer.Option("paper", help="paper (window 250) or cpu (window 64)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
    capability_jsonl: Path | None = typer.Option(None, "--capability-jsonl", help="write the samples as a "
                                                 "capability file instead ({prompt, answer, label} per line: the "
                                                 "model input up to the answer, space-separated tokens)"),
) -> None:
    """Print samples: the model input, the answer, and whether the spurious edit was applied. With
    --capability-jsonl, write them as a capability file for `analyze verdict --capability` (use the preset and
    task overrides of the runs it will judge)."""
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
    if capability_jsonl is not None:
        from wrapperlab.fileio import atomic_write_text

        if capability_jsonl.is_dir() or not capability_jsonl.parent.is_dir():
            _fail(f"--capability-jsonl: {capability_jsonl} is a directory or its folder does not exist; give a file "
                  f"path in an existing folder")

        prompts = task.answer_inputs(b.tokens)
        lines = []
        for i in range(n):
            ans = task.vocab.tokens[b.answer[i]]
            lines.append(json.dumps({"prompt": " ".join(task.vocab.decode(prompts[i])), "answer": ans,
                                     "label": ans}))
        atomic_write_text(capability_jsonl, "\n".join(lines) + "\n")
        out.print(f"wrote {n} records to {capability_jsonl}", highlight=False)
        return
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

    from wrapperlab.report.figures import plot_label_histograms
    from wrapperlab.tasks.spurious import spurious_statistics
    from wrapperlab.training.config import ConfigError

    if n < 1:
        _fail(f"n: must be >= 1, got {n}")
    try:
        task = _task_from(preset, overrides or [])
        cfg = task.config
        results = spurious_statistics(task, family, c, n, seed)
    except (ConfigError, ValueError) as e:
        _fail(str(e))
    if png:
        plot_label_histograms(results, cfg.o_pt, cfg.o_ft, family, png)
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
