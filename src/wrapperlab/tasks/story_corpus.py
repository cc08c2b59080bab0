"""Story records -> token streams and batches (splits as in the authors' code, prompts as in paper App. F.2).

- ``StoryStream``: a split's texts (``make_text`` of every record, the instruction order drawn from a seeded rng),
  each encoded with BOS and no EOS and concatenated. LM batches are random ``seq_len + 1`` windows of the stream,
  not aligned to stories (as the authors' ``split_on_bos=False``): ``lm_batch(batch, seq_len, rng)``.
- ``left_padded``: story-aligned sequences that END at a given text (a generation prompt, or a story for the
  probes), left-padded to one length with the tail of *other* stories' text rather than a pad token (the authors'
  ``pad_on_left_with_suffixes``), BOS-prefixed, so every position the model sees is ordinary text.

Every draw comes from a seeded ``numpy.random.Generator``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from wrapperlab.tasks.stories import StoriesError, StoryRecord, make_text
from wrapperlab.tasks.tokenizer import Tokenizer


def texts_of(records: Sequence[StoryRecord], seed: int) -> list[str]:
    """The instruction + story text of each record; record i's line order comes from ``(seed, i)``."""
    return [make_text(r, np.random.default_rng([seed, i])) for i, r in enumerate(records)]


@dataclass
class StoryStream:
    tokens: np.ndarray  # uint16, every text with BOS, concatenated
    n_texts: int

    @classmethod
    def build(cls, records: Sequence[StoryRecord], tokenizer: Tokenizer, seed: int = 0) -> StoryStream:
        if not records:
            raise StoriesError("records: an empty split has no token stream")
        return cls(tokenizer.encode_stream(texts_of(records, seed)), len(records))

    def lm_batch(self, batch: int, seq_len: int, rng: np.random.Generator) -> torch.Tensor:
        """(batch, seq_len + 1) random windows of the stream (inputs = [:, :-1], targets = [:, 1:])."""
        n = self.tokens.shape[0] - seq_len - 1
        if n < 1:
            raise StoriesError(f"seq_len: the stream has {self.tokens.shape[0]} tokens, fewer than seq_len + 2 = "
                               f"{seq_len + 2}; generate more stories or shorten the context")
        starts = rng.integers(0, n, size=batch)
        idx = starts[:, None] + np.arange(seq_len + 1)[None]
        return torch.from_numpy(self.tokens[idx].astype(np.int64))


def left_padded(ends: Sequence[list[int]], fillers: Sequence[list[int]], length: int,
                rng: np.random.Generator) -> torch.Tensor:
    """(len(ends), length) sequences, row i ending with ``ends[i]`` (cropped to its last ``length`` tokens when
    longer) and left-filled with the tail of a randomly chosen filler (another story's tokens, BOS included); when
    one filler is too short, earlier fillers are chained before it."""
    if not fillers:
        raise StoriesError("fillers: left padding needs other stories' tokens")
    rows = []
    for end in ends:
        row = list(end)[-length:]
        while len(row) < length:
            row = list(fillers[int(rng.integers(len(fillers)))]) + row
        rows.append(row[-length:])
    return torch.tensor(rows, dtype=torch.long)
