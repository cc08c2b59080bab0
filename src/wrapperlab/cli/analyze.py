"""``wrapperlab analyze probe | prune | attention | revival | verdict RUN``: the mechanistic toolkit
(paper App. D) on a run directory. Each command writes its table (JSON) and figure(s) (PNG) to ``--out``
(default ``RUN/analysis``) and prints the table, or one JSON object with ``--json``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from wrapperlab.cli.common import _fail, err, out, print_rows, user_errors

analyze_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="Tell a wrapper from a deletion: probes, pruning, attention maps, revival by reverse "
                               "fine-tuning, and a verdict combining them (paper App. D).")

RUN_ARG = typer.Argument(..., help="run directory (a finished wrapperlab run)", show_default=False)
OUT_OPT = typer.Option(None, "--out", help="where the table and figures go (default RUN/analysis)")
JSON_OPT = typer.Option(False, "--json", help="print the result as one JSON object")


def _out_dir(run: Path, out_dir: Path | None) -> Path:
    if not run.is_dir():
        _fail(f"run: {run} is not a run directory")
    return out_dir or run / "analysis"


def _ints(text: str | None, name: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"{name}: expected comma-separated integers, got {text!r}")


def _threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _emit(result, as_json: bool, files: list[Path]) -> None:
    if as_json:
        print(json.dumps({**result.to_dict(), "files": [str(f) for f in files]}))
    else:
        out.print("written: " + ", ".join(str(f) for f in files), highlight=False)


@analyze_app.command("probe")
def probe_cmd(
    run: Path = RUN_ARG,
    out_dir: Path | None = OUT_OPT,
    family: str | None = typer.Option(None, help="task family probed (default: the run's)"),
    n_train: int | None = typer.Option(None, help="probe training samples (cpu preset 4000, paper 20000)"),
    n_test: int | None = typer.Option(None, help="held-out samples (cpu 1000, paper 2000)"),
    iters: int | None = typer.Option(None, help="AdamW iterations, LR x0.1 at 50/75/87.5 % (cpu 1500, paper 4000)"),
    controls: bool = typer.Option(True, help="also probe the pretrained ancestor and a random-init model"),
    seed: int = typer.Option(0),
    threads: int | None = typer.Option(None, help="torch threads"),
    as_json: bool = JSON_OPT,
) -> None:
    """Linear probes per block (B0 = embedding output) for the O_PT and O_FT answers at the position that
    predicts the answer; with the pretrained model and a random-init model as controls (paper Fig. 8)."""
    from wrapperlab.analysis.registry import analyze
    from wrapperlab.report.figures import plot_probe

    od = _out_dir(run, out_dir)
    _threads(threads)
    given = {"n_train": n_train, "n_test": n_test, "iters": iters, "seed": seed, "family": family,
             "controls": controls}
    with user_errors():
        res = analyze("probe", run, settings={k: v for k, v in given.items() if v is not None})
    files = [res.save(od / "probe.json"), plot_probe(res.rows, od / "probe.png", f"probes: {run}")]
    if not as_json:
        print_rows(res.tables["summary"], {"model": "model", "target": "target", "best_layer": "best layer",
                                           "acc": "probe acc %", "majority": "majority %"}, f"probes of {run}")
        layers = sorted({r["layer_index"] for r in res.rows})
        wide = []
        for (m, t) in dict.fromkeys((r["model"], r["target"]) for r in res.rows):
            row = {"model": m, "target": t}
            for r in res.where(model=m, target=t):
                row[r["layer"]] = f"{100 * r['acc']:.1f}"
            wide.append(row)
        print_rows(wide, {"model": "model", "target": "target", **{f"B{i}": f"B{i}" for i in layers}},
                   "accuracy % per layer")
    _emit(res, as_json, files)


@analyze_app.command("prune")
def prune_cmd(
    run: Path = RUN_ARG,
    out_dir: Path | None = OUT_OPT,
    k_max: int = typer.Option(15, help="sweep K = 0..k_max (paper: 15, or 100)"),
    ks: str | None = typer.Option(None, help="explicit comma-separated K values instead of 0..k_max"),
    unit: str = typer.Option("neuron", help="neuron (a row of a weight matrix, with its bias) or weight"),
    matrices: str = typer.Option("", help="comma-separated candidate matrices in every block (default: the model "
                                          "family's: gpt attn.qkv,attn.proj,mlp.fc,mlp.proj; llama attn.wq..mlp.w3; "
                                          "lstm lstm.ih,lstm.hh)"),
    n_grad: int = typer.Option(1024, help="samples for the pruning gradient"),
    n_eval: int = typer.Option(500, help="samples per evaluation set"),
    seed: int = typer.Option(0),
    threads: int | None = typer.Option(None, help="torch threads"),
    as_json: bool = JSON_OPT,
) -> None:
    """Single-step grad·w pruning on the pretraining-task loss: zero the global top-K units and measure O_PT and
    O_FT accuracy at c_test 0 and 1 against K, where the units sit, and the predicted-class histogram (Figs. 7, 59)."""
    from wrapperlab.analysis.registry import analyze
    from wrapperlab.report.figures import plot_prune

    od = _out_dir(run, out_dir)
    if k_max < 0:
        _fail(f"k_max: must be >= 0, got {k_max}")
    _threads(threads)
    with user_errors():
        res = analyze("prune", run, ks=tuple(_ints(ks, "ks") or range(k_max + 1)), unit=unit,
                      matrices=tuple(m.strip() for m in matrices.split(",") if m.strip()), n_grad=n_grad,
                      n_eval=n_eval, seed=seed)
    s = res.meta["settings"]
    files = [res.save(od / "prune.json"),
             plot_prune(res.rows, res.tables["histogram"], od / "prune.png", f"pruning ({unit}s): {run}")]
    if not as_json:
        wide: dict[int, dict] = {}
        for r in res.rows:
            wide.setdefault(r["k"], {"k": r["k"]})[f"{r['target']}/{r['operand']}/c{r['c_test']:g}"] = \
                f"{100 * r['acc']:.1f}"
        cols = {"k": "K", **{k: k for k in next(iter(wide.values())) if k != "k"}}
        print_rows(list(wide.values()), cols, f"accuracy % after pruning the top-K {unit}s of {run}")
        print_rows(res.tables["units"][:max(s["ks"])], {"rank": "rank", "block": "block", "matrix": "matrix",
                                                     "kind": "kind", "index": "index", "score": "grad·w"},
                   "pruned units, in order")
    _emit(res, as_json, files)


@analyze_app.command("attention")
def attention_cmd(
    run: Path = RUN_ARG,
    out_dir: Path | None = OUT_OPT,
    family: str | None = typer.Option(None, help="task family of the input (default: the run's)"),
    operand: str | None = typer.Option(None, help="operand of the input (default: O_PT)"),
    c_test: float = typer.Option(0.0, help="spurious rate of the sampled input"),
    average: int = typer.Option(0, help="average over this many samples (0 = one example)"),
    index: int = typer.Option(0, help="which sample to show when not averaging"),
    layers: str | None = typer.Option(None, help="comma-separated blocks (default all)"),
    seed: int = typer.Option(0),
    as_json: bool = JSON_OPT,
) -> None:
    """Attention maps per block and head for one example (token labels) or averaged over a batch; PNG plus a
    self-contained interactive HTML view. The table lists where the ART query (which predicts the answer)
    puts its attention, by key token."""
    from wrapperlab.analysis.registry import analyze
    from wrapperlab.report.figures import plot_attention
    from wrapperlab.report.html import attention_page

    od = _out_dir(run, out_dir)
    with user_errors():
        lays = _ints(layers, "layers")
        res = analyze("attention", run, family=family, operand=operand, c_test=c_test, average=average, index=index,
                      layers=tuple(lays) if lays else None, seed=seed)
    what = f"mean of {average} samples" if average else f"sample {index}: {family or 'the run family'} " \
                                                         f"{operand or 'O_PT'}"
    pat = res.arrays["pattern"]
    files = [res.save(od / "attention.json"),
             plot_attention(pat, res.meta["labels"], res.meta["layers"], od / "attention.png", f"{run} — {what}"),
             attention_page(pat, res.meta["labels"], res.meta["layers"], od / "attention.html",
                            f"attention maps: {run}", what)]
    if not as_json:
        top = sorted(res.rows, key=lambda r: (r["layer"], r["head"], -r["mass"]))
        shown, seen = [], {}
        for r in top:
            key = (r["layer"], r["head"])
            if seen.get(key, 0) < 3:
                shown.append(r)
                seen[key] = seen.get(key, 0) + 1
        print_rows(shown, {"layer": "block", "head": "head", "key_token": "key token", "mass": "attention mass"},
                   f"top-3 key tokens of the ART query ({what})")
    _emit(res, as_json, files)


@analyze_app.command("revival")
def revival_cmd(
    run: Path = RUN_ARG,
    out_dir: Path | None = OUT_OPT,
    lr: str | None = typer.Option(None, help="reFT LR: a name (S, VS, ...) or a number; default the preset's "
                                             "reFT LR if below the fine-tuning LR, else the next named LR below"),
    steps: int | None = typer.Option(None, help="reFT (and baseline) steps (default: the preset's reFT steps)"),
    baselines: str = typer.Option("scr+ft,scr", help="comma-separated: scr+ft, scr (empty for none)"),
    scratch_steps: int | None = typer.Option(None, help="steps of the from-scratch O_FT model behind Scr.+FT "
                                                        "(default: the preset's scratch steps)"),
    fraction: float = typer.Option(0.9, help="target = this fraction of the pretrained model's O_PT accuracy"),
    threads: int | None = typer.Option(None, help="torch threads"),
    progress: bool = typer.Option(True, help="progress bars"),
    as_json: bool = JSON_OPT,
) -> None:
    """Reverse fine-tune a fine-tuned run on the pretraining task and train the Scr.+FT and Scr. baselines
    with the same recipe (reusing finished runs under OUT/revival); curves of O_PT accuracy against steps
    (log x, Fig. 9) and the steps each needs to reach the target."""
    from wrapperlab.analysis.registry import Context, analyze
    from wrapperlab.report.figures import plot_revival

    od = _out_dir(run, out_dir)
    lr_v: float | str | None = lr
    if lr is not None:
        try:
            lr_v = float(lr)
        except ValueError:
            lr_v = lr
    with user_errors():
        ctx = Context(out=od / "revival", progress=progress and not as_json,
                      log=lambda m: err.print(m, highlight=False, markup=False))
        res = analyze("revival", run, context=ctx, lr=lr_v, steps=steps, fraction=fraction, threads=threads or 0,
                      baselines=tuple(b for b in baselines.split(",") if b.strip()), scratch_steps=scratch_steps)
    files = [res.save(od / "revival.json"),
             plot_revival(res.rows, res.meta["target"], od / "revival.png", f"revival: {run}")]
    if not as_json:
        print_rows(res.tables["summary"], {"curve": "curve", "lr": "lr", "start_acc": "start %",
                                           "final_acc": "final %", "target": "target %",
                                           "steps_to_target": "steps to target", "steps": "steps run"},
                   f"revival of {run} (O_PT accuracy, c_test=0; — = not reached)")
    _emit(res, as_json, files)


@analyze_app.command("verdict")
def verdict_cmd(
    run: Path = RUN_ARG,
    out_dir: Path | None = OUT_OPT,
    threshold: list[str] | None = typer.Option(None, "--set", help="threshold=value, e.g. --set prune_gain=0.4 "
                                                                   "(see the table for names and defaults)"),
    revival: bool = typer.Option(True, help="include revival (trains reFT and baselines if not done yet)"),
    threads: int | None = typer.Option(None, help="torch threads"),
    as_json: bool = JSON_OPT,
) -> None:
    """wrapper / deletion / amplification / unchanged for a fine-tuned run, with every piece of evidence and
    the threshold it was held to. Reuses probe.json, prune.json and revival.json from --out when present and
    computes the missing ones with their default settings."""
    from wrapperlab.analysis.registry import Context, analyze, gather_inputs, get_analysis
    from wrapperlab.training.checkpoint import read_sidecar

    od = _out_dir(run, out_dir)
    values: dict = {}
    for item in threshold or []:
        key, sep, val = item.partition("=")
        if not sep or key not in get_analysis("verdict").setting_names():
            _fail(f"--set: expected NAME=VALUE with NAME in {', '.join(get_analysis('verdict').setting_names())}, "
                  f"got {item!r}")
        values[key] = val
    _threads(threads)

    def log(m: str) -> None:
        err.print(m, highlight=False, markup=False)

    with user_errors():
        th = get_analysis("verdict").make_settings(values)
        side = read_sidecar(run)
        if side.get("stage") != "finetune":
            _fail(f"run: verdict needs a finetune run; {run} is a {side.get('stage')} run")
        inputs = gather_inputs("verdict", run, od, skip=() if revival else ("revival",), log=log,
                               defaults={"prune": {"ks": tuple(range(th.prune_k + 1))}})  # the sweep it reads
        res = analyze("verdict", run, settings=th, context=Context(inputs=inputs))
    files = [res.save(od / "verdict.json")]
    if not as_json:
        print_rows(res.rows, {"evidence": "evidence", "measured": "measured", "threshold": "threshold",
                              "passed": "passed", "supports": "if passed"}, f"evidence for {run}")
        out.print(f"verdict: {res.meta['verdict'].upper()} — {res.meta['why']}", highlight=False)
    _emit(res, as_json, files)
