"""``wrapperlab stories ...``: the TinyStories check (paper.md §6; issue 6, in progress).

Built so far: ``generate`` (procedural TinyStories-Instruct shards in the authors' JSON format) and ``inspect``
(load shards, real or procedural, and report the splits and the deletion datasets of §6.3). The training protocols
(pretrain / delete / recover), probes and the Table 1 analog are not built yet (docs/stories.md)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from wrapperlab.cli_common import _fail, print_rows

stories_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="TinyStories check (paper.md §6): procedural TinyStories-Instruct shards, the "
                               "authors' shard format, splits and deletion datasets. Training protocols: not built "
                               "yet (docs/stories.md).")


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
