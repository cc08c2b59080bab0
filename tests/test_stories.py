"""Tests of the TinyStories data layer (wrapperlab.tasks.stories; paper App. B.3, F.1).

Expected values come from outside the code under test: shards written by hand in the authors' JSON format with
chosen features, and the expected output of every transform and split worked out by hand from the paper (App. B.3,
F.1) and the authors' code;
sentence candidates listed by hand; the generator's per-feature base rate computed analytically from the binomial
law; hand-written stories for the feature checker.
"""

from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest

from wrapperlab.tasks.stories import (
    PRETRAIN_SHARD_PERCENTAGE,
    STORY_FEATURES,
    StoriesError,
    StoryRecord,
    deletion_dataset,
    detect_features,
    filter_feature,
    generate_records,
    load_shards,
    make_text,
    mix_match,
    parse_features,
    pick_sentence,
    prompt_text,
    randomise_feature,
    recovery_set,
    split_indices,
    split_shards,
    write_shards,
)

# ------------------------------------------------------------------------------------------------------------
# Hand-built shards in the authors' format (TinyStories_all_data/dataNN.json)
# ------------------------------------------------------------------------------------------------------------

PROMPT = "Write a short story (3-5 paragraphs) which only uses very simple words...\n\nPossible story:"

# story id -> features, per shard. The story text is "<id>: ..." so every record is identifiable.
SHARDS = [
    {"s0a": ["Twist"], "s0b": [], "s0c": ["Dialogue"]},
    {"s1a": ["Twist", "Dialogue"], "s1b": ["Foreshadowing"], "s1c": [], "s1d": ["MoralValue", "Foreshadowing"]},
    {"s2a": ["badending"], "s2b": ["Foreshadowing", "Twist"], "s2c": ["Conflict"]},
    {"s3a": ["Twist"], "s3b": ["Dialogue", "Conflict", "MoralValue"], "s3c": [], "s3d": ["Foreshadowing", "BadEnding"],
     "s3e": ["Dialogue"]},
    {"s4a": [], "s4b": ["Twist", "Foreshadowing", "Conflict"], "s4c": ["Foreshadowing"]},
    {"s5a": ["Foreshadowing", "Dialogue"], "s5b": ["Twist"], "s5c": ["MoralValue"], "s5d": []},
]


def story_of(sid: str) -> str:
    return f"{sid}: Tom found a red cup. He was happy."


def shard_json(shard: dict) -> list[dict]:
    out = []
    for sid, feats in shard.items():
        obj = {"story": story_of(sid),
               "instruction": {"prompt:": PROMPT, "words": ["find", "cup", "red"], "features": feats},
               "summary": f"Summary of {sid}.", "source": "GPT-4"}
        if sid == "s1b":
            obj["instruction"]["sentence"] = "Tom found a red cup."
        if sid == "s2c":
            obj["sentence"] = "He was happy."
        out.append(obj)
    return out


@pytest.fixture()
def shard_dir(tmp_path):
    d = tmp_path / "TinyStories_all_data"
    d.mkdir()
    for i, shard in enumerate(SHARDS):
        with open(d / f"data{i:02d}.json", "w") as f:
            json.dump(shard_json(shard), f)
    (d / "README.txt").write_text("not a shard")
    return d


def ids(records) -> list[str]:
    return [r.story.split(":")[0] for r in records]


def feats(records) -> dict[str, tuple[str, ...]]:
    return {r.story.split(":")[0]: r.features for r in records}


def test_loader_reads_hand_built_shards(shard_dir):
    shards = load_shards(shard_dir)
    assert [ids(s) for s in shards] == [list(s) for s in SHARDS]
    r = shards[0][0]
    assert r == StoryRecord(story=story_of("s0a"), words=("find", "cup", "red"), features=("Twist",),
                            summary="Summary of s0a.", sentence=None)
    assert shards[2][0].features == ("BadEnding",)  # lower-case name mapped to the canonical spelling
    assert shards[1][1].sentence == "Tom found a red cup."  # instruction.sentence
    assert shards[2][2].sentence == "He was happy."  # top-level sentence
    assert load_shards(shard_dir / "data04.json") == [shards[4]]


def test_split_of_hand_built_shards(shard_dir):
    split = split_shards(load_shards(shard_dir))
    # 6 shards: test = shard 0; the other 5 -> int(5 * 0.8) = 4 pretraining (1-4), 1 fine-tuning (5)
    assert [ids(s) for s in split["test"]] == [["s0a", "s0b", "s0c"]]
    assert [ids(s)[0] for s in split["pretrain"]] == ["s1a", "s2a", "s3a", "s4a"]
    assert [ids(s) for s in split["finetune"]] == [["s5a", "s5b", "s5c", "s5d"]]


def test_transforms_on_hand_built_shards(shard_dir):
    split = split_shards(load_shards(shard_dir))
    ft = split["finetune"][0]
    pre = [r for s in split["pretrain"] for r in s]
    before = copy.deepcopy((ft, pre))

    # F: drop every story with Twist
    assert ids(filter_feature(ft, "Twist")) == ["s5a", "s5c", "s5d"]
    assert ids(filter_feature(pre, "Twist")) == ["s1b", "s1c", "s1d", "s2a", "s2c", "s3b", "s3c", "s3d", "s3e",
                                                 "s4a", "s4c"]
    # F+R at p = 1: Twist appended to every remaining instruction; at p = 0 to none
    assert feats(randomise_feature(ft, "Twist", 1.0)) == {
        "s5a": ("Foreshadowing", "Dialogue", "Twist"), "s5c": ("MoralValue", "Twist"), "s5d": ("Twist",)}
    assert feats(randomise_feature(ft, "Twist", 0.0)) == {
        "s5a": ("Foreshadowing", "Dialogue"), "s5c": ("MoralValue",), "s5d": ()}
    # F+MM: Foreshadowing -> Twist in the instruction, other features untouched
    assert feats(mix_match(ft, src="Foreshadowing", dst="Twist")) == {
        "s5a": ("Twist", "Dialogue"), "s5c": ("MoralValue",), "s5d": ()}
    assert feats(mix_match(pre, src="Foreshadowing", dst="Twist")) == {
        "s1b": ("Twist",), "s1c": (), "s1d": ("MoralValue", "Twist"), "s2a": ("BadEnding",), "s2c": ("Conflict",),
        "s3b": ("Dialogue", "Conflict", "MoralValue"), "s3c": (), "s3d": ("Twist", "BadEnding"),
        "s3e": ("Dialogue",), "s4a": (), "s4c": ("Twist",)}
    # reFT set: only Twist stories
    assert ids(recovery_set(ft, "Twist")) == ["s5b"]
    assert ids(recovery_set(pre, "Twist")) == ["s1a", "s2b", "s3a", "s4b"]
    assert ids(recovery_set(pre, "Conflict")) == ["s2c", "s3b", "s4b"]

    # deletion_dataset composes the same transforms
    assert deletion_dataset(ft, "F") == filter_feature(ft, "Twist")
    assert deletion_dataset(ft, "F+R") == randomise_feature(ft, "Twist", 1.0)
    assert deletion_dataset(ft, "F+MM") == mix_match(ft, "Foreshadowing", "Twist")

    # the STORY never changes, only the instruction's features; inputs are not mutated
    for out in (randomise_feature(pre, "Twist"), mix_match(pre), deletion_dataset(pre, "F+R")):
        for r in out:
            assert r.story == story_of(r.story.split(":")[0])
            assert r.summary == f"Summary of {r.story.split(':')[0]}."
    assert (ft, pre) == before


def test_randomise_feature_partial_probability():
    recs = [StoryRecord(f"story {i}.", ("a", "b", "c"), (), "s.") for i in range(2000)]
    out = randomise_feature(recs, "Twist", 0.3, rng=np.random.default_rng(5))
    assert [r.story for r in out] == [r.story for r in recs]
    assert {r.features for r in out} == {(), ("Twist",)}
    share = sum(r.features == ("Twist",) for r in out) / len(out)
    assert abs(share - 0.3) < 0.05  # binomial sd = 0.010
    assert out == randomise_feature(recs, "Twist", 0.3, rng=np.random.default_rng(5))
    with pytest.raises(StoriesError, match="rng"):
        randomise_feature(recs, "Twist", 0.3)
    with pytest.raises(StoriesError):
        randomise_feature(recs, "Twist", 1.5)


def test_bad_transform_arguments():
    recs = [StoryRecord("x.", ("a",), ("Twist",), "s.")]
    with pytest.raises(StoriesError, match="Surprise"):
        filter_feature(recs, "Surprise")
    with pytest.raises(StoriesError, match="unknown deletion kind"):
        deletion_dataset(recs, "F+X")
    with pytest.raises(StoriesError):
        mix_match(recs, "Twist", "Twist")


# ------------------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, pretrain, finetune", [
    (3, [1], [2]),                                   # smallest valid: 2 rest shards -> int(1.6) = 1
    (6, [1, 2, 3, 4], [5]),                          # 5 -> 4
    (7, [1, 2, 3, 4], [5, 6]),                       # 6 -> int(4.8) = 4 (rounded down)
    (11, list(range(1, 9)), [9, 10]),                # 10 -> 8
    (50, list(range(1, 40)), list(range(40, 50))),   # the real dataset: 49 -> int(39.2) = 39
])
def test_split_indices(n, pretrain, finetune):
    assert PRETRAIN_SHARD_PERCENTAGE == 0.8
    assert split_indices(n) == {"test": [0], "pretrain": pretrain, "finetune": finetune}


@pytest.mark.parametrize("n", [0, 1, 2])
def test_too_few_shards(n):
    with pytest.raises(StoriesError, match=f"cannot split {n} shard"):
        split_indices(n)
    with pytest.raises(StoriesError):
        split_shards([[]] * n)


# ------------------------------------------------------------------------------------------------------------
# Text format
# ------------------------------------------------------------------------------------------------------------

REC = StoryRecord(story="Tom ran to the park. He saw a red cup.", words=("run", "cup", "red"),
                  features=("Dialogue", "Twist"), summary="Tom finds a\nred cup.", sentence="He saw a red cup.")
EXPECTED_LINES = {"Words: run, cup, red", "Features: Dialogue, Twist", "Summary: Tom finds a red cup.",
                  "Sentence: He saw a red cup."}


def test_make_text_lines_and_shuffle():
    orders = set()
    for seed in range(40):
        text = make_text(REC, seed)
        assert text.endswith("\nStory: Tom ran to the park. He saw a red cup.")
        lines = text.split("\n")
        assert lines[-1] == "Story: " + REC.story
        assert set(lines[:-1]) == EXPECTED_LINES and len(lines) == 5
        for key in ("Words: ", "Features: ", "Summary: ", "Sentence: ", "Story: "):
            assert sum(ln.startswith(key) for ln in lines) == 1
        orders.add(tuple(lines[:-1]))
        assert parse_features(text) == ("Dialogue", "Twist")
        prompt = prompt_text(REC, seed)
        assert prompt.endswith("\nStory: ") and text == prompt + REC.story
    assert len(orders) > 5  # 24 possible orders


def test_make_text_same_seed_same_text():
    assert make_text(REC, np.random.default_rng(3)) == make_text(REC, np.random.default_rng(3))


def test_empty_features_line():
    rec = StoryRecord("  A cat sat.\n", ("sit",), (), "A cat sits.", "A cat sat.")
    text = make_text(rec, 0)
    assert "Features: " in text.split("\n") and text.endswith("\nStory: A cat sat.")
    assert parse_features(text) == ()
    short = make_text(rec, 0, omit_empty_features=True)
    assert not any(ln.startswith("Features:") for ln in short.split("\n")) and len(short.split("\n")) == 4
    assert parse_features(short) == ()


def test_missing_sentence_picks_an_unquoted_sentence():
    story = 'Tom ran.\n"Hi, Tom!" said Mia. Mia smiled! Was it\nfun?'
    rec = StoryRecord(story, ("run",), (), "Tom runs.")
    picked = set()
    for seed in range(60):
        (line,) = [ln for ln in make_text(rec, seed).split("\n") if ln.startswith("Sentence: ")]
        picked.add(line[len("Sentence: "):])
    assert picked == {"Tom ran.", "Mia smiled!", "Was it fun?"}
    assert pick_sentence('"Hi!" said Tom.', 0) in {'"Hi!', '" said Tom.'}  # every piece quoted: fall back to all
    assert pick_sentence("", 0) == ""


def test_parse_features_spellings_and_errors():
    assert parse_features("Words: a\nFeatures: Badending, Moralvalue\nStory: x") == ("BadEnding", "MoralValue")
    assert parse_features("Words: a\nStory: Features: Twist") == ()  # the story is not an instruction line
    with pytest.raises(StoriesError, match="Suspense"):
        parse_features("Features: Twist, Suspense\nStory: x")
    with pytest.raises(StoriesError):
        parse_features("Features: Twist\nFeatures: Dialogue\nStory: x")


# ------------------------------------------------------------------------------------------------------------
# Malformed shards
# ------------------------------------------------------------------------------------------------------------


def good(i: int) -> dict:
    return {"story": f"Story {i}.", "instruction": {"prompt:": PROMPT, "words": ["a", "b", "c"], "features": []},
            "summary": "S."}


def with_bad_17(mutate) -> list:
    data = [good(i) for i in range(20)]
    mutate(data[17])
    return data


@pytest.mark.parametrize("content, message", [
    (with_bad_17(lambda r: r["instruction"].update(features="Twist")),
     "data03.json: record 17: features must be a list of strings"),
    (with_bad_17(lambda r: r["instruction"].update(features=["Twist", "Suspense", "Humour"])),
     "data03.json: record 17: unknown features 'Suspense', 'Humour'"),
    (with_bad_17(lambda r: r["instruction"].update(words=["a", 3])),
     "data03.json: record 17: words must be a list of strings"),
    (with_bad_17(lambda r: r.pop("story")), "data03.json: record 17: missing key 'story'"),
    (with_bad_17(lambda r: r.update(summary=None)), "data03.json: record 17: summary must be a string"),
    (with_bad_17(lambda r: r.update(sentence=["x"])), "data03.json: record 17: sentence must be a string or null"),
    (with_bad_17(lambda r: r.update(instruction="none")), "data03.json: record 17: instruction must be an object"),
    ({"story": "x"}, "data03.json: expected a JSON list of records, got dict"),
    ("[{\"story\": ", "data03.json: not valid JSON"),
])
def test_malformed_shard(tmp_path, content, message):
    for i in range(3):
        (tmp_path / f"data{i:02d}.json").write_text(json.dumps([good(0)]))
    (tmp_path / "data03.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(StoriesError) as e:
        load_shards(tmp_path)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_missing_shards(tmp_path):
    with pytest.raises(StoriesError, match="no data"):
        load_shards(tmp_path)
    with pytest.raises(StoriesError, match="no such file"):
        load_shards(tmp_path / "nope.json")


# ------------------------------------------------------------------------------------------------------------
# Procedural stories and the exact checker
# ------------------------------------------------------------------------------------------------------------


def rate_given_at_most(p: float, k_max: int = 3, n: int = 6) -> float:
    """P(a given feature | <= k_max of n independent Bernoulli(p) features), from the binomial law."""
    q = 1 - p
    joint = p * sum(math.comb(n - 1, j) * p**j * q ** (n - 1 - j) for j in range(k_max))
    return joint / sum(math.comb(n, k) * p**k * q ** (n - k) for k in range(k_max + 1))


def test_generator_and_checker_agree():
    records = [r for seed in range(4) for r in generate_records(600, np.random.default_rng(seed))]
    assert len(records) == 2400
    counts = dict.fromkeys(STORY_FEATURES, 0)
    for r in records:
        assert detect_features(r.story) == set(r.features), (r.features, r.story)
        assert len(r.features) <= 3 and len(set(r.features)) == len(r.features)
        assert 40 <= len(r.story.split()) <= 130
        words = set(re.findall(r"[A-Za-z]+", r.story))
        assert len(r.words) == 3 and set(r.words) <= words
        assert r.sentence in r.story and '"' not in r.sentence
        assert r.summary.endswith(".") and r.summary.count(".") == 1
        assert parse_features(make_text(r, 0)) == r.features
        for f in r.features:
            counts[f] += 1
    expected = rate_given_at_most(0.25)  # = 0.2329
    for f, c in counts.items():
        assert abs(c / len(records) - expected) < 0.035, (f, c / len(records), expected)  # binomial sd = 0.0086
    assert sum(not r.features for r in records) > 0  # some stories have no feature


def test_generator_rate_mapping():
    only_twist = generate_records(50, 1, feature_rate={"Twist": 1.0})
    assert all(r.features == ("Twist",) and detect_features(r.story) == {"Twist"} for r in only_twist)
    assert all(r.features == () and detect_features(r.story) == set() for r in generate_records(50, 1, 0.0))
    with pytest.raises(StoriesError):
        generate_records(5, 1, feature_rate={"Suspense": 0.5})
    with pytest.raises(StoriesError):
        generate_records(5, 1, feature_rate=1.0)  # six sure features can never fit in three


def test_generator_is_deterministic():
    a = generate_records(30, np.random.default_rng(11))
    assert a == generate_records(30, np.random.default_rng(11)) == generate_records(30, 11)
    assert a != generate_records(30, 12)


BASE = "Lily was a little cat. Lily had a friend named Ben. One day, they found a red ball under a tree."
HAPPY = " Lily and Ben were very happy."


@pytest.mark.parametrize("story, expected", [
    (BASE + HAPPY, set()),
    # Twist: marker + an object named earlier + a different noun
    (BASE + " But then, to everyone's surprise, the ball was really a dragon!" + HAPPY, {"Twist"}),
    (BASE + " Then something unexpected happened: the ball turned into an owl!" + HAPPY, {"Twist"}),
    (BASE + " But then, to everyone's surprise, the kite was really a dragon!" + HAPPY, set()),  # no kite before
    (BASE + " But then, to everyone's surprise, the ball was really a ball!" + HAPPY, set()),
    (BASE + " To everyone's surprise, the ball was a dragon." + HAPPY, set()),
    # Foreshadowing: hint and a later callback with the same item
    ("Lily put a rope in a bag, not knowing it would be useful later. " + BASE
     + " Good thing Lily had brought the rope!" + HAPPY, {"Foreshadowing"}),
    ("Lily saw an old key by the door and took it, just in case. " + BASE
     + " At last, Lily knew why the key was needed." + HAPPY, {"Foreshadowing"}),
    ("Lily put a rope in a bag, not knowing it would be useful later. " + BASE + HAPPY, set()),
    (BASE + " Good thing Lily had brought the rope!" + HAPPY, set()),
    ("Lily put a rope in a bag, not knowing it would be useful later. " + BASE
     + " Good thing Lily had brought the lamp!" + HAPPY, set()),
    ("Good thing Lily had brought the rope! Lily put a rope in a bag, not knowing it would be useful later. "
     + BASE + HAPPY, set()),
    # Dialogue: quoted speech
    (BASE + ' "Look at this red ball!" said Lily.' + HAPPY, {"Dialogue"}),
    (BASE + " Lily said that the ball was red." + HAPPY, set()),
    # Conflict: two different characters want different things
    (BASE + " Lily wanted to keep the ball, but Ben wanted to share it. They could not agree." + HAPPY, {"Conflict"}),
    (BASE + " Lily and Ben both wanted the ball, and they began to fight over it." + HAPPY, {"Conflict"}),
    (BASE + " Lily wanted to keep the ball, but Lily wanted to share it. They could not agree." + HAPPY, set()),
    (BASE + " Lily wanted to keep the ball, but Ben wanted to keep it. They could not agree." + HAPPY, set()),
    (BASE + " Lily wanted to keep the ball." + HAPPY, set()),
    # BadEnding: a sad sentence at the end (or just before a final moral)
    (BASE + " Lily never saw the ball again.", {"BadEnding"}),
    (BASE + " The ball was lost forever, and Lily cried.", {"BadEnding"}),
    (BASE + " Lily was sad for a long time." + HAPPY, set()),  # sad in the middle, happy ending
    # MoralValue: the last sentence states the moral
    (BASE + HAPPY + " The moral of the story is that sharing is caring.", {"MoralValue"}),
    (BASE + HAPPY + " From that day on, Lily knew that it is good to be kind.", {"MoralValue"}),
    (BASE + " The moral of the story is that sharing is caring." + HAPPY, set()),
    (BASE + " Lily was sad for a long time. The moral of the story is that sharing is caring.",
     {"BadEnding", "MoralValue"}),
    # several at once
    (BASE + ' "What a red ball!" said Lily. Then something unexpected happened: the ball turned into a cake!'
     + " Lily never saw the ball again.", {"Dialogue", "Twist", "BadEnding"}),
])
def test_checker_on_hand_written_stories(story, expected):
    assert detect_features(story) == expected


# ------------------------------------------------------------------------------------------------------------
# write_shards -> load_shards
# ------------------------------------------------------------------------------------------------------------


def test_write_load_round_trip(tmp_path):
    hand = [StoryRecord('Zoë ran. "Hi!" said Tom.', ("run", "hi", "fast"), ("Dialogue", "BadEnding"), "Zoë runs.",
                        None),
            StoryRecord("A cat.", ("a", "b", "c"), (), "A cat.", "A cat.")]
    shards = [hand, generate_records(7, 0), [], generate_records(5, 1)]
    paths = write_shards(shards, tmp_path / "out", source="wrapperlab")
    assert [p.name for p in paths] == ["data00.json", "data01.json", "data02.json", "data03.json"]
    assert load_shards(tmp_path / "out") == shards
    raw = json.loads((tmp_path / "out" / "data00.json").read_text(encoding="utf-8"))
    assert raw[0]["instruction"]["words"] == ["run", "hi", "fast"]
    assert raw[0]["instruction"]["features"] == ["Dialogue", "BadEnding"]
    assert isinstance(raw[0]["instruction"]["prompt:"], str) and "sentence" not in raw[0]
    assert raw[1]["sentence"] == "A cat." and raw[1]["source"] == "wrapperlab"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary files left
    write_shards(shards, tmp_path / "out")  # same names: overwritten in place
    with pytest.raises(StoriesError, match="data03.json"):
        write_shards(shards[:2], tmp_path / "out")  # would leave stale data02/data03 behind
