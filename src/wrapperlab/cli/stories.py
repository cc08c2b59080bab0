"""``wrapperlab stories ...``: the TinyStories check (paper §5.2, App. F; docs/stories.md).

``generate`` (procedural TinyStories-Instruct shards in the authors' JSON format), ``inspect`` (load shards, real or
procedural, and report the splits and the deletion datasets of App. F.1), stages ``pretrain`` (``--control``: without
the feature), ``delete`` and ``recover``, ``probe`` (Fig. 11a's per-block feature probes on any story run), ``judge``
(the classifier that judges generations from real stories) and ``table`` (the whole protocol, with the Table 1 and
Fig. 11a analogs beside the paper's; presets cpu and paper)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from wrapperlab.cli.common import _fail, print_rows

stories_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="TinyStories check (the paper's appendix F): does fine-tuning delete a story feature "
                               "(Twist) or only wrap it? `stories table` runs the whole protocol (pretrain, control, "
                               "deletion by F / F+R / F+MM at two LRs, reFT, probes) and prints the Table 1 and Fig. "
                               "11a analogs beside the paper's; the other commands are its steps. docs/stories.md.")


@stories_app.command("generate")
def generate_cmd(
    out_dir: Path = typer.Option(..., "--out", help="an empty directory for data00.json, data01.json, ..."),
    shards: int = typer.Option(6, help="number of shards (shard 0 is the test split; >= 3 for the 80/20 split)"),
    per_shard: int = typer.Option(1000, help="stories per shard"),
    feature_rate: float = typer.Option(0.25, help="probability of each of the six features per story"),
    seed: int = typer.Option(0, help="seed of the generator (same seed, same shards)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object"),
) -> None:
    """Write procedural stories in the authors' JSON shard format: each story realises its features in the text
    (Twist, Foreshadowing, Dialogue, BadEnding, MoralValue, Conflict) so that an exact checker can judge them."""
    import numpy as np

    from wrapperlab.tasks.stories import STORY_FEATURES, StoriesError, generate_records, write_shards

    if shards < 1:
        _fail(f"--shards: must be >= 1 (got {shards})")
    if per_shard < 1:
        _fail(f"--per-shard: must be >= 1 (got {per_shard})")
    if not 0 <= feature_rate <= 1:
        _fail(f"--feature-rate: must be in [0, 1] (got {feature_rate})")
    rng = np.random.default_rng(seed)
    recs = [generate_records(per_shard, rng, feature_rate=feature_rate) for _ in range(shards)]
    try:
        paths = write_shards(recs, out_dir, source="wrapperlab procedural")
    except (StoriesError, OSError) as e:
        _fail(f"--out: {e}")
    counts = {f: sum(f in r.features for s in recs for r in s) for f in STORY_FEATURES}
    total = shards * per_shard
    if as_json:
        print(json.dumps({"out": str(out_dir), "shards": [str(p) for p in paths], "stories": total,
                          "feature_counts": counts}))
        return
    print_rows([{"feature": f, "stories": c, "share": f"{c / total:.1%}"} for f, c in counts.items()],
               {"feature": "feature", "stories": "stories", "share": "share"},
               f"{total} stories in {shards} shards under {out_dir}")


@stories_app.command("inspect")
def inspect_cmd(
    path: Path = typer.Argument(..., help="a directory of data*.json shards (or one .json file)"),
    feature: str = typer.Option("Twist", help="the feature to delete"),
    other: str = typer.Option("Foreshadowing", help="the unrelated feature of F+MM"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object"),
) -> None:
    """Load shards (real TinyStories-Instruct or procedural), then report the splits (shard 0 test, 80/20 of the
    rest) and the size of each dataset of App. F.1: all, F, F+R, F+MM and the recovery set, on the fine-tuning split."""
    import numpy as np

    from wrapperlab.tasks.stories import (
        StoriesError,
        canonical_features,
        deletion_dataset,
        load_shards,
        recovery_set,
        split_indices,
    )

    try:
        feature, other = canonical_features([feature])[0], canonical_features([other])[0]
        shards = load_shards(path)
        idx = split_indices(len(shards))
    except StoriesError as e:
        _fail(str(e))
    ft = [r for i in idx["finetune"] for r in shards[i]]
    rows = [{"dataset": "all (fine-tuning split)", "stories": len(ft),
             f"with {feature} in the instruction": sum(feature in r.features for r in ft)}]
    for kind in ("F", "F+R", "F+MM"):
        d = deletion_dataset(ft, kind, feature=feature, other=other, rng=np.random.default_rng(0))
        rows.append({"dataset": kind, "stories": len(d),
                     f"with {feature} in the instruction": sum(feature in r.features for r in d)})
    rec = recovery_set(ft, feature)
    rows.append({"dataset": f"recovery ({feature} stories)", "stories": len(rec),
                 f"with {feature} in the instruction": len(rec)})
    splits = {k: v for k, v in idx.items()}
    if as_json:
        print(json.dumps({"shards": len(shards), "splits": splits, "datasets": rows}))
        return
    print_rows(rows, {k: k for k in rows[0]}, f"{len(shards)} shards: test {splits['test']}, pretrain "
               f"{splits['pretrain']}, fine-tune {splits['finetune']}")


# the story commands' short names for the run config's fields (dotted paths work too)
STORY_KEYS = {"steps": "train.steps", "lr": "train.lr", "batch_size": "train.batch_size", "seed": "train.seed",
              "warmup_frac": "train.warmup_frac", "grad_clip": "train.grad_clip", "precision": "train.precision",
              "eval_every": "eval.every", "eval_at": "eval.at", "eval_n": "task.eval_n",
              "max_new_tokens": "task.max_new_tokens", "vocab_size": "task.vocab_size", "judge": "task.judge",
              "feature": "task.feature", "other": "task.other", "model.seq_len": "task.seq_len"}
STAGE_OVERRIDES = ", ".join(list(STORY_KEYS) + ["threads", "device", "model.d_model", "model.n_layer",
                                               "model.n_head"])


def story_overrides(items: list[str]) -> list[str]:
    """``key=value`` items with the story commands' short names rewritten to the run config's dotted paths."""
    out = []
    for item in items:
        key, eq, text = item.partition("=")
        out.append(f"{STORY_KEYS.get(key.strip(), key.strip())}={text}" if eq else item)
    return out


def _run_stage(stage: str, values: dict, overrides: list[str] | None, out_dir: Path, as_json: bool,
               progress: bool) -> None:
    """A story stage is an ordinary stage of the ``stories`` preset (a story task, llama2.c's model)."""
    from wrapperlab.cli.common import err, user_errors
    from wrapperlab.training.config import build_config
    from wrapperlab.training.stage import Stage, resolve

    with user_errors():
        raw = build_config(stage, "stories", None, story_overrides(overrides or []), values=values)
        cfg, parent = resolve(raw)
        side = Stage(cfg, parent, out_dir).run(
            progress=False, log=(lambda s: err.print(s, highlight=False, markup=False)) if progress and not as_json
            else (lambda s: None))
    summary = {"run_dir": str(out_dir), "run_id": side.get("run_id"), "stage": stage, "status": side.get("status"),
               "step": side.get("step"), "metrics": side.get("metrics", [])}
    if as_json:
        print(json.dumps(summary))
        return
    print_rows(summary["metrics"], {"step": "step", "heldout_loss": "held-out loss (feature stories)",
                                    "score": "feature in generations asked for it", "n": "n"},
               f"{stage} {out_dir}: {summary['status']} at step {summary['step']}")


OVERRIDES_ARG = typer.Argument(None, help=f"key=value overrides: {STAGE_OVERRIDES}", show_default=False)


@stories_app.command("pretrain")
def pretrain_cmd(
    overrides: list[str] | None = OVERRIDES_ARG,
    data: Path = typer.Option(..., help="directory of data*.json shards (`stories generate` or real ones)"),
    out_dir: Path = typer.Option(..., "--out", help="run directory"),
    control: bool = typer.Option(False, help="the 'not in pretraining' control: filter the feature out first"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object"),
    progress: bool = typer.Option(True, help="print each evaluation"),
) -> None:
    """Pretrain the llama2.c-style model on the pretraining split (LM loss, warmup + cosine; App. F.1), evaluating the
    held-out loss on feature stories and the generation score. Rerunning resumes an interrupted run exactly."""
    _run_stage("pretrain", {"task.data": str(data), "task.dataset": "filter" if control else "all"}, overrides,
               out_dir, as_json, progress)


@stories_app.command("delete")
def delete_cmd(
    overrides: list[str] | None = OVERRIDES_ARG,
    parent: Path = typer.Option(..., help="a finished `stories pretrain` run"),
    kind: str = typer.Option("F", help="F (filtering), F+R (+ randomisation) or F+MM (+ mix & match) (App. F.1)"),
    out_dir: Path = typer.Option(..., "--out", help="run directory"),
    as_json: bool = typer.Option(False, "--json"),
    progress: bool = typer.Option(True, help="print each evaluation"),
) -> None:
    """Deletion fine-tuning on the fine-tuning split transformed by KIND, at a constant LR (App. F.1)."""
    _run_stage("finetune", {"parent": str(parent), "task.dataset": kind}, overrides, out_dir, as_json, progress)


@stories_app.command("recover")
def recover_cmd(
    overrides: list[str] | None = OVERRIDES_ARG,
    parent: Path = typer.Option(..., help="a finished `stories delete` (or pretrain control) run"),
    out_dir: Path = typer.Option(..., "--out", help="run directory"),
    as_json: bool = typer.Option(False, "--json"),
    progress: bool = typer.Option(True, help="print each evaluation"),
) -> None:
    """Reverse fine-tuning on the recovery set (stories with the feature), constant LR (App. F.1; paper: 1e-5)."""
    _run_stage("reft", {"parent": str(parent), "task.dataset": "recovery"}, overrides, out_dir, as_json, progress)


TABLE_FIELDS = ("pretrain_steps", "pretrain_lr", "delete_steps", "recover_steps", "recover_lr", "columns",
                "batch_size", "vocab_size", "max_new_tokens", "eval_n", "probe_train", "probe_test", "probe_iters")
TABLE_OVERRIDES = ", ".join(TABLE_FIELDS) + ", eta_M, eta_S, model.d_model, model.n_layer, model.n_head, model.seq_len"


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.0f}"


@stories_app.command("table")
def table_cmd(
    overrides: list[str] | None = typer.Argument(None, show_default=False, help=(
        f"key=value changes to the preset: {TABLE_OVERRIDES}")),
    out_dir: Path = typer.Option(Path("runs/stories"), "--out", help="the store the protocol's runs go to (reused "
                                                                      "and resumed on rerun; `wrapperlab runs list`)"),
    preset_name: str = typer.Option("cpu", "--preset", help="cpu (≤ 30 min here, procedural stories) or paper "
                                                           "(the paper's 91M model: real shards, a judge and a GPU)"),
    data: Path | None = typer.Option(None, help="shards to use (default for cpu: procedural ones generated into "
                                                "OUT/shards; required for paper)"),
    judge: Path | None = typer.Option(None, help="a classifier saved by `stories judge` (needed for real "
                                                 "stories; default: the exact checker of procedural stories)"),
    workers: int = typer.Option(2, help="parallel worker processes (local) or concurrent tasks (ray); 1 torch "
                                        "thread each when > 1"),
    threads: int = typer.Option(0, help="torch threads per process (0: 1 per worker when workers > 1)"),
    executor: str = typer.Option("local", help="local (process pool) or ray"),
    address: str | None = typer.Option(None, "--ray-address", help="Ray cluster address (default: start a local "
                                                                    "Ray instance)"),
    seed: int = typer.Option(0, help="training seed of every run"),
    seeds: str | None = typer.Option(None, help="comma-separated training seeds: the protocol once per seed (its "
                                                "claims then read 'k of N seeds'); replaces --seed"),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]"),
    probes: bool = typer.Option(True, help="also run the Fig. 11a probes"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object"),
) -> None:
    """The whole protocol of the paper's appendix F: pretrain (with Twist) and the not-in-pretraining control, delete
    Twist by F / F+R / F+MM at η_M and η_S, reverse fine-tune every deleted model and the control on Twist stories,
    probe every block for Twist; print the Table 1 analog (Twist rate at the reFT columns) and the Fig. 11a analog
    beside the paper. Finished runs are reused and an interrupted one resumes, so a rerun only prints the tables."""
    import dataclasses

    from wrapperlab.cli.common import err, user_errors
    from wrapperlab.experiments import stories_table as ST
    from wrapperlab.training.config import ConfigError, parse_value

    log = None if as_json else (lambda s: err.print(s, highlight=False, markup=False))
    with user_errors():
        p = ST.preset(preset_name)
        changes: dict = {"model": dict(p.model), "etas": dict(p.etas)}
        for item in overrides or []:
            key, eq, text = item.partition("=")
            key, value = key.strip(), parse_value(text.strip())
            if eq and key in TABLE_FIELDS:
                changes[key] = tuple(value) if key == "columns" and isinstance(value, list) else value
            elif eq and key.startswith("model.") and key[6:] in changes["model"]:
                changes["model"][key[6:]] = value
            elif eq and key in ("eta_M", "eta_S"):
                changes["etas"][key[4:]] = value
            else:
                raise ConfigError(f"override {item!r}: expected key=value with key one of {TABLE_OVERRIDES}")
        p = ST.check_preset(dataclasses.replace(p, **changes))
        if seeds is not None and seed != 0:
            raise ConfigError("--seed, --seeds: give one or the other")
        seed_list = (seed,) if seeds is None else _seed_list(seeds)
        res = ST.run_table(p, out_dir, data, judge, workers, threads, seed_list, probes, log, device, executor,
                           address)
    if as_json:
        print(json.dumps(res))
        return
    for s in res["seeds"]:
        _print_tables(res, res["by_seed"][str(s)], p.name, out_dir, f"seed {s}" if len(res["seeds"]) > 1 else "")
    print(f"wall {res['wall_s']:.0f} s; summary in {out_dir / 'stories_table.json'}")


def _seed_list(text: str) -> tuple[int, ...]:
    from wrapperlab.cli.common import _fail

    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        out = ()
    if not out or min(out) < 0 or len(set(out)) != len(out):
        _fail(f"--seeds: expected distinct non-negative comma-separated integers, got {text!r}")
    return out


def _print_tables(res: dict, tables: dict, preset: str, out_dir: Path, which: str) -> None:
    """Table 1 and Fig. 11a analogs of one seed's protocol."""
    cols, tag = res["columns"], f" ({which})" if which else ""
    paper_cols = "/".join(map(str, res["paper_columns"]))
    shown = []
    for r in tables["table1"]:
        row = {"model": r["model"], "pt": _pct(r["pretrained_rate"])}
        for c, pc in zip(cols, res["paper_columns"]):
            row[f"c{c}"] = f"{_pct(r[f'rate@{c}'])} ({_pct(r[f'paper@{pc}'])})"
        row["loss"] = " → ".join("—" if r[f"loss@{c}"] is None else f"{r[f'loss@{c}']:.3f}" for c in cols)
        shown.append(row)
    print_rows(shown, {"model": "deletion", "pt": "pretrained %",
                       **{f"c{c}": f"reFT {c} ({pc}) %" for c, pc in zip(cols, res["paper_columns"])},
                       "loss": "held-out loss on Twist stories at the columns"},
               f"Table 1 analog{tag} — Twist in 16 generations asked for it, ours (paper's) at reFT steps "
               f"{'/'.join(map(str, cols))} (paper {paper_cols}); preset {preset}, runs in {out_dir}")
    for key, pooling in (("probes", "the last 10 positions, as the paper"), ("probes_story", "the whole story")):
        if tables.get(key):
            layers = [k for k in tables[key][0] if k.startswith("B")]
            print_rows([{**r, **{k: _pct(r.get(k)) for k in (*layers, "mean", "base_rate")}} for r in tables[key]],
                       {"model": "model", **{k: k for k in layers}, "mean": "mean", "base_rate": "base rate"},
                       f"Fig. 11a analog{tag} — Twist probe accuracy % per block (test split), pooled over "
                       f"{pooling}. Paper: " + res["paper_probe_claim"])
    if tables.get("losses"):
        parts = [k for k in tables["losses"][0] if k != "model"]
        print_rows([{"model": r["model"], **{k: "—" if r[k] is None else f"{r[k]:.3f}" for k in parts}}
                    for r in tables["losses"]], {"model": "model", **{k: k for k in parts}},
                   f"Held-out loss by part{tag} (nats per token; texts with Twist split into instruction, the Twist "
                   "sentence and the rest of the story; then texts without Twist), at the end of each run")


@stories_app.command("probe")
def probe_cmd(
    run_dirs: list[Path] = typer.Argument(..., help="finished story runs (pretrain, delete or recover)"),
    n_train: int = typer.Option(1500, help="probe training stories (from the pretraining split)"),
    n_test: int = typer.Option(500, help="held-out stories (from the test split)"),
    iters: int = typer.Option(2000, help="probe training iterations (the paper: 2000, batch 128, lr 1e-3)"),
    seed: int = typer.Option(0),
    pool: str = typer.Option("last", help="last: the mean of the last 10 positions (the paper); story: the mean "
                                          "over every position of the story (a control for what the end shows)"),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per-block linear probes for the six story features on the mean of the last 10 positions (App. F.2, Fig. 11a)
    or over the whole story (--pool story); writes RUN/analysis/feature_probe.json (feature_probe-story.json) for
    each run and prints accuracy beside the base rate."""
    from wrapperlab.analysis.common import AnalysisError
    from wrapperlab.analysis.registry import Context, analyze
    from wrapperlab.tasks.stories import StoriesError
    from wrapperlab.training import checkpoint as ck
    from wrapperlab.training.config import ConfigError

    if min(n_train, n_test, iters) < 1:
        _fail("--n-train, --n-test and --iters must be >= 1")
    if pool not in ("last", "story"):
        _fail(f"--pool: expected last or story, got {pool!r}")
    results = []
    for d in run_dirs:
        try:
            res = analyze("feature_probe", d, n_train=n_train, n_test=n_test, iters=iters, seed=seed, pool=pool,
                          context=Context(device=device))
            res.save(Path(d) / "analysis" / ("feature_probe.json" if pool == "last" else "feature_probe-story.json"))
            results.append(res)
        except (AnalysisError, ConfigError, StoriesError, ck.CheckpointError) as e:
            _fail(f"{d}: {e}")
    if as_json:
        print(json.dumps({"results": [r.to_dict() for r in results]}))
        return
    for r in results:
        layers = r.meta["layers"]
        feats = list(dict.fromkeys(x["feature"] for x in r.rows))
        rows = [{"feature": f, **{x["layer"]: _pct(x["acc"]) for x in r.rows if x["feature"] == f},
                 "base": _pct(next(x["base_rate"] for x in r.rows if x["feature"] == f))} for f in feats]
        print_rows(rows, {"feature": "feature", **{k: k for k in layers}, "base": "base rate"},
                   f"{r.meta['run_dir']}: probe accuracy % per block ({r.meta['n_test']} test stories; "
                   f"{r.meta['pooling']})")


@stories_app.command("judge")
def judge_cmd(
    data: Path = typer.Option(..., help="labelled shards (the features field is the label)"),
    out: Path = typer.Option(..., "--out", help="where to save the judge (JSON)"),
    n_train: int = typer.Option(20000, help="training stories at most (pretraining + fine-tuning shards)"),
    n_test: int = typer.Option(2000, help="held-out stories at most (the test shard)"),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Train the generation score's judge for real stories: a per-feature n-gram logistic regression on the
    labelled shards, with its held-out accuracy (the paper's GPT-3.5 judge: 92 %). Pass it to `stories table
    --judge` or a stage's judge=PATH."""
    import numpy as np

    from wrapperlab.tasks.stories import StoriesError, load_shards, split_indices
    from wrapperlab.training.story_judge import JudgeError, train_judge

    if n_train < 2 or n_test < 1:
        _fail("--n-train must be >= 2 and --n-test >= 1")
    try:
        shards = load_shards(data)
        idx = split_indices(len(shards))
        pool = [r for i in idx["pretrain"] + idx["finetune"] for r in shards[i]]
        rng = np.random.default_rng(seed)
        train = [pool[int(i)] for i in rng.permutation(len(pool))[:n_train]]
        held = list(shards[idx["test"][0]])[:n_test]
        judge = train_judge(train, held, seed=seed)
        judge.save(out)
    except (StoriesError, JudgeError, OSError) as e:
        _fail(str(e))
    h = judge.heldout
    if as_json:
        print(json.dumps({"out": str(out), **h}))
        return
    print_rows([{"feature": f, "acc": _pct(h["accuracy"][f]), "base": _pct(h["base_rate"][f])} for f in judge.features],
               {"feature": "feature", "acc": "held-out accuracy %", "base": "base rate %"},
               f"judge saved to {out}: {h['n_train']} training, {h['n_heldout']} held-out stories")
