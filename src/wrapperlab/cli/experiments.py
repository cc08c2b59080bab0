"""``wrapperlab run | runs | report | reproduce``: experiments as data, the store, the HTML report, and the
one command that turns the paper into evidence."""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import typer

from wrapperlab.cli.common import _fail, err, note_interrupt, out, print_rows, stop_exit_code, stop_signal, user_errors

runs_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                       help="Browse a store: every run with its status, config and final metrics.")

REPRODUCE_PRESETS = ("quick", "full", "paper")
WORKERS_OPT = typer.Option(2, "--workers", help="parallel worker processes (local) or concurrent tasks (ray)")
THREADS_OPT = typer.Option(1, "--threads", help="torch threads per worker (results are bit-identical only for "
                                                "the same thread count)")


SEEDS_OPT = typer.Option(None, "--seeds", help="replicates: run everything under seeds 0..N-1 (every root "
                                                      "run gets the seed axis; derived runs and baselines inherit "
                                                      "it); the claims then read 'k of N seeds'")


def _log(m: str) -> None:
    err.print(m, highlight=False, markup=False)


def with_seeds(spec, n: int | None):
    """``spec`` replicated under seeds 0..n-1 (unchanged when n is None)."""
    from wrapperlab.experiments.spec import parse_spec

    if n is None:
        return spec
    if n < 1:
        _fail(f"--seeds: the number of seeds is at least 1, got {n}")
    with user_errors():
        return parse_spec({**spec.model_dump(mode="json"), "seeds": list(range(n))}, "--seeds")


def execute_spec(spec, out_dir: Path, workers: int, threads: int, executor: str, address: str | None,
                 device: str, dry_run: bool, progress: bool) -> dict:
    """``experiments.run.run_spec`` with its problems as one-line errors (exit 2)."""
    from wrapperlab.experiments.run import run_spec

    with user_errors():
        _, res = run_spec(spec, out_dir, workers=workers, threads=threads, executor=executor, address=address,
                          device=device, dry_run=dry_run, progress=progress, log=_log)
    return res


@contextmanager
def _interrupt_note(out_dir: Path):
    """Ctrl-C or SIGTERM (cli.main turns it into KeyboardInterrupt): by the time it gets here, the workers are
    ended and the runs they held are marked interrupted in the store. One line, exit 130 (SIGINT) or 143."""
    try:
        yield
    except KeyboardInterrupt:
        sig = stop_signal()
        by = f" by {signal.Signals(sig).name}" if sig else ""
        if (out_dir / "store.sqlite").is_file():
            note_interrupt(f"interrupted{by}; finished runs and checkpoints are kept in {out_dir} — run the same "
                           f"command again to resume")
        else:
            note_interrupt(f"interrupted{by} before anything was written to {out_dir}")
        raise typer.Exit(stop_exit_code()) from None


def run_cmd(
    spec_file: Path = typer.Argument(..., help="experiment spec (YAML): run groups with grids, analyses"),
    out_dir: Path = typer.Option(Path("runs/exp"), "--out", help="the store: runs/, store.sqlite, report/"),
    workers: int = WORKERS_OPT,
    threads: int = THREADS_OPT,
    executor: str = typer.Option("local", help="local (process pool) or ray"),
    address: str | None = typer.Option(None, "--ray-address", help="Ray cluster address (default: start a local "
                                                                    "Ray instance)"),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (runs, analyses, what is already done) "
                                                         "and stop"),
    as_json: bool = typer.Option(False, "--json", help="print the outcome as one JSON object"),
    progress: bool = typer.Option(True, help="progress bar with ETA for the whole plan"),
    seeds: int | None = SEEDS_OPT,
) -> None:
    """Plan an experiment spec as a DAG of runs and analyses, reuse what the store already holds, and run the
    rest. A run is identified by its resolved config plus its parent, so a shared pretraining run is computed
    once, and rerunning an interrupted grid resumes where it stopped."""
    from wrapperlab.experiments.spec import load_spec

    with user_errors():
        spec = load_spec(spec_file)
    spec = with_seeds(spec, seeds)
    with _interrupt_note(out_dir):
        res = execute_spec(spec, out_dir, workers, threads, executor, address, device, dry_run, progress)
    _print_outcome(res, as_json)
    if res.get("failed"):
        raise typer.Exit(1)


def _print_outcome(res: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(res))
        return
    if res.get("dry_run"):
        print_rows(res["nodes"], {"kind": "kind", "label": "node", "key": "key", "done": "complete"}, "plan")
        return
    out.print(f"{res['planned']} nodes: {res['reused']} reused, {res['executed']} executed, {res['failed']} failed, "
              f"{res['skipped']} skipped; {res['wall_s']:.0f} s. Store: {res['store']}", highlight=False)
    for key, why in res.get("failures", {}).items():
        out.print(f"  failed {key}: {why}", highlight=False)


@runs_app.command("list")
def runs_list(
    store_dir: Path = typer.Argument(Path("runs/exp"), help="the store (an --out of `wrapperlab run`)"),
    where: list[str] | None = typer.Option(None, "--where", help="key=value filter, repeatable: a column (stage, "
                                                                 "status, label) or any config field (lr, c_train, "
                                                                 "task.prior, train.steps ...)"),
    sync: bool = typer.Option(False, help="re-index every run directory first"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List the runs of a store, filtered by any config field."""
    from wrapperlab.experiments.store import Store, parse_where

    with user_errors():
        filters = parse_where(where or [])
        if sync:  # rebuilds the index when it is corrupt or missing: the run directories are the truth
            store, aside = Store.rebuild(store_dir)
            if aside is not None:
                _log(f"{store.db} was corrupt: moved aside to {aside.name}; rebuilding the index from "
                     f"{store.runs_dir}")
            store.reap_stale()
            n = store.sync()
            if aside is not None:
                _log(f"re-indexed {n} run directories (analysis rows return with the next `wrapperlab run` of "
                     f"their spec)")
        else:
            store = Store(store_dir, create=False)
            store.reap_stale()
        rows = store.runs(filters)
    if as_json:
        print(json.dumps(rows))
        return
    for r in rows:
        r["lr"] = r["config"].get("train", {}).get("lr")
        r["c_train"] = r["config"].get("train", {}).get("c_train")
        fin = {f"{m['operand']}/c{m['c_test']:g}": f"{100 * m['acc']:.1f}" for m in r["metrics"]
               if m.get("family") == (r["config"].get("eval", {}).get("family") or
                                      r["config"].get("train", {}).get("family"))}
        r["final"] = " ".join(f"{k} {v}" for k, v in fin.items())
    print_rows(rows, {"run_id": "run id", "stage": "stage", "status": "status", "label": "label", "lr": "lr",
                      "c_train": "c_train", "final": "final acc %", "wall_s": "wall s"},
               f"{len(rows)} runs in {store_dir}")


@runs_app.command("show")
def runs_show(
    run_id: str = typer.Argument(..., help="a run id (or a unique prefix)"),
    store_dir: Path = typer.Option(Path("runs/exp"), "--store", help="the store"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """One run: its config, final metrics and the analyses stored for it."""
    from wrapperlab.experiments.store import Store

    with user_errors():
        store = Store(store_dir, create=False)
        run = store.run(run_id)
        run["results"] = store.results(run["run_id"])
    if as_json:
        print(json.dumps(run))
        return
    out.print(f"run {run['run_id']} ({run['stage']}, {run['status']}): {run['label'] or ''}\n  dir {run['run_dir']}"
              f"\n  parent {run['parent_id']}", highlight=False)
    out.print(json.dumps(run["config"], indent=1), highlight=False)
    print_rows(run["metrics"], {"family": "family", "operand": "operand", "c_test": "c_test", "acc": "acc %",
                                "majority": "majority %"}, "final metrics")
    for r in run["results"]:
        out.print(f"  {r['tool']}: {r['path']}", highlight=False)


def report_cmd(
    target: Path = typer.Argument(..., help="a store (from `wrapperlab run`/`reproduce`), a run directory, or a "
                                            "folder of runs"),
    out_dir: Path | None = typer.Option(None, "--out", help="where index.html and the PNGs go (default TARGET/report)"),
    title: str | None = typer.Option(None, help="page title"),
    as_json: bool = typer.Option(False, "--json", help="print the claims and the file paths as JSON"),
) -> None:
    """Write one self-contained offline HTML report: the paper's claims beside the evidence measured here
    (reproduced / partial / not reproduced, computed from the stored results), then Figs. 5–10 and the
    Table 3/5 analogs."""
    from wrapperlab.report.build import build_report

    if not target.exists():
        _fail(f"target: {target} does not exist")
    with user_errors():
        res = build_report(target, out_dir, title)
    if as_json:
        print(json.dumps(res))
        return
    print_claims(res["claims"])
    out.print(f"report: {res['path']}", highlight=False)


def print_claims(claims: list[dict]) -> None:
    from wrapperlab.report.build import seeds_note

    print_rows([{**c, "status": c["status"] + (f" ({seeds_note(c)})" if seeds_note(c) else ""),
                 "evidence": c["evidence"][:160] + ("…" if len(c["evidence"]) > 160 else "")} for c in claims],
               {"id": "claim", "status": "status", "paper": "paper", "evidence": "measured here"},
               "claims of the paper, checked against stored results")


def _preset_text(name: str) -> str:
    return resources.files("wrapperlab.data").joinpath("experiments", f"{name}.yaml").read_text()


def reproduce_cmd(
    preset: str = typer.Option("quick", help="quick (core claims, ~15 min on 2 cores), full (the paper's PCFG and "
                                             "Tracr grid at CPU scale, docs/experiments.md; hours, resumable), "
                                             "paper (the paper's scale, for --device cuda)"),
    out_dir: Path = typer.Option(Path("runs/reproduce"), "--out", help="where runs, the store and the report go"),
    workers: int = WORKERS_OPT,
    threads: int = THREADS_OPT,
    executor: str = typer.Option("local", help="local or ray"),
    address: str | None = typer.Option(None, "--ray-address"),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]"),
    show_spec: bool = typer.Option(False, "--show-spec", help="print the preset's experiment spec (YAML) and stop"),
    as_json: bool = typer.Option(False, "--json", help="print the outcome and the claims as one JSON object"),
    progress: bool = typer.Option(True, help="progress bar with ETA for the whole plan"),
    stories: bool = typer.Option(False, "--stories", help="also run the TinyStories protocol (`stories table`, "
                                                          "cpu preset, ~30 min on 2 cores) into OUT/stories; its "
                                                          "claims join the report"),
    prior: bool = typer.Option(False, "--prior", help="quick only: also pretrain under the high prior and "
                                                       "fine-tune it beside the low-prior model, so the `prior` "
                                                       "claim is measured (~1.5x quick's wall time, "
                                                       "docs/experiments.md; full and paper include it)"),
    seeds: int | None = SEEDS_OPT,
) -> None:
    """Reproduce the paper: run the preset's experiment spec (runs, analyses), then write the HTML report and
    print the claims table. Interrupt it any time; the same command resumes."""
    from wrapperlab.experiments.spec import parse_spec
    from wrapperlab.report.build import build_report

    if preset not in REPRODUCE_PRESETS:
        _fail(f"--preset: unknown {preset!r}; choose from {', '.join(REPRODUCE_PRESETS)}")
    if prior and preset != "quick":
        _fail(f"--prior: the {preset} preset already pretrains under the high prior; --prior adds it to quick")
    import yaml

    data = yaml.safe_load(_preset_text(preset))
    if prior:
        extra = yaml.safe_load(_preset_text("quick-prior"))
        data["runs"].update(extra["runs"])
        data["analyses"] += extra["analyses"]
        data["name"] = "quick-prior"
    if show_spec:
        if prior:  # YAML 1.1 reads a bare `on:` key as true; write it back as `on`
            data["analyses"] = [{("on" if k is True else k): v for k, v in a.items()} for a in data["analyses"]]
        print(_preset_text(preset) if not prior else yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        return
    with user_errors():
        spec = parse_spec(data, f"preset {preset}" + (" with --prior" if prior else ""))
    spec = with_seeds(spec, seeds)
    if stories and preset == "paper":
        _fail("--stories: the paper-scale TinyStories protocol needs real shards and a judge: run `wrapperlab "
              "stories table --preset paper --data SHARDS --judge JUDGE --out OUT/stories`")
    with _interrupt_note(out_dir):
        res = execute_spec(spec, out_dir, workers, threads, executor, address, device, False, progress)
        if stories:
            from wrapperlab.cli.common import err
            from wrapperlab.experiments import stories_table as ST

            with user_errors():
                ST.run_table(ST.preset("cpu"), out_dir / "stories", workers=workers, threads=threads,
                             seeds=tuple(spec.seeds) or (0,),
                             executor=executor, address=address,
                             log=None if as_json or not progress
                             else (lambda s: err.print(s, highlight=False, markup=False)))
    with user_errors():
        rep = build_report(out_dir, out_dir / "report",
                           f"wrapperlab reproduce --preset {preset}" + (" --prior" if prior else ""))
    if as_json:
        print(json.dumps({**res, "report": rep["path"], "claims": rep["claims"]}))
    else:
        _print_outcome(res, False)
        print_claims(rep["claims"])
        out.print(f"report: {rep['path']}", highlight=False)
    if res.get("failed"):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
    app.add_typer(runs_app, name="runs")
    app.command("report")(report_cmd)
    app.command("reproduce")(reproduce_cmd)
