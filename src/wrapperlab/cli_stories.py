"""``wrapperlab stories ...``: the TinyStories check (paper.md §6; issue 6, in progress).

Built so far: ``generate`` (procedural TinyStories-Instruct shards in the authors' JSON format), ``inspect`` (load
shards, real or procedural, and report the splits and the deletion datasets of §6.3), and the stages ``pretrain``
(``--control``: without the feature), ``delete`` and ``recover``. The probes on story runs, the Table 1 analog and a
cpu preset are not built yet (docs/stories.md)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from wrapperlab.cli_common import _fail, print_rows

stories_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="TinyStories check (paper.md §6): procedural TinyStories-Instruct shards in the "
                               "authors' format, splits and deletion datasets, and the pretrain / delete / recover "
                               "stages with the generation score. Probes on story runs and the Table 1 analog: not "
                               "built yet (docs/stories.md).")


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
    rest) and the size of each dataset of §6.3: all, F, F+R, F+MM and the recovery set, on the fine-tuning split."""
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


STAGE_OVERRIDES = ("steps, lr, batch_size, seed, eval_every, eval_n, max_new_tokens, vocab_size, threads, "
                   "model.d_model, model.n_layer, model.n_head, model.seq_len, feature, other")


def _run_stage(stage: str, values: dict, overrides: list[str] | None, out_dir: Path, as_json: bool,
               progress: bool) -> None:
    from wrapperlab.cli_common import err
    from wrapperlab.tasks.stories import StoriesError
    from wrapperlab.tasks.tokenizer import TokenizerError
    from wrapperlab.training import checkpoint as ck
    from wrapperlab.training.config import ConfigError, deep_merge, parse_value, set_path
    from wrapperlab.training.story_stage import StoryStage, story_config

    try:
        user: dict = {}
        for item in overrides or []:
            key, eq, text = item.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"override {item!r} is not key=value (e.g. steps=1000, model.d_model=128)")
            set_path(user, key.strip(), parse_value(text.strip()))
        raw = deep_merge(dict(values), user)
        if raw.get("parent") and not raw.get("data"):
            raw["data"] = ck.read_sidecar(raw["parent"])["config"]["data"]
        cfg = story_config(stage=stage, **raw)
        st = StoryStage(cfg, out_dir)
        side = st.run(log=(lambda s: err.print(s, highlight=False, markup=False)) if progress and not as_json
                      else (lambda s: None))
    except (ConfigError, StoriesError, TokenizerError, ck.CheckpointError) as e:
        _fail(str(e))
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
    """Pretrain the llama2.c-style model on the pretraining split (LM loss, warmup + cosine; §6.2), evaluating the
    held-out loss on feature stories and the generation score. Rerunning resumes an interrupted run exactly."""
    _run_stage("pretrain", {"data": str(data), "dataset": "filter" if control else "all"}, overrides, out_dir,
               as_json, progress)


@stories_app.command("delete")
def delete_cmd(
    overrides: list[str] | None = OVERRIDES_ARG,
    parent: Path = typer.Option(..., help="a finished `stories pretrain` run"),
    kind: str = typer.Option("F", help="F (filtering), F+R (+ randomisation) or F+MM (+ mix & match) (§6.3)"),
    out_dir: Path = typer.Option(..., "--out", help="run directory"),
    as_json: bool = typer.Option(False, "--json"),
    progress: bool = typer.Option(True, help="print each evaluation"),
) -> None:
    """Deletion fine-tuning on the fine-tuning split transformed by KIND, at a constant LR (§6.3)."""
    _run_stage("delete", {"parent": str(parent), "dataset": kind, "lr": 1e-4}, overrides, out_dir, as_json,
               progress)


@stories_app.command("recover")
def recover_cmd(
    overrides: list[str] | None = OVERRIDES_ARG,
    parent: Path = typer.Option(..., help="a finished `stories delete` (or pretrain control) run"),
    out_dir: Path = typer.Option(..., "--out", help="run directory"),
    as_json: bool = typer.Option(False, "--json"),
    progress: bool = typer.Option(True, help="print each evaluation"),
) -> None:
    """Reverse fine-tuning on the recovery set (stories with the feature), constant LR (§6.3; paper: 1e-5)."""
    _run_stage("recover", {"parent": str(parent), "dataset": "recovery", "lr": 1e-5}, overrides, out_dir, as_json,
               progress)
