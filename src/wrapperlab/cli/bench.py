"""``wrapperlab bench``: the speed benchmarks (docs/speed.md), each a ratio against a baseline timed in the same run."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from wrapperlab.cli.common import _fail, err, out

BENCHES = ("train", "sampling", "analysis", "reproduce")
TARGETS = {"train": 1.5, "sampling": 10.0, "reproduce": 900.0}


def bench_cmd(
    names: list[str] | None = typer.Argument(None, help=f"which benchmarks: {', '.join(BENCHES)} (default: all; "
                                                         "reproduce alone takes ~15 min)", show_default=False),
    shape: str = typer.Option("paper", help="train: model shape and batch of the paper or cpu preset"),
    rounds: int = typer.Option(3, help="train: alternating rounds (wrapperlab, reference) per comparison"),
    steps: int = typer.Option(4, help="train: timed steps per round (after 2 warm-up steps)"),
    threads: int = typer.Option(2, help="torch threads for every measurement (both sides alike)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object (a single benchmark: its own result)"),
) -> None:
    """Measure training (against the hand-written reference step, same shape and batch, alternating), PCFG
    sampling (against what training consumes), analysis tools (against a bare forward) and the end-to-end quick
    reproduction (against its 15-minute target); print a table or JSON."""
    from wrapperlab.bench import analysis, reproduce, sampling, train
    from wrapperlab.bench.common import BenchError

    names = names or list(BENCHES)
    bad = [n for n in names if n not in BENCHES]
    if bad:
        _fail(f"bench: unknown benchmark {bad[0]!r}; choose from {', '.join(BENCHES)}")
    if shape not in train.SHAPES:
        _fail(f"--shape: choose from {', '.join(train.SHAPES)}, not {shape!r}")
    for name, v in (("--rounds", rounds), ("--steps", steps), ("--threads", threads)):
        if v < 1:
            _fail(f"{name}: must be >= 1 (got {v})")
    log = (lambda s: None) if as_json else (lambda s: err.print(s, highlight=False, markup=False))
    results = {}
    try:
        for n in names:
            log(f"bench {n} ...")
            if n == "train":
                results[n] = train.compare(shape, rounds, steps, 2, threads, log=log)
            elif n == "sampling":
                results[n] = sampling.measure(threads=threads)
            elif n == "analysis":
                results[n] = analysis.measure(threads=threads)
            else:
                results[n] = reproduce.measure("quick")
    except (BenchError, RuntimeError, ValueError) as e:
        _fail(f"bench: {e}")
    if as_json:
        print(json.dumps(results[names[0]] if len(names) == 1 else results))
        return
    out.print(_table(results))


def _table(results: dict) -> Table:
    t = Table(title="wrapperlab bench (ratios measured in this run)")
    for col in ("benchmark", "measured", "baseline (same run)", "ratio", "target"):
        t.add_column(col)
    if "train" in results:
        r = results["train"]
        t.add_row(f"train step, {r['shape']} shape ({r['model']}, batch {r['batch']}, {r['precision']})",
                  f"{r['tokens_per_s']:,.0f} tok/s, {r['gflop_per_s']} GFLOP/s",
                  f"reference {r['reference_tokens_per_s']:,.0f} tok/s", f"{r['ratio_vs_reference']:.2f}x",
                  f">= {TARGETS['train']}x")
        if "ratio_vs_own_fp32" in r:
            t.add_row(f"  {r['precision']} vs fp32 (own loop)", "", "", f"{r['ratio_vs_own_fp32']:.2f}x", "")
        if "finetune_ratio_vs_head_everywhere" in r:
            t.add_row("  fine-tune step, answer-only head", f"{r['finetune_tokens_per_s']:,.0f} tok/s",
                      "head at every position", f"{r['finetune_ratio_vs_head_everywhere']:.2f}x", "")
        if "peak_fp32_gflop_per_s" in r:
            t.add_row("  matmul peak fp32 / bf16", f"{r['peak_fp32_gflop_per_s']} / {r['peak_bf16_gflop_per_s']} "
                      "GFLOP/s", "", f"{r['fraction_of_peak']:.0%} of peak", "")
    if "sampling" in results:
        r = results["sampling"]
        t.add_row(f"PCFG sampling (window {r['window']})", f"{r['sample_finetune_c1_seq_per_s']:,.0f} seq/s (c=1)",
                  f"training consumes {r['train_consumes_seq_per_s']:,.0f} seq/s",
                  f"{min(r['ratio_mix'], r['ratio_finetune']):,.0f}x", f">= {TARGETS['sampling']:.0f}x")
    if "analysis" in results:
        r = results["analysis"]
        for name, x in r["tools"].items():
            share = f"{x['forward_share']:.0%} in forwards" if "forward_share" in x else ""
            t.add_row(f"analysis {name} ({x.get('settings', '')})", f"{x['wall_s']} s",
                      f"bare forward {r['bare_forward_seq_per_s']:,.0f} seq/s" if share else "", share, "")
    if "reproduce" in results:
        r = results["reproduce"]
        t.add_row("reproduce --preset quick", f"{r['wall_s']:.0f} s ({r['outcome'].get('executed')} runs)",
                  "", f"{r['wall_s'] / TARGETS['reproduce']:.2f} of target", f"<= {TARGETS['reproduce']:.0f} s")
    return t


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_cmd)
