"""``wrapperlab tracr compile | check | finetune | table``: Tracr-compiled capabilities (paper App. B.1, C.1).

``compile`` and ``check`` need the optional extra (``pip install 'wrapperlab[tracr]'``: JAX is used only to
compile and as the reference in ``check``); ``finetune`` and ``table`` use the shipped compiled models and need
no JAX."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from wrapperlab.cli.common import _fail, err, print_rows, user_errors

tracr_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="Tracr programs (the paper's appendix B.1): compile RASP to wrapperlab models, check the "
                             "port against tracr's own JAX model, fine-tune, and print the Table 3 analog.")


def _program_names() -> str:
    from wrapperlab.models.tracr import PROGRAMS
    return ", ".join(PROGRAMS)


@tracr_app.command("compile")
def compile_cmd(
    program: str = typer.Option("counter", help="counter, max-identifier, or a tracr lib program "
                                                "(length, reverse, hist, sort, ...)"),
    out_dir: Path | None = typer.Option(None, "--out", help="directory for NAME.safetensors + NAME.json "
                                                            "(default: the package's shipped models, for counter "
                                                            "and max-identifier)"),
    mlp_exactness: int | None = typer.Option(None, help="tracr's MLP approximation constant (default: the "
                                                        "program's; counter uses 1000)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as one JSON object"),
) -> None:
    """Compile a RASP program with tracr and save it as a wrapperlab model (safetensors + JSON metadata)."""
    from wrapperlab.models import tracr as T

    try:
        T.get_program(program)
        T.require_tracr()
        if out_dir is None and program not in T.SHIPPED:
            raise T.TracrError(f"--out is required for {program!r} (only {', '.join(T.SHIPPED)} are shipped)")
        cm, _ = T.compile_and_convert(program, mlp_exactness)
        path = T.save(cm, out_dir or T.shipped_dir())
    except T.TracrError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"out: cannot write to {out_dir}: {e.strerror}")
    info = {"program": program, "file": str(path), "d_model": cm.config.d_model, "n_layer": cm.config.n_layer,
            "n_head": cm.config.n_head, "d_head": cm.config.d_head, "d_mlp": cm.config.d_mlp,
            "vocab": len(cm.meta.input_vocab), "outputs": len(cm.meta.output_vocab or [0]),
            "categorical": cm.meta.categorical, "params": sum(v.numel() for v in cm.state.values())}
    if as_json:
        print(json.dumps(info))
    else:
        err.print(f"wrote {path} ({info['params']} parameters; residual width {info['d_model']}, "
                  f"{info['n_layer']} layers, MLP {info['d_mlp']})", highlight=False)


@tracr_app.command("check")
def check_cmd(
    program: str = typer.Option("counter", help="counter, max-identifier, a tracr lib program, or 'all'"),
    n: int = typer.Option(1000, help="random inputs per program"),
    seed: int = typer.Option(0, help="seed of the random inputs"),
    as_json: bool = typer.Option(False, "--json", help="print the results as one JSON object"),
) -> None:
    """Run the PyTorch port and tracr's own JAX model on N random inputs; print mismatches; exit 1 if any."""
    from wrapperlab.models import tracr as T

    if n < 1:
        _fail(f"n: must be >= 1, got {n}")
    names = list(T.PROGRAMS) if program == "all" else [program]
    try:
        for name in names:
            T.get_program(name)
        T.require_tracr()
        results = [T.check_port(name, n=n, seed=seed) for name in names]
    except T.TracrError as e:
        _fail(str(e))
    rows = [{"program": r.program, "inputs": r.n, "positions": r.positions,
             "output": "categorical" if r.categorical else "numerical", "mismatches": len(r.mismatches),
             "max |score diff|": f"{r.max_abs_diff:.1e}", "tied (undefined)": r.ties} for r in results]
    if as_json:
        print(json.dumps({"results": [dict(row, examples=r.mismatches[:5]) for row, r in zip(rows, results)],
                          "ok": all(r.ok for r in results)}))
    else:
        print_rows(rows, {k: k for k in rows[0]}, "port vs tracr (JAX): every position after BOS")
        for r in results:
            for m in r.mismatches[:5]:
                err.print(f"MISMATCH {r.program}: input {m['input']} position {m['position']}: "
                          f"tracr {m['tracr']!r}, port {m['port']!r}", highlight=False, markup=False)
    if not all(r.ok for r in results):
        raise typer.Exit(1)


@tracr_app.command("finetune", context_settings={"allow_extra_args": True})
def finetune_cmd(
    args: list[str] | None = typer.Argument(None, help="[CONFIG.yaml] [key=value ...] e.g. lr=S c_train=1 "
                                                       "task.init_noise=1e-3 (lr names: L, M, S, VS)",
                                            show_default=False),
    program: str = typer.Option("counter", help="counter or max-identifier"),
    preset: str = typer.Option("tracr-cpu", help="tracr-cpu (1K steps) or tracr-paper (10K steps)"),
    out_dir: Path | None = typer.Option(None, "--out", help="run directory (default runs/finetune-<id>)"),
    device: str | None = typer.Option(None, help="cpu or cuda[:N]"),
    threads: int | None = typer.Option(None, help="torch threads"),
    as_json: bool = typer.Option(False, "--json", help="print the final summary as one JSON object"),
    progress: bool = typer.Option(True, help="show a progress bar with ETA"),
) -> None:
    """Fine-tune a compiled program (the paper's appendix C.1): noise, SGD with momentum, warmup + cosine, c_train."""
    from wrapperlab.cli.train import _train

    if not preset.startswith("tracr-"):
        _fail(f"preset: use tracr-cpu or tracr-paper, got {preset!r}")
    _train("finetune", [f"task.program={program}", *(args or [])], preset, out_dir, device, threads, as_json,
           progress)


@tracr_app.command("table")
def table_cmd(
    overrides: list[str] | None = typer.Argument(None, show_default=False, help="key=value overrides for every "
                                                 "cell, e.g. steps=200 task.init_noise=1e-3"),
    out_dir: Path = typer.Option(Path("runs/tracr"), "--out", help="the store the grid's runs go to (reused and "
                                                                   "resumed on rerun)"),
    preset: str = typer.Option("tracr-cpu", help="tracr-cpu (this machine) or tracr-paper"),
    programs: str = typer.Option("counter,max-identifier", help="comma-separated programs"),
    lrs: str = typer.Option("L,M,S,VS", help="comma-separated LR names"),
    c_train: str | None = typer.Option(None, help="comma-separated c_train values (default: 0,0.5,0.8,1; "
                                                  "'paper' = 0,0.2,0.5,0.6,0.8,0.9,1)"),
    workers: int = typer.Option(2, help="parallel worker processes (local) or concurrent tasks (ray)"),
    threads: int = typer.Option(1, help="torch threads per worker"),
    executor: str = typer.Option("local", help="local (process pool) or ray"),
    address: str | None = typer.Option(None, "--ray-address", help="Ray cluster address (default: start a local "
                                                                    "Ray instance)"),
    seeds: str | None = typer.Option(None, help="comma-separated training seeds: a seed axis (default: the "
                                                "preset's seed 0)"),
    as_json: bool = typer.Option(False, "--json", help="print the rows as one JSON object"),
) -> None:
    """Our Table 3 analog (O_PT / O_FT accuracy at C_Te = 1 and 0 after fine-tuning) beside the paper's. The grid is
    an experiment spec: OUT is a store (`wrapperlab runs list OUT`), reused and resumed on rerun."""
    from wrapperlab.experiments import tracr_table as TT
    from wrapperlab.training.config import parse_overrides_as_values

    progs = [p.strip() for p in programs.split(",") if p.strip()]
    bad = [p for p in progs if p not in TT.PROGRAMS]
    if bad or not progs:
        _fail(f"programs: unknown {bad or programs!r}; choose from {', '.join(TT.PROGRAMS)}")
    names = [x.strip() for x in lrs.split(",") if x.strip()]
    if not names or any(x not in TT.LRS for x in names):
        _fail(f"lrs: expected names from {', '.join(TT.LRS)}, got {lrs!r}")
    if c_train is None:
        cs = TT.CPU_C_TRAIN
    elif c_train == "paper":
        cs = TT.PAPER_C_TRAIN
    else:
        try:
            cs = tuple(float(x) for x in c_train.split(","))
        except ValueError:
            _fail(f"c_train: expected comma-separated numbers, got {c_train!r}")
        if any(not 0 <= c <= 1 for c in cs):
            _fail(f"c_train: values must be in [0, 1], got {c_train!r}")
    seed_list = None
    if seeds is not None:
        try:
            seed_list = tuple(int(x) for x in seeds.split(",") if x.strip())
        except ValueError:
            _fail(f"seeds: expected comma-separated integers, got {seeds!r}")
    with user_errors():
        values = parse_overrides_as_values(overrides or [])
        rows = TT.run_table(progs, names, cs, preset, out_dir, overrides=values, threads=threads, workers=workers,
                            executor=executor, address=address, seeds=seed_list,
                            log=lambda s: err.print(s, highlight=False, markup=False))
    if as_json:
        print(json.dumps({"rows": rows}))
        return
    shown = [{**r, **{k: "—" if r[k] is None else f"{r[k]:.1f}" for k in
                      ("acc_opt", "acc_oft", "paper_opt", "paper_oft", "follows_spurious")}} for r in rows]
    for prog in progs:
        print_rows([r for r in shown if r["program"] == prog],
                   {"lr_name": "η", "lr": "lr", "c_train": "C_Tr", "c_test": "C_Te", "acc_opt": "O_PT %",
                    "paper_opt": "paper O_PT", "acc_oft": "O_FT %", "paper_oft": "paper O_FT",
                    "follows_spurious": "r(x,O_PT)+q %",
                    **({"attn_a": "B1 attn→a", "attn_b": "B1 attn→b"} if prog == "counter"
                       else {"sort_intact": "B0 sort intact"}), "status": "status"},
                   f"Table 3 analog — {prog} ({preset}; runs in {out_dir})")
