"""``wrapperlab analyze probe | prune | attention | revival | verdict RUN``: the mechanistic toolkit
(paper App. D) on a run directory. Each command writes its table (JSON) and figure(s) (PNG) to ``--out``
(default ``RUN/analysis``) and prints the table, or one JSON object with ``--json``."""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

import typer

from wrapperlab.cli.common import _fail, err, out, print_rows, user_errors

analyze_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="Tell a wrapper from a deletion: probes, pruning, attention maps, revival by reverse "
                               "fine-tuning, and a verdict combining them (paper App. D).")

RUN_ARG = typer.Argument(..., help="run directory (a finished wrapperlab run)", show_default=False)
PAIR_RUN = typer.Argument(None, help="run directory (or give --finetuned and --capability instead)",
                          show_default=False)
BASE_OPT = typer.Option(None, "--base", help="base model: a run, a local Hugging Face directory or BASE+ADAPTER")
FT_OPT = typer.Option(None, "--finetuned", help="fine-tuned model: a run, an HF directory or BASE+ADAPTER")
CAP_OPT = typer.Option(None, "--capability", help="JSONL of {prompt, answer, label?} records (docs/huggingface.md)")
CONTROL_OPT = typer.Option(None, "--control", help="control model that never had the capability: the probes' control "
                                                   "(default: a random-init model of the fine-tuned one's "
                                                   "architecture) and the relearning baseline (default: none)")
RELEARN_DATA_OPT = typer.Option(None, "--relearn-data", help="JSONL records to relearn on (default: 75 % of "
                                                             "--capability, the other 25 % scored)")
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
    run: Path | None = PAIR_RUN,
    out_dir: Path | None = OUT_OPT,
    base: Path | None = BASE_OPT,
    finetuned: Path | None = FT_OPT,
    capability: Path | None = CAP_OPT,
    control: Path | None = CONTROL_OPT,
    family: str | None = typer.Option(None, help="task family probed (default: the run's)"),
    n_train: int | None = typer.Option(None, help="probe training samples (cpu preset 4000, paper 20000)"),
    n_test: int | None = typer.Option(None, help="held-out samples (cpu 1000, paper 2000)"),
    iters: int | None = typer.Option(None, help="AdamW iterations, LR x0.1 at 50/75/87.5 % (cpu 1500, paper 4000)"),
    controls: bool = typer.Option(True, help="also probe the pretrained ancestor and a random-init model"),
    seed: int = typer.Option(0, min=0),
    threads: int | None = typer.Option(None, help="torch threads"),
    as_json: bool = JSON_OPT,
) -> None:
    """Linear probes per block (B0 = embedding output) for the O_PT and O_FT answers at the position that
    predicts the answer; with the pretrained model and a random-init model as controls (paper Fig. 8)."""
    from wrapperlab.analysis.registry import analyze
    from wrapperlab.report.figures import plot_probe

    _threads(threads)
    if _pair_mode(run, finetuned, capability, base, needs_base=True):
        from wrapperlab.analysis.capability import PairSettings, probe_pair
        from wrapperlab.models.registry import random_like

        _not_in_pair_mode(n_train=n_train, n_test=n_test, family=family, no_controls=not controls)
        with user_errors():
            b, f, c, cap = _open_pair(base, finetuned, capability, control)
            s = PairSettings(seed=seed, **({"probe_iters": iters} if iters else {}))
            ctl = c.model if c is not None else random_like(f.model, seed)
            res = probe_pair([("finetune", f.model), ("pretrained", b.model), ("random-init", ctl)], cap, s)
        _emit_pair(res, out_dir, as_json, lambda: print_rows(
            res.tables["summary"], {"model": "model", "target": "target", "best_layer": "best layer", "acc":
                                    "probe acc %", "majority": "majority %"}, f"probes of {finetuned}"),
            lambda od: [plot_probe(res.rows, od / "probe.png", f"probes: {finetuned}")])
        return
    _pair_only(control=control)
    od = _out_dir(run, out_dir)
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


def _print_units(units: list[dict]) -> None:
    print_rows(units, {"rank": "rank", "block": "block", "matrix": "matrix", "kind": "kind", "index": "index",
                       "score": "grad·w"}, "pruned units, in order")


@analyze_app.command("prune")
def prune_cmd(
    run: Path | None = PAIR_RUN,
    out_dir: Path | None = OUT_OPT,
    finetuned: Path | None = FT_OPT,
    capability: Path | None = CAP_OPT,
    k_max: int = typer.Option(15, help="sweep K = 0..k_max (paper: 15, or 100)"),
    ks: str | None = typer.Option(None, help="explicit comma-separated K values instead of 0..k_max"),
    unit: str = typer.Option("neuron", help="neuron (a row of a weight matrix, with its bias) or weight"),
    matrices: str = typer.Option("", help="comma-separated candidate matrices in every block (default: the model "
                                          "family's: gpt attn.qkv,attn.proj,mlp.fc,mlp.proj; llama attn.wq..mlp.w3; "
                                          "lstm lstm.ih,lstm.hh)"),
    n_grad: int = typer.Option(1024, help="samples for the pruning gradient"),
    n_eval: int = typer.Option(500, help="samples per evaluation set"),
    seed: int = typer.Option(0, min=0),
    threads: int | None = typer.Option(None, help="torch threads"),
    as_json: bool = JSON_OPT,
) -> None:
    """Single-step grad·w pruning on the pretraining-task loss: zero the global top-K units and measure O_PT and
    O_FT accuracy at c_test 0 and 1 against K, where the units sit, and the predicted-class histogram (Figs. 7, 59)."""
    from wrapperlab.analysis.registry import analyze
    from wrapperlab.report.figures import plot_prune

    if k_max < 0:
        _fail(f"k_max: must be >= 0, got {k_max}")
    _threads(threads)
    mats = tuple(m.strip() for m in matrices.split(",") if m.strip())
    if _pair_mode(run, finetuned, capability, None, needs_base=False):
        from wrapperlab.analysis.capability import PairSettings, prune_pair

        _not_in_pair_mode(unit=unit != "neuron", n_grad=n_grad != 1024, n_eval=n_eval != 500)
        with user_errors():
            _, f, _, cap = _open_pair(None, finetuned, capability, None)
            res = prune_pair(f.model, cap, PairSettings(ks=tuple(_ints(ks, "ks") or range(k_max + 1)),
                                                        matrices=mats, seed=seed))

        def table() -> None:
            print_rows([{"k": r["k"], "acc": f"{100 * r['acc']:.1f}", "majority": f"{100 * r['majority']:.1f}"}
                        for r in res.rows], {"k": "K", "acc": "capability acc %", "majority": "majority %"},
                       f"behaviour after pruning the top-K units of {finetuned}")
            _print_units(res.tables["units"][:max(r["k"] for r in res.rows)])
        _emit_pair(res, out_dir, as_json, table)
        return
    od = _out_dir(run, out_dir)
    with user_errors():
        res = analyze("prune", run, ks=tuple(_ints(ks, "ks") or range(k_max + 1)), unit=unit, matrices=mats,
                      n_grad=n_grad, n_eval=n_eval, seed=seed)
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
        _print_units(res.tables["units"][:max(s["ks"])])
    _emit(res, as_json, files)


@analyze_app.command("attention")
def attention_cmd(
    run: Path | None = PAIR_RUN,
    out_dir: Path | None = OUT_OPT,
    finetuned: Path | None = FT_OPT,
    capability: Path | None = CAP_OPT,
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
    puts its attention, by key token.

    On any model (--finetuned M --capability CAP.jsonl): the prompt of record --index (or the mean over up to
    --average records whose prompts have its length), read at the last prompt token (the one that predicts the
    answer); written only with --out."""
    from wrapperlab.analysis.registry import analyze
    from wrapperlab.report.figures import plot_attention
    from wrapperlab.report.html import attention_page

    pair = _pair_mode(run, finetuned, capability, None, needs_base=False)
    if pair:
        _not_in_pair_mode(family=family, operand=operand, c_test=c_test, seed=seed)
    with user_errors():
        lays = _ints(layers, "layers")
        if pair:
            res, what = _pair_attention(finetuned, capability, index, average, tuple(lays) if lays else None)
        else:
            res = analyze("attention", run, family=family, operand=operand, c_test=c_test, average=average,
                          index=index, layers=tuple(lays) if lays else None, seed=seed)
            m = res.meta
            what = (f"mean of {average} samples" if average
                    else f"sample {index}: {m['family']} {m['operand']}, answer {m['answer']}")
    pat = res.arrays["pattern"]
    name = finetuned if pair else run

    def figures(od: Path) -> list[Path]:
        return [plot_attention(pat, res.meta["labels"], res.meta["layers"], od / "attention.png", f"{name} — {what}"),
                attention_page(pat, res.meta["labels"], res.meta["layers"], od / "attention.html",
                               f"attention maps: {name}", what)]

    if pair:
        _emit_pair(res, out_dir, as_json, lambda: _attention_table(res, what), figures)
        return
    od = _out_dir(run, out_dir)
    files = [res.save(od / "attention.json"), *figures(od)]
    if not as_json:
        _attention_table(res, what)
    _emit(res, as_json, files)


def _pair_attention(finetuned: Path, capability: Path, index: int, average: int, layers):
    """The attention analysis on a capability record's prompt (or the mean over prompts of its length)."""
    from types import SimpleNamespace

    import numpy as np

    from wrapperlab.analysis.attention import attention
    from wrapperlab.analysis.capability import CapabilityError
    from wrapperlab.analysis.common import need

    _, f, _, cap = _open_pair(None, finetuned, capability, None)
    need(f.model, "attention")
    if not 0 <= index < len(cap):
        raise CapabilityError(f"--index: {capability} has records 0..{len(cap) - 1}, not {index}")
    length = len(cap.prompts[index])
    rows = [index] + [i for i in range(len(cap)) if i != index and len(cap.prompts[i]) == length]
    rows = rows[:max(1, average)]
    tokens = np.array([cap.prompts[i] for i in rows], dtype=np.int64)
    names = SimpleNamespace(tokens={int(t): f.tokenizer.decode([int(t)]) for t in np.unique(tokens)})
    res = attention(f.model, tokens, vocab=names, layers=list(layers) if layers else None, average=average > 0)
    res.meta |= {"capability": str(capability), "records": rows}
    rec = cap.records[index]
    what = (f"mean of {len(rows)} prompts of {length} tokens" if average
            else f"record {index} (line {rec.line}): answer {rec.answer!r}")
    return res, what


def _attention_table(res, what: str) -> None:
    """The three key tokens each head's query attends to most."""
    top = sorted(res.rows, key=lambda r: (r["layer"], r["head"], -r["mass"]))
    shown, seen = [], {}
    for r in top:
        key = (r["layer"], r["head"])
        if seen.get(key, 0) < 3:
            shown.append(r)
            seen[key] = seen.get(key, 0) + 1
    print_rows(shown, {"layer": "block", "head": "head", "key_token": "key token", "mass": "attention mass"},
               f"top-3 key tokens of the query that predicts the answer ({what})")


@analyze_app.command("revival")
def revival_cmd(
    run: Path | None = PAIR_RUN,
    out_dir: Path | None = OUT_OPT,
    base: Path | None = BASE_OPT,
    finetuned: Path | None = FT_OPT,
    capability: Path | None = CAP_OPT,
    control: Path | None = CONTROL_OPT,
    relearn_data: Path | None = RELEARN_DATA_OPT,
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
    (log x, Fig. 9) and the steps each needs to reach the target.

    On a pair (--base, --finetuned, --capability; runs or Hugging Face directories): relearning of the fine-tuned
    model and of --control on the capability's records (default 200 steps at LR 1e-5), scored on held-out records
    against the base model's accuracy; its stages go to OUT/relearn when --out is given."""
    from wrapperlab.analysis.registry import Context, analyze
    from wrapperlab.report.figures import plot_revival

    if _pair_mode(run, finetuned, capability, base, needs_base=True):
        _pair_revival(base, finetuned, capability, control, relearn_data, out_dir, lr, steps, fraction, threads,
                      progress, as_json, baselines=baselines, scratch_steps=scratch_steps)
        return
    _pair_only(control=control, relearn_data=relearn_data)

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
    run: Path | None = PAIR_RUN,
    out_dir: Path | None = OUT_OPT,
    base: Path | None = BASE_OPT,
    finetuned: Path | None = FT_OPT,
    capability: Path | None = CAP_OPT,
    control: Path | None = CONTROL_OPT,
    threshold: list[str] | None = typer.Option(None, "--set", help="threshold=value, e.g. --set prune_gain=0.4 "
                                                                   "(see the table for names and defaults)"),
    revival: bool = typer.Option(True, help="include revival (trains reFT and baselines if not done yet; on a pair: "
                                            "relearning)"),
    relearn_data: Path | None = RELEARN_DATA_OPT,
    relearn_steps: int | None = typer.Option(None, help="pair form: relearning steps (default 200)"),
    relearn_lr: float | None = typer.Option(None, help="pair form: relearning LR (default 1e-5)"),
    threads: int | None = typer.Option(None, help="torch threads"),
    as_json: bool = JSON_OPT,
) -> None:
    """wrapper / deletion / amplification / unchanged for a fine-tuned run, with every piece of evidence and
    the threshold it was held to. Reuses probe.json, prune.json and revival.json from --out when present and
    computes the missing ones with their default settings.

    On any pair of models (--base, --finetuned: wrapperlab runs or local Hugging Face directories) the capability
    is a JSONL file: behaviour on both, probes on both and on a control, grad·w pruning of the fine-tuned model,
    relearning of the fine-tuned model and of the --control (without one, relearning is reported but cannot vote:
    there is no baseline), then the same rules."""
    from wrapperlab.analysis.registry import Context, analyze, gather_inputs, get_analysis
    from wrapperlab.training.checkpoint import read_sidecar

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

    if _pair_mode(run, finetuned, capability, base, needs_base=True):
        from wrapperlab.analysis.capability import RelearnSettings

        relearn = {"relearn_data": relearn_data, "relearn_steps": relearn_steps, "relearn_lr": relearn_lr}
        given = [f"--{k.replace('_', '-')}" for k, v in relearn.items() if v is not None]
        if not revival and given:
            _fail(f"{', '.join(given)}: relearning is off (--no-revival)")
        with user_errors():
            rs = RelearnSettings(steps=200 if relearn_steps is None else relearn_steps,
                                 lr=1e-5 if relearn_lr is None else relearn_lr, threads=threads or 0) \
                if revival else None
        _pair_verdict(base, finetuned, capability, control, out_dir, values, as_json, log, rs, relearn_data)
        return
    _pair_only(control=control, relearn_data=relearn_data, relearn_steps=relearn_steps, relearn_lr=relearn_lr)
    od = _out_dir(run, out_dir)
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


def _pair_mode(run: Path | None, finetuned: Path | None, capability: Path | None, base: Path | None,
               needs_base: bool) -> bool:
    """True for the pair form (--finetuned, --capability[, --base]); one line when the two forms are mixed."""
    given = [finetuned, capability] + ([base] if needs_base else [])
    if run is None and all(x is not None for x in given):
        return True
    if run is not None and finetuned is None and capability is None and base is None:
        return False
    what = "--base, --finetuned and --capability" if needs_base else "--finetuned and --capability"
    _fail(f"give a RUN, or {what} (all of them)")
    return False


def _open_pair(base: Path | None, finetuned: Path, capability: Path, control: Path | None):
    """(base subject or None, fine-tuned subject, control subject or None, capability), all checked to fit
    together."""
    from wrapperlab.analysis.capability import Pair

    p = Pair.open(base, finetuned, capability, control)
    return p.base, p.finetuned, p.control, p.capability


def _pair_only(**given) -> None:
    """One line naming the pair-form options given with a RUN."""
    bad = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
    if bad:
        _fail(f"{', '.join(bad)}: used with --base/--finetuned/--capability (the pair form), not with a RUN")


def _not_in_pair_mode(**given) -> None:
    """One line naming the run-only options given together with the pair form."""
    bad = [f"--{k.replace('_', '-')}" for k, v in given.items() if v]
    if bad:
        _fail(f"{', '.join(bad)}: not used with --finetuned/--capability (the records and their 75/25 split are the "
              f"data)")


@contextmanager
def _relearn_dir(out_dir: Path | None):
    """Where relearning stages go: OUT/relearn (kept: reused and resumed by the next command), else a temporary
    directory removed afterwards."""
    if out_dir is not None:
        yield out_dir
        return
    with tempfile.TemporaryDirectory(prefix="wrapperlab-relearn-") as tmp:
        yield Path(tmp)


def _relearn(b, f, c, cap, relearn_data: Path | None, settings, out_dir: Path | None, progress: bool, log):
    """Relearning of the fine-tuned model and, when given, of the control (the pair form of revival)."""
    from wrapperlab.analysis.capability import relearn_pair

    subjects = [("reft", f)] + ([("scr+ft", c)] if c is not None else [])
    with _relearn_dir(out_dir) as od:
        return relearn_pair(subjects, cap, od, b.model, settings, train_data=relearn_data, progress=progress,
                            log=log)


def _pair_revival(base, finetuned, capability, control, relearn_data, out_dir, lr, steps, fraction, threads,
                  progress, as_json, baselines, scratch_steps) -> None:
    from wrapperlab.analysis.capability import RelearnSettings
    from wrapperlab.report.figures import plot_revival

    if baselines != "scr+ft,scr" or scratch_steps is not None:
        _fail("--baselines, --scratch-steps: not used with --finetuned/--capability (the baseline is --control)")
    _threads(threads)
    with user_errors():
        try:
            lr_v = 1e-5 if lr is None else float(lr)
        except ValueError:
            _fail(f"--lr: a pair's relearning LR is a number, not {lr!r}")
        s = RelearnSettings(lr=lr_v, steps=200 if steps is None else steps, fraction=fraction, threads=threads or 0)
        b, f, c, cap = _open_pair(base, finetuned, capability, control)
        res = _relearn(b, f, c, cap, relearn_data, s, out_dir, progress and not as_json,
                       lambda m: err.print(m, highlight=False, markup=False))
    _emit_pair(res, out_dir, as_json, lambda: print_rows(
        res.tables["summary"], {"curve": "curve", "label": "model", "start_acc": "start %", "final_acc": "final %",
                                "target": "target %", "steps_to_target": "steps to target", "steps": "steps run"},
        f"relearning of {finetuned} (held-out accuracy; — = not reached; baseline: {res.meta['baseline']})"),
        lambda od: [plot_revival(res.rows, res.meta["target"], od / "revival.png", f"relearning: {finetuned}")])


def _pair_verdict(base: Path, finetuned: Path, capability: Path, control: Path | None, out_dir: Path | None,
                  values: dict, as_json: bool, log, relearn, relearn_data: Path | None) -> None:
    """``relearn``: RelearnSettings, or None to leave relearning out."""
    from wrapperlab.analysis.capability import verdict_pair
    from wrapperlab.analysis.registry import get_analysis

    with user_errors():
        th = get_analysis("verdict").make_settings(values)
        b, f, c, cap = _open_pair(base, finetuned, capability, control)
        rev = None
        if relearn is not None:
            log("relearning")
            rev = _relearn(b, f, c, cap, relearn_data, relearn, out_dir, not as_json, log)
        res, evidence = verdict_pair(b.model, f.model, cap, control=c.model if c else None, thresholds=th,
                                     revival=rev, log=log)
    res.meta |= {"base": str(base), "finetuned": str(finetuned)}
    files = []
    if out_dir is not None:
        files = [v.save(out_dir / f"{k}.json") for k, v in evidence.items()] + [res.save(out_dir / "verdict.json")]
    if as_json:
        print(json.dumps({**res.to_dict(), "evidence": {k: v.to_dict() for k, v in evidence.items()},
                          "files": [str(x) for x in files]}))
        return
    print_rows(res.rows, {"evidence": "evidence", "measured": "measured", "threshold": "threshold",
                          "passed": "passed", "supports": "if passed"}, f"evidence for {finetuned} against {base}")
    out.print(f"verdict: {res.meta['verdict'].upper()} — {res.meta['why']}", highlight=False)
    if files:
        out.print("written: " + ", ".join(str(x) for x in files), highlight=False)


def _emit_pair(res, out_dir: Path | None, as_json: bool, table, figures=lambda od: []) -> None:
    """Print a pair-form result (a table, or --json); write it (and its figures) only when --out is given."""
    files = []
    if out_dir is not None:
        files = [res.save(out_dir / f"{res.tool}.json"), *figures(out_dir)]
    if as_json:
        print(json.dumps({**res.to_dict(), "files": [str(f) for f in files]}))
        return
    table()
    if files:
        out.print("written: " + ", ".join(str(f) for f in files), highlight=False)
