"""A story-feature classifier: the generation score's judge for real TinyStories (paper App. F.2).

The paper judged generations with a GPT-3.5 fine-tuned on TinyStories stories labelled by their Twist feature (92 %
held-out accuracy [P]); no hosted model can be called here. This judge is trained here, from the same kind of labels:
the ``features`` field of TinyStories-Instruct records (real or procedural), one independent binary classifier per
feature (multi-label), so ``judge(story) -> set of features`` plugs into ``training.generation.generation_score``.

Model (choices the paper leaves open, made here): logistic regression on the presence of lower-cased word uni- and
bigrams (the ``max_ngrams`` most frequent n-grams that occur in at least ``min_count`` training stories), trained
with AdamW on BCE; a story is judged to have a feature when its logit is > 0. Training stories come from the
pretraining and fine-tuning shards, held-out stories from the test shard (shard 0), so the reported accuracy is on
stories the judge never saw. It is a bag of n-grams, so it reads vocabulary, not plot: on procedural stories,
whose features are realised in fixed phrasings, it is near-exact; on real stories its held-out accuracy is the number
to report beside every generation score it gives (the paper's 92 % is the bar).

Saved as JSON (data, never code): the n-grams, the weights, the bias, the held-out accuracy and base rates.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wrapperlab.fileio import atomic_write_text
from wrapperlab.tasks.stories import STORY_FEATURES, StoryRecord

FORMAT = "wrapperlab-story-judge"
_WORD = re.compile(r"[a-z0-9']+")


class JudgeError(ValueError):
    """A judge that cannot be trained or loaded (one-line message)."""


def ngrams(story: str) -> set[str]:
    """The lower-cased word uni- and bigrams present in ``story``."""
    words = _WORD.findall(story.lower())
    return set(words) | {f"{a} {b}" for a, b in zip(words, words[1:])}


@dataclass
class StoryJudge:
    features: list[str]
    vocab: list[str]
    weight: np.ndarray  # (len(vocab), len(features))
    bias: np.ndarray  # (len(features),)
    heldout: dict = field(default_factory=dict)
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {g: i for i, g in enumerate(self.vocab)}

    def logits(self, stories: Sequence[str]) -> np.ndarray:
        out = np.tile(self.bias, (len(stories), 1))
        for r, s in enumerate(stories):
            ids = [self._index[g] for g in ngrams(s) if g in self._index]
            if ids:
                out[r] += self.weight[ids].sum(0)
        return out

    def __call__(self, story: str) -> set[str]:
        return {f for f, z in zip(self.features, self.logits([story])[0]) if z > 0}

    def save(self, path: str | Path) -> Path:
        blob = {"format": FORMAT, "version": 1, "features": self.features, "vocab": self.vocab,
                "weight": np.round(self.weight, 6).tolist(), "bias": np.round(self.bias, 6).tolist(),
                "heldout": self.heldout}
        atomic_write_text(Path(path), json.dumps(blob))
        return Path(path)


def load_judge(path: str | Path) -> StoryJudge:
    """Read a judge saved by ``StoryJudge.save``; a missing or malformed file is a one-line ``JudgeError``."""
    try:
        blob = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JudgeError(f"judge: cannot read {path}: {e}") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise JudgeError(f"judge: {path} is not a story judge (saved by `wrapperlab stories judge`)")
    try:
        feats, vocab = list(blob["features"]), list(blob["vocab"])
        weight = np.asarray(blob["weight"], dtype=np.float64).reshape(len(vocab), len(feats))
        bias = np.asarray(blob["bias"], dtype=np.float64).reshape(len(feats))
    except (KeyError, TypeError, ValueError) as e:
        raise JudgeError(f"judge: {path} is malformed ({type(e).__name__}: {e})") from None
    if not set(feats) <= set(STORY_FEATURES) or not all(isinstance(g, str) for g in vocab):
        raise JudgeError(f"judge: {path} names unknown features or non-text n-grams")
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise JudgeError(f"judge: {path} holds non-finite weights")
    return StoryJudge(feats, vocab, weight, bias, dict(blob.get("heldout") or {}))


def _labels(records: Sequence[StoryRecord], features: Sequence[str]) -> np.ndarray:
    return np.array([[f in r.features for f in features] for r in records], dtype=np.float32)


def train_judge(train: Sequence[StoryRecord], heldout: Sequence[StoryRecord], *,
                features: Sequence[str] = STORY_FEATURES, max_ngrams: int = 20000, min_count: int = 3,
                epochs: int = 8, lr: float = 0.05, weight_decay: float = 1e-4, batch_size: int = 256,
                seed: int = 0) -> StoryJudge:
    """Fit the judge on ``train`` (labels: each record's features) and measure it on ``heldout``."""
    if len(train) < 2 or not heldout:
        raise JudgeError(f"data: need >= 2 training and >= 1 held-out stories (got {len(train)}, {len(heldout)})")
    features = list(features)
    grams = [ngrams(r.story) for r in train]
    counts = Counter(g for gs in grams for g in gs)
    vocab = [g for g, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count][:max_ngrams]
    if not vocab:
        raise JudgeError(f"data: no n-gram occurs in {min_count} training stories")
    index = {g: i for i, g in enumerate(vocab)}
    ids = [torch.tensor([index[g] for g in gs if g in index], dtype=torch.long) for gs in grams]
    y = torch.from_numpy(_labels(train, features))
    bag = torch.nn.EmbeddingBag(len(vocab), len(features), mode="sum")
    torch.nn.init.zeros_(bag.weight)
    bias = torch.nn.Parameter(torch.logit(y.mean(0).clamp(1e-3, 1 - 1e-3)))
    opt = torch.optim.AdamW([bag.weight, bias], lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(ids), generator=g)
        for i in range(0, len(order), batch_size):
            rows = order[i:i + batch_size].tolist()
            flat = torch.cat([ids[r] for r in rows])
            offsets = torch.tensor([0] + [len(ids[r]) for r in rows[:-1]]).cumsum(0)
            loss = F.binary_cross_entropy_with_logits(bag(flat, offsets) + bias, y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    judge = StoryJudge(features, vocab, bag.weight.detach().double().numpy(), bias.detach().double().numpy())
    pred = judge.logits([r.story for r in heldout]) > 0
    truth = _labels(heldout, features).astype(bool)
    rate = truth.mean(0)
    judge.heldout = {"n_train": len(train), "n_heldout": len(heldout),
                     "accuracy": {f: float((pred[:, j] == truth[:, j]).mean()) for j, f in enumerate(features)},
                     "base_rate": {f: float(max(rate[j], 1 - rate[j])) for j, f in enumerate(features)}}
    return judge
