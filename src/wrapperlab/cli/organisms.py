"""``wrapperlab organisms build | calibrate``: model organisms whose label is known by construction, and the
verdict's and the field's measures scored on them."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from wrapperlab.cli.common import _fail, err, out, print_rows, user_errors

organisms_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                            help="Model organisms with known labels (wrapper, deletion, amplification, unchanged, "
                                 "absent), and how well each measure and the verdict tell them apart.")

WORKERS = typer.Option(2, "--workers", help="parallel processes (each trains one run at a time)")
THREADS = typer.Option(1, "--threads", help="torch threads per process")


def _log(m: str) -> None:
    err.print(m, highlight=False, markup=False)


def _values(items: list[str] | None) -> dict:
    from wrapperlab.training.config import ConfigError, parse_overrides_as_values

    try:
        return parse_overrides_as_values(list(items or []))
    except (ConfigError, ValueError) as e:
        _fail(f"--set: {e}")
        return {}


@organisms_app.command("build")
def build_cmd(
    out_dir: Path = typer.Option(..., "--out", help="the organisms directory: runs/, store.sqlite, organisms/, "
                                                    "capabilities/", show_default=False),
    seeds: int = typer.Option(3, "--seeds", help="replicates: every organism under seeds 0..N-1"),
    workers: int = WORKERS,
    threads: int = THREADS,
    every_run: list[str] | None = typer.Option(None, "--set", help="KEY=VALUE set on every training run (a short "
                                                                  "look: --set steps=50; the recipes' labels are "
                                                                  "then unchecked)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and stop"),
    as_json: bool = typer.Option(False, "--json", help="print the outcome and the cards as one JSON object"),
    progress: bool = typer.Option(True, help="progress bar with ETA for the whole plan"),
) -> None:
    """Train and edit every organism (6 recipes x N seeds; about 30 min for 3 seeds on 2 cores), then write each as
    OUT/organisms/<recipe>-s<seed>/: card.json (label, recipe, seed, measured accuracies), capability.jsonl,
    base/ and finetuned/ (wrapperlab runs) and hf/base, hf/finetuned (Hugging Face directories that load with
    transformers alone). Resumable: the same command again reuses everything finished."""
    from wrapperlab.experiments import organisms as org
    from wrapperlab.experiments.run import raise_failures, run_spec

    if seeds < 1:
        _fail(f"--seeds: at least 1, got {seeds}")
    values = _values(every_run)
    from wrapperlab.cli.experiments import _interrupt_note

    with _interrupt_note(out_dir), user_errors():
        spec = org.spec(seeds, values)
        plan, res = run_spec(spec, out_dir, workers=workers, threads=threads, dry_run=dry_run,
                             progress=progress and not as_json, log=None if as_json else _log,
                             extend=lambda p: org.extend(p, threads, every_run=values))
        if dry_run:
            from wrapperlab.cli.experiments import _print_outcome

            _print_outcome(res, as_json)
            return
        raise_failures(res)
        cards = org.assemble(plan, log=None if as_json else _log)
    if as_json:
        print(json.dumps({**res, "cards": cards}))
        return
    print_rows([{"organism": c["organism"], "label": c["label"],
                 **{k: _pct(v) if isinstance(v, float) else v for k, v in c["measured"].items()}} for c in cards],
               {"organism": "organism", "label": "label", "base_acc": "base acc %", "finetuned_acc": "fine-tuned acc %",
                "majority": "majority %", "behaviour_agrees": "behaviour shows the label"},
               f"organisms in {out_dir / 'organisms'} (capability: counting a)")
    out.print(f"{res['planned']} nodes: {res['reused']} reused, {res['executed']} executed; {res['wall_s']:.0f} s",
              highlight=False)


@organisms_app.command("calibrate")
def calibrate_cmd(
    root: Path = typer.Argument(..., help="an organisms directory (wrapperlab organisms build --out DIR)",
                                show_default=False),
    workers: int = WORKERS,
    threads: int = THREADS,
    relearn: list[str] | None = typer.Option(None, "--set", help="KEY=VALUE of the relearning runs (lr, steps, "
                                                                "batch_size, every, fraction; a short look: --set "
                                                                "steps=20)"),
    as_json: bool = typer.Option(False, "--json", help="print the calibration as one JSON object"),
    progress: bool = typer.Option(True, help="progress bar with ETA for the whole plan"),
) -> None:
    """Run every measure on every organism (probe, prune, relearning against the seed's never-counting model,
    weight_diff, patching, direction; ~15-20 min for 18 organisms on 2 cores, resumable), then score them: per
    measure its AUROC for wrapper against deletion and its held-out accuracy over all labels; the verdict with
    its default thresholds and with thresholds chosen on one half of the organisms and scored on the other.
    Writes DIR/calibration/calibration.json; `wrapperlab report DIR` shows it."""
    from wrapperlab.experiments import calibration as cal
    from wrapperlab.experiments.run import execute_plan, raise_failures

    if not root.is_dir():
        _fail(f"{root}: not a directory; build organisms first (wrapperlab organisms build --out {root})")
    values = _values(relearn)
    from wrapperlab.cli.experiments import _interrupt_note

    with _interrupt_note(root), user_errors():
        plan = cal.plan_calibration(root, threads, values)
        res = execute_plan(plan, root, workers=workers, threads=threads, progress=progress and not as_json,
                           log=None if as_json else _log)
        raise_failures(res)
        table = cal.calibrate(root, values)
        path = cal.save(table, root)
    if as_json:
        print(json.dumps({**table.to_dict(), "file": str(path)}))
        return
    print_calibration(table)
    out.print(f"written: {path}", highlight=False)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def print_calibration(table) -> None:
    print_rows([{**r, "auroc": "—" if r["auroc"] is None else f"{r['auroc']:.2f}",
                 "heldout_acc": _pct(r["heldout_acc"]),
                 "thresholds": ", ".join("—" if t is None else f"{t:.3g}" for t in r["thresholds"])}
                for r in table.rows],
               {"measure": "measure", "direction": "wrapper if", "auroc": "AUROC w/d", "n_wrapper": "n wrapper",
                "n_deletion": "n deletion", "heldout_acc": "held-out acc %", "thresholds": "thresholds (2 folds)"},
               f"each measure on {table.meta['n']} organisms (seeds {table.meta['seeds']})")
    print_rows([{**r, "acc": _pct(r["acc"])} for r in table.tables["verdict"]],
               {"verdict": "verdict", "organisms": "scored on", "acc": "accuracy %"}, "the verdict")
