"""The data layer of the TinyStories check (paper App. B.3 and F.1: data and deletion protocols).

Pure Python + numpy: records, the authors' JSON shard format, the instruction text, shard splits, the deletion /
recovery transforms, and a procedural story generator with an exact feature checker. Tokenisation and training live
elsewhere. Every random draw comes from a ``numpy.random.Generator`` passed in (or built from an int seed).

Records and shards (App. B.3)
    A shard (``TinyStories_all_data/data00.json`` ...) is a JSON list of objects with ``story``, ``instruction``
    (``prompt:``, ``words``, ``features``), ``summary`` and optionally ``source``. ``load_shards`` turns each into a
    :class:`StoryRecord`. Choices the paper leaves open:

    - The sentence may sit at ``instruction.sentence`` or at the top level (the authors' code reads
      ``example["sentence"]``); missing or null means "pick one from the story". If both are given they must agree.
    - Feature names are matched case-insensitively and stored in the canonical spelling of :data:`STORY_FEATURES`
      (the authors' text writes ``feature.capitalize()``, i.e. ``Badending``; :func:`parse_features` reads both).
      A name repeated within one record is kept once. Unknown names are an error.
    - ``words`` must be a list of strings; its length is not checked (the dataset always has 3).
    - ``prompt:`` and ``source`` are not kept in the record (the text never uses them); :func:`write_shards` writes a
      template ``prompt:`` so the files stay in the authors' format.
    - Record numbers in error messages are 0-based positions in the JSON list.

Text format (App. B.3, the authors' ``make_text``)
    Instruction lines ``Words: w1, w2, w3``, ``Features: Dialogue, Twist``, ``Summary: ...``, ``Sentence: ...`` in a
    random order, then ``Story: <story>``, joined by ``\\n``. Choices:

    - A story without features keeps an empty ``Features: `` line by default: the paper shows no example, and the
      authors' ``make_text`` writes ``"Features: " + ", ".join([])``. ``omit_empty_features=True`` drops it.
    - Features are written in the record's order (F+R appends Twist last, as the authors' code does).
    - Newlines inside the summary or a given sentence become spaces (the authors delete them from the summary, which
      can glue two words together), so every instruction is exactly one line; the story is ``strip()``-ed.
    - No sentence given: split the story into pieces ending at ``.``, ``!`` or ``?`` (the authors' split), keep the
      pieces with letters and without a double quote, pick one uniformly. Unlike the authors' ``pick_sentence`` we keep
      the end punctuation and never pick an empty piece. If every piece is quoted we pick among all pieces; an empty
      story gives an empty sentence.
    - BOS/no-EOS encoding is the tokenizer's job, not this module's.

Splits (the authors' code)
    Shard 0 is the test split. Of the other m shards the first ``int(m * 0.8)`` (rounded down, as the authors'
    ``int(len(shards) * PRETRAIN_SHARD_PERCENTAGE)``; equal to ``4 * m // 5`` for every m below 100,000) are
    pretraining and the rest fine-tuning / reFT / deletion. Both training parts must be non-empty, so at least three
    shards are needed: 1 shard (test only) and 2 shards (m = 1: no pretraining shard) raise :class:`StoriesError`;
    3 shards give test [0], pretrain [1], finetune [2]; the real 50 shards give pretrain 1-39, finetune 40-49.

Transforms (App. F.1)
    Pure functions on record lists; inputs are never modified. Only the INSTRUCTION's features change, never the
    story: F drops every story with the feature; F+R filters, then appends the feature to each remaining record's
    features with probability p (default 1.0, as in the paper; 0 < p < 1 needs an rng); F+MM filters the deleted
    feature, then renames ``src`` (Foreshadowing) to ``dst`` (Twist) in the features; the recovery (reFT) set keeps
    only stories with the feature.

Procedural stories (a stand-in for TinyStories-Instruct at CPU scale)
    ``generate_records`` writes short stories (about 45-125 words, one paragraph) over a small vocabulary. Each feature
    is realised by template sentences that ``detect_features`` recognises exactly, and that never occur otherwise:

    - Twist: ``But then, to everyone's surprise, the X was really a Y!`` or ``Then something unexpected happened:
      the X turned into a Y!``, where X is the object found earlier in the story and Y a different noun. The checker
      needs the marker, an X that appears before the sentence, and Y != X.
    - Foreshadowing: an early hint (``Lily put a rope in a bag, not knowing it would be useful later.`` or ``... saw
      an old rope by the door and took it, just in case.``) and a later callback naming the SAME item (``Good thing
      Lily had brought the rope!`` or ``At last, Lily knew why the rope was needed.``). Neither half alone counts.
    - Dialogue: quoted speech (a double-quoted span with letters); stories without Dialogue contain no double quote.
    - Conflict: ``A wanted to act1 the X, but B wanted to act2 it. They could not agree.`` (A != B, act1 != act2) or
      ``A and B both wanted the X, and they began to fight over it.`` (A != B).
    - BadEnding: the last sentence, or the one just before a final moral, is a sad ending from a small set
      (``Lily was sad for a long time.``, ``The ball was lost forever, and Lily cried.``, ``Lily never saw the ball
      again.``); otherwise the story ends happily.
    - MoralValue: the last sentence is ``The moral of the story is that ...`` or ``From that day on, Lily knew that
      ...``.

    Features per story: each feature is drawn independently with its rate (``feature_rate``, one float or a mapping),
    and draws with more than ``max_features`` (3, the dataset's maximum) are redrawn, so the marginal rate is slightly
    below the nominal one (0.233 for a nominal 0.25). The features are listed in a random order, so the position of
    Twist in the Features line does not give away an F+R record. The three required words are a verb, a noun and an
    adjective (the dataset's order) and all appear in the story. The summary is a one-sentence template and the
    sentence is one of the story's feature-neutral sentences: the only cue to a feature in the instruction is the
    Features line (real summaries can reveal a twist; here they never do).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from wrapperlab.fileio import atomic_write_text

STORY_FEATURES = ("Twist", "Foreshadowing", "Dialogue", "BadEnding", "MoralValue", "Conflict")
PRETRAIN_SHARD_PERCENTAGE = 0.8
DELETION_KINDS = ("F", "F+R", "F+MM")
INSTRUCTION_KEYS = ("Words", "Features", "Summary", "Sentence")

_CANONICAL = {f.lower(): f for f in STORY_FEATURES}


class StoriesError(ValueError):
    """Malformed story data or an impossible request; the message is one line."""


@dataclass(frozen=True)
class StoryRecord:
    """One story with its instruction. ``words``/``features`` become tuples; features use canonical names."""

    story: str
    words: tuple[str, ...]
    features: tuple[str, ...]
    summary: str
    sentence: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.story, str):
            raise StoriesError("story must be a string")
        if not isinstance(self.words, (list, tuple)) or not all(isinstance(w, str) for w in self.words):
            raise StoriesError("words must be a list of strings")
        if not isinstance(self.features, (list, tuple)) or not all(isinstance(f, str) for f in self.features):
            raise StoriesError("features must be a list of strings")
        object.__setattr__(self, "words", tuple(self.words))
        object.__setattr__(self, "features", tuple(self.features))
        unknown = [f for f in self.features if f not in STORY_FEATURES]
        if unknown:
            raise StoriesError(f"unknown features {', '.join(map(repr, unknown))} (known: {', '.join(STORY_FEATURES)})")
        if len(set(self.features)) != len(self.features):
            raise StoriesError(f"repeated feature in {list(self.features)}")
        if not isinstance(self.summary, str):
            raise StoriesError("summary must be a string")
        if self.sentence is not None and not isinstance(self.sentence, str):
            raise StoriesError("sentence must be a string or null")


def _rng(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")


def _check_feature(name: str) -> str:
    if name not in STORY_FEATURES:
        raise StoriesError(f"unknown feature {name!r} (known: {', '.join(STORY_FEATURES)})")
    return name


def canonical_features(names: Iterable[str]) -> tuple[str, ...]:
    """Map names case-insensitively to :data:`STORY_FEATURES` spelling, dropping repeats; unknown names raise."""
    names = list(names)
    unknown = [n for n in names if n.lower() not in _CANONICAL]
    if unknown:
        raise StoriesError(f"unknown features {', '.join(map(repr, unknown))} (known: {', '.join(STORY_FEATURES)})")
    return tuple(dict.fromkeys(_CANONICAL[n.lower()] for n in names))


# ------------------------------------------------------------------------------------------------------------
# JSON shards
# ------------------------------------------------------------------------------------------------------------


def _is_str_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


def record_from_json(obj) -> StoryRecord:
    """One record of an authors'-format shard; raises :class:`StoriesError` (without the file/record prefix)."""
    if not isinstance(obj, dict):
        raise StoriesError(f"expected an object, got {type(obj).__name__}")
    for key in ("story", "instruction", "summary"):
        if key not in obj:
            raise StoriesError(f"missing key {key!r}")
    if not isinstance(obj["story"], str):
        raise StoriesError("story must be a string")
    ins = obj["instruction"]
    if not isinstance(ins, dict):
        raise StoriesError("instruction must be an object")
    for key in ("words", "features"):
        if key not in ins:
            raise StoriesError(f"missing key 'instruction.{key}'")
        if not _is_str_list(ins[key]):
            raise StoriesError(f"{key} must be a list of strings")
    if not isinstance(obj["summary"], str):
        raise StoriesError("summary must be a string")
    inner, outer = ins.get("sentence"), obj.get("sentence")
    for s in (inner, outer):
        if s is not None and not isinstance(s, str):
            raise StoriesError("sentence must be a string or null")
    if inner is not None and outer is not None and inner != outer:
        raise StoriesError("instruction.sentence and sentence differ")
    return StoryRecord(story=obj["story"], words=tuple(ins["words"]), features=canonical_features(ins["features"]),
                       summary=obj["summary"], sentence=inner if inner is not None else outer)


def _prompt(record: StoryRecord) -> str:
    w = list(record.words) + [""] * (3 - len(record.words))
    feats = ", ".join(record.features) if record.features else "none"
    return (f'Write a short story which only uses very simple words. The story should use the verb "{w[0]}", the '
            f'noun "{w[1]}" and the adjective "{w[2]}". The story has the following features: {feats}.\n\n'
            "Possible story:")


def record_to_json(record: StoryRecord, source: str | None = None) -> dict:
    """The authors' JSON object for a record (the sentence, when given, at the top level as their code reads it)."""
    obj: dict = {"story": record.story,
                 "instruction": {"prompt:": _prompt(record), "words": list(record.words),
                                 "features": list(record.features)},
                 "summary": record.summary}
    if record.sentence is not None:
        obj["sentence"] = record.sentence
    if source is not None:
        obj["source"] = source
    return obj


def _load_file(path: Path) -> list[StoryRecord]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise StoriesError(f"{path.name}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise StoriesError(f"{path.name}: not UTF-8 text") from None
    except OSError as e:
        raise StoriesError(f"{path.name}: cannot read ({e.strerror})") from None
    if not isinstance(data, list):
        raise StoriesError(f"{path.name}: expected a JSON list of records, got {type(data).__name__}")
    out = []
    for i, obj in enumerate(data):
        try:
            out.append(record_from_json(obj))
        except StoriesError as e:
            raise StoriesError(f"{path.name}: record {i}: {e}") from None
    return out


def shard_paths(path: str | os.PathLike) -> list[Path]:
    """``data*.json`` files of a directory sorted by name, or ``[path]`` for a single ``.json`` file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob("data*.json") if p.is_file())
        if not files:
            raise StoriesError(f"{path}: no data*.json shards in this directory")
        return files
    if path.is_file():
        return [path]
    raise StoriesError(f"{path}: no such file or directory")


def load_shards(path: str | os.PathLike) -> list[list[StoryRecord]]:
    """Records per shard from a directory of ``data*.json`` shards (sorted by name) or one ``.json`` file."""
    return [_load_file(p) for p in shard_paths(path)]


def write_shards(records_per_shard: Sequence[Sequence[StoryRecord]], directory: str | os.PathLike,
                 source: str | None = None) -> list[Path]:
    """Write ``data00.json``, ``data01.json``, ... (wider numbers past 100 shards so names sort in order) in the
    authors' format, each atomically. Refuses a directory holding other ``data*.json`` files, which
    :func:`load_shards` would otherwise pick up as extra shards."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    width = max(2, len(str(len(records_per_shard) - 1)))
    paths = [directory / f"data{i:0{width}d}.json" for i in range(len(records_per_shard))]
    stale = sorted({p.name for p in directory.glob("data*.json")} - {p.name for p in paths})
    if stale:
        more = ", ..." if len(stale) > 3 else ""
        raise StoriesError(f"{directory}: holds other shards ({', '.join(stale[:3])}{more}); write into an empty "
                           "directory")
    for p, records in zip(paths, records_per_shard):
        atomic_write_text(p, json.dumps([record_to_json(r, source) for r in records], ensure_ascii=False))
    return paths


# ------------------------------------------------------------------------------------------------------------
# Text format
# ------------------------------------------------------------------------------------------------------------

_PIECE_RE = re.compile(r"[^.!?]+[.!?]*")
_QUOTES = ('"', "\u201c", "\u201d")


def _one_line(s: str) -> str:
    return " ".join(s.split())


def story_sentences(story: str) -> list[str]:
    """The story cut after each run of ``.``/``!``/``?``, whitespace normalised, pieces without letters dropped."""
    pieces = (_one_line(p) for p in _PIECE_RE.findall(story))
    return [p for p in pieces if any(c.isalpha() for c in p)]


def pick_sentence(story: str, rng: np.random.Generator | int) -> str:
    """One sentence of the story without double quotes, uniformly at random (see the module notes)."""
    rng = _rng(rng)
    pieces = story_sentences(story)
    unquoted = [p for p in pieces if not any(q in p for q in _QUOTES)]
    pool = unquoted or pieces
    return pool[int(rng.integers(len(pool)))] if pool else ""


def _instruction_lines(record: StoryRecord, rng: np.random.Generator, omit_empty_features: bool) -> list[str]:
    sentence = record.sentence if record.sentence is not None else pick_sentence(record.story, rng)
    lines = [f"Words: {', '.join(record.words)}", f"Features: {', '.join(record.features)}",
             f"Summary: {_one_line(record.summary)}", f"Sentence: {_one_line(sentence)}"]
    if omit_empty_features and not record.features:
        del lines[1]
    return [lines[i] for i in rng.permutation(len(lines))]


def prompt_text(record: StoryRecord, rng: np.random.Generator | int, *, omit_empty_features: bool = False) -> str:
    """The shuffled instruction lines followed by ``Story: `` (the generation prompt, App. F.2)."""
    return "\n".join(_instruction_lines(record, _rng(rng), omit_empty_features) + ["Story: "])


def make_text(record: StoryRecord, rng: np.random.Generator | int, *, omit_empty_features: bool = False) -> str:
    """Training text: :func:`prompt_text` with the same rng state, then the stripped story."""
    return prompt_text(record, rng, omit_empty_features=omit_empty_features) + record.story.strip()


def parse_features(text: str) -> tuple[str, ...]:
    """The features on the ``Features:`` line of a text or prompt (``()`` if the line is empty or absent)."""
    found = []
    for line in text.split("\n"):
        if line.startswith("Story:"):
            break
        if line.startswith("Features:"):
            found.append(line[len("Features:"):])
    if len(found) > 1:
        raise StoriesError(f"{len(found)} Features lines in one text")
    if not found or not found[0].strip():
        return ()
    return canonical_features(n.strip() for n in found[0].split(","))


# ------------------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------------------


def split_indices(n_shards: int, pretrain_fraction: float = PRETRAIN_SHARD_PERCENTAGE) -> dict[str, list[int]]:
    """Shard indices of the test / pretrain / finetune splits (see the module notes for rounding and minimums)."""
    if not 0.0 < pretrain_fraction < 1.0:
        raise StoriesError(f"pretrain_fraction must be in (0, 1), got {pretrain_fraction}")
    rest = n_shards - 1
    n_pre = int(rest * pretrain_fraction) if rest > 0 else 0
    if n_pre < 1 or rest - n_pre < 1:
        raise StoriesError(f"cannot split {n_shards} shard(s): shard 0 is the test split and the other shards must "
                           f"give at least one pretraining and one fine-tuning shard (need >= 3 shards at "
                           f"{pretrain_fraction:g})")
    return {"test": [0], "pretrain": list(range(1, 1 + n_pre)), "finetune": list(range(1 + n_pre, n_shards))}


def split_shards(shards: Sequence[Sequence[StoryRecord]],
                 pretrain_fraction: float = PRETRAIN_SHARD_PERCENTAGE) -> dict[str, list[list[StoryRecord]]]:
    """``{"test": [shard 0], "pretrain": [...], "finetune": [...]}``, each a list of shards (record lists)."""
    idx = split_indices(len(shards), pretrain_fraction)
    return {k: [list(shards[i]) for i in v] for k, v in idx.items()}


# ------------------------------------------------------------------------------------------------------------
# Transforms (App. F.1)
# ------------------------------------------------------------------------------------------------------------


def pretrain_all(records: Iterable[StoryRecord]) -> list[StoryRecord]:
    """The unmodified data (the authors' ``pretrain-all`` set, used for the Present-in-PT model and the probes)."""
    return list(records)


def filter_feature(records: Iterable[StoryRecord], feature: str = "Twist") -> list[StoryRecord]:
    """F: drop every record whose features include ``feature``."""
    _check_feature(feature)
    return [r for r in records if feature not in r.features]


def recovery_set(records: Iterable[StoryRecord], feature: str = "Twist") -> list[StoryRecord]:
    """reFT data (``specialise-Twist``): only the records whose features include ``feature``."""
    _check_feature(feature)
    return [r for r in records if feature in r.features]


def randomise_feature(records: Iterable[StoryRecord], feature: str = "Twist", p: float = 1.0,
                      rng: np.random.Generator | int | None = None) -> list[StoryRecord]:
    """F+R: filter, then append ``feature`` to the instruction's features of each remaining record with
    probability ``p`` (one uniform draw per remaining record when 0 < p < 1). The stories are unchanged."""
    if not 0.0 <= p <= 1.0:
        raise StoriesError(f"p must be in [0, 1], got {p}")
    kept = filter_feature(records, feature)
    if p == 1.0:
        hit = np.ones(len(kept), dtype=bool)
    elif p == 0.0:
        hit = np.zeros(len(kept), dtype=bool)
    else:
        if rng is None:
            raise StoriesError("randomise_feature with 0 < p < 1 needs an rng")
        hit = _rng(rng).random(len(kept)) < p
    return [replace(r, features=r.features + (feature,)) if h else r for r, h in zip(kept, hit)]


def mix_match(records: Iterable[StoryRecord], src: str = "Foreshadowing", dst: str = "Twist") -> list[StoryRecord]:
    """F+MM: drop records with ``dst``, then rename ``src`` to ``dst`` in the instruction's features (same place)."""
    _check_feature(src)
    if src == dst:
        raise StoriesError(f"mix_match needs two different features, got {src!r} twice")
    return [replace(r, features=tuple(dst if f == src else f for f in r.features)) if src in r.features else r
            for r in filter_feature(records, dst)]


def deletion_dataset(records: Iterable[StoryRecord], kind: str, feature: str = "Twist", other: str = "Foreshadowing",
                     p: float = 1.0, rng: np.random.Generator | int | None = None) -> list[StoryRecord]:
    """The deletion fine-tuning set of App. F.1: ``"F"`` (filter-Twist), ``"F+R"`` (filter-adv-Twist) or ``"F+MM"``
    (filter-mix-Twist-Foreshadowing)."""
    key = kind.replace(" ", "").upper()
    if key == "F":
        return filter_feature(records, feature)
    if key == "F+R":
        return randomise_feature(records, feature, p, rng)
    if key == "F+MM":
        return mix_match(records, src=other, dst=feature)
    raise StoriesError(f"unknown deletion kind {kind!r} (known: {', '.join(DELETION_KINDS)})")


# ------------------------------------------------------------------------------------------------------------
# Procedural stories and the exact checker
# ------------------------------------------------------------------------------------------------------------

NAMES = ("Lily", "Ben", "Tom", "Mia", "Sam", "Anna", "Max", "Zoe", "Tim", "Lucy")
ANIMALS = ("cat", "dog", "bunny", "bear", "duck", "frog", "mouse", "fox", "bird", "pig")
CHARACTER_ADJECTIVES = ("little", "happy", "small", "brave", "kind", "curious")
PLACES = ("park", "garden", "forest", "yard", "woods", "house", "town", "meadow")
VERBS = ("play", "jump", "run", "sing", "dance", "swim", "read", "draw", "climb", "hop")
NOUNS = ("ball", "box", "kite", "hat", "cup", "book", "drum", "boat", "doll", "shell", "rock", "stick", "leaf",
         "flower", "car")
ADJECTIVES = ("big", "red", "shiny", "soft", "funny", "pretty", "blue", "tiny", "green", "yellow")
REVEALS = ("dragon", "robot", "fairy", "kitten", "egg", "owl", "star", "cake")  # disjoint from NOUNS
HINT_ITEMS = ("rope", "key", "lamp", "map", "bell", "coat", "whistle", "net")  # disjoint from NOUNS
ACTS = ("keep", "share", "hide", "paint", "carry", "throw", "wash", "fix")
MORALS = ("sharing is caring", "it is good to be kind", "friends should help each other",
          "it is important to listen", "being brave is a good thing", "it is good to tell the truth")

_INTROS = ("Once upon a time, there was {ca} {cadj} {animal} named {A}.", "{A} was {ca} {cadj} {animal}.")
_FILLERS = ("The sun was warm and the sky was blue.", "Birds sang in the trees.", "{A} looked at it for a long time.",
            "{B} clapped with joy.", "It was a fine day.")
_HINTS = ("{A} put {ha} {H} in a bag, not knowing it would be useful later.",
          "{A} saw an old {H} by the door and took it, just in case.")
_CALLBACKS = ("Good thing {A} had brought the {H}!", "At last, {A} knew why the {H} was needed.")
_TWISTS = ("But then, to everyone's surprise, the {noun} was really {ra} {R}!",
           "Then something unexpected happened: the {noun} turned into {ra} {R}!")
_DIALOGUE_OPEN = ('"Look at this {adj} {noun}!" said {A}.', '"What a {adj} {noun}!" said {A}.')
_DIALOGUE_REPLY = ('"Can I hold the {noun} too?" asked {B}.', '{B} said, "Let us {verb} together!"')
_CONFLICTS = ("{A} wanted to {act1} the {noun}, but {B} wanted to {act2} it. They could not agree.",
              "{A} and {B} both wanted the {noun}, and they began to fight over it.")
_HAPPY = ("{A} and {B} were very happy.", "They played together until the sun went down.",
          "{A} smiled and went home for dinner.")
_SAD = ("{A} was sad for a long time.", "The {noun} was lost forever, and {A} cried.",
        "{A} never saw the {noun} again.")
_MORAL_FORMS = ("The moral of the story is that {moral}.", "From that day on, {A} knew that {moral}.")
_SUMMARIES = ("{A} and {B} find {a} {adj} {noun} in the {place}.",
              "{A} the {animal} goes to the {place} with {B} and finds {a} {adj} {noun}.")

# The checker. ``_S`` = start of a sentence: start of text, or after end punctuation (maybe a closing quote) + space.
_S = r"(?:^|(?<=[.!?]\s)|(?<=[.!?]\"\s))"
_NAME = r"[A-Z][a-z]+"
_TWIST_RE = re.compile(_S + r"(?:But then, to everyone's surprise,|Then something unexpected happened:) the ([a-z]+) "
                       r"(?:was really|turned into) an? ([a-z]+)!")
_HINT_RE = re.compile(_S + _NAME + r" (?:put an? ([a-z]+) in a bag, not knowing it would be useful later|saw an old "
                      r"([a-z]+) by the door and took it, just in case)\.")
_CALLBACK_RE = re.compile(_S + r"(?:Good thing " + _NAME + r" had brought the ([a-z]+)!|At last, " + _NAME +
                          r" knew why the ([a-z]+) was needed\.)")
_QUOTE_RE = re.compile(r"[\"\u201c][^\"\u201c\u201d]*[A-Za-z][^\"\u201c\u201d]*[\"\u201d]")
_CONFLICT1_RE = re.compile(_S + rf"({_NAME}) wanted to ([a-z]+) the [a-z]+, but ({_NAME}) wanted to ([a-z]+) it\. "
                           r"They could not agree\.")
_CONFLICT2_RE = re.compile(_S + rf"({_NAME}) and ({_NAME}) both wanted the [a-z]+, and they began to fight over it\.")
_SAD_ALT = (rf"(?:{_NAME} was sad for a long time\.|The [a-z]+ was lost forever, and {_NAME} cried\.|"
            rf"{_NAME} never saw the [a-z]+ again\.)")
_MORAL_ALT = rf"(?:The moral of the story is that [^.!?\"]+\.|From that day on, {_NAME} knew that [^.!?\"]+\.)"
_BAD_RE = re.compile(_S + _SAD_ALT + r"(?:\s+" + _MORAL_ALT + r")?\s*$")
_MORAL_RE = re.compile(_S + _MORAL_ALT + r"\s*$")


def _has_twist(story: str) -> bool:
    for m in _TWIST_RE.finditer(story):
        x, y = m.group(1), m.group(2)
        if x != y and re.search(rf"\b{x}\b", story[: m.start()]):
            return True
    return False


def _has_foreshadowing(story: str) -> bool:
    hints = [(m.end(), m.group(1) or m.group(2)) for m in _HINT_RE.finditer(story)]
    calls = [(m.start(), m.group(1) or m.group(2)) for m in _CALLBACK_RE.finditer(story)]
    return any(c_at >= h_end and c_item == h_item for h_end, h_item in hints for c_at, c_item in calls)


def _has_conflict(story: str) -> bool:
    return (any(m.group(1) != m.group(3) and m.group(2) != m.group(4) for m in _CONFLICT1_RE.finditer(story))
            or any(m.group(1) != m.group(2) for m in _CONFLICT2_RE.finditer(story)))


def detect_features(story: str) -> set[str]:
    """The features a story realises, by the exact rules of the module notes (written for the procedural stories;
    on real TinyStories text it only finds Dialogue reliably)."""
    found = set()
    if _has_twist(story):
        found.add("Twist")
    if _has_foreshadowing(story):
        found.add("Foreshadowing")
    if _QUOTE_RE.search(story):
        found.add("Dialogue")
    if _BAD_RE.search(story):
        found.add("BadEnding")
    if _MORAL_RE.search(story):
        found.add("MoralValue")
    if _has_conflict(story):
        found.add("Conflict")
    return found


_SPAN_RES = {"Twist": (_TWIST_RE,), "Foreshadowing": (_HINT_RE, _CALLBACK_RE), "Dialogue": (_QUOTE_RE,),
             "BadEnding": (_BAD_RE,), "MoralValue": (_MORAL_RE,), "Conflict": (_CONFLICT1_RE, _CONFLICT2_RE)}


def feature_spans(story: str, feature: str) -> list[tuple[int, int]]:
    """Character spans (start, end) of the sentences that realise ``feature`` in a procedural story (the phrasings
    the checker looks for; a real story's feature has no such span), in order."""
    return sorted((m.start(), m.end()) for r in _SPAN_RES[_check_feature(feature)] for m in r.finditer(story))


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _rates(feature_rate: float | Mapping[str, float]) -> np.ndarray:
    if isinstance(feature_rate, Mapping):
        for name in feature_rate:
            _check_feature(name)
        rates = np.array([float(feature_rate.get(f, 0.0)) for f in STORY_FEATURES])
    else:
        rates = np.full(len(STORY_FEATURES), float(feature_rate))
    if not np.all((rates >= 0.0) & (rates <= 1.0)):
        raise StoriesError(f"feature rates must be in [0, 1], got {rates.tolist()}")
    return rates


def _draw_features(rates: np.ndarray, max_features: int, rng: np.random.Generator) -> tuple[str, ...]:
    for _ in range(10_000):
        chosen = np.flatnonzero(rng.random(len(rates)) < rates)
        if len(chosen) <= max_features:
            return tuple(STORY_FEATURES[i] for i in rng.permutation(chosen))
    raise StoriesError(f"feature rates {rates.tolist()} almost never give <= {max_features} features")


def _make_record(features: tuple[str, ...], rng: np.random.Generator) -> StoryRecord:
    def pick(options):
        return options[int(rng.integers(len(options)))]

    a_i, b_i = rng.choice(len(NAMES), size=2, replace=False)
    act1, act2 = rng.choice(len(ACTS), size=2, replace=False)
    v = {"A": NAMES[a_i], "B": NAMES[b_i], "animal": pick(ANIMALS), "cadj": pick(CHARACTER_ADJECTIVES),
         "place": pick(PLACES), "verb": pick(VERBS), "noun": pick(NOUNS), "adj": pick(ADJECTIVES),
         "R": pick(REVEALS), "H": pick(HINT_ITEMS), "act1": ACTS[act1], "act2": ACTS[act2], "moral": pick(MORALS)}
    v.update(ca=_a(v["cadj"]), a=_a(v["adj"]), ra=_a(v["R"]), ha=_a(v["H"]))
    feats = set(features)

    neutral = [pick(_INTROS), "{A} had a friend named {B}.", "{A} and {B} liked to {verb} in the {place}."]
    hint = [pick(_HINTS)] if "Foreshadowing" in feats else []
    neutral2 = ["One day, they found {a} {adj} {noun} under a tree.", "{A} picked up the {noun} and showed it to {B}."]
    fillers = [_FILLERS[i] for i in sorted(rng.choice(len(_FILLERS), size=int(rng.integers(3)), replace=False))]
    middle = []
    if "Conflict" in feats:
        middle.append(pick(_CONFLICTS))
    if "Dialogue" in feats:
        middle += [pick(_DIALOGUE_OPEN), pick(_DIALOGUE_REPLY)]
    if "Twist" in feats:
        middle.append(pick(_TWISTS))
    if "Foreshadowing" in feats:
        middle.append(pick(_CALLBACKS))
    ending = [pick(_SAD if "BadEnding" in feats else _HAPPY)]
    if "MoralValue" in feats:
        ending.append(pick(_MORAL_FORMS))

    plain = [s.format(**v) for s in neutral + neutral2 + fillers]
    story = " ".join(s.format(**v) for s in neutral[:3] + hint + neutral2 + fillers + middle + ending)
    return StoryRecord(story=story, words=(v["verb"], v["noun"], v["adj"]), features=features,
                       summary=pick(_SUMMARIES).format(**v), sentence=pick(plain))


def generate_records(n: int, rng: np.random.Generator | int, feature_rate: float | Mapping[str, float] = 0.25,
                     max_features: int = 3) -> list[StoryRecord]:
    """``n`` procedural stories in the TinyStories-Instruct record format (see the module notes)."""
    if n < 0:
        raise StoriesError(f"n must be >= 0, got {n}")
    if not 0 <= max_features <= len(STORY_FEATURES):
        raise StoriesError(f"max_features must be in [0, {len(STORY_FEATURES)}], got {max_features}")
    rng = _rng(rng)
    rates = _rates(feature_rate)
    return [_make_record(_draw_features(rates, max_features, rng), rng) for _ in range(n)]
