"""The five PCFG task families of the paper (App. B.2), computed vectorised over a batch of windows.

``text`` is an (n, W) int8 array of terminal indices, right-aligned against EOT, with -1 where a string shorter
than the window left no token (see ``task.py``). Positions are counted backwards from the EOT token: distance 1
is the last text token. Definitions (the paper gives them in one line each; our precise readings):

- count (C): number of tokens equal to O among the last O' tokens.
- count-composition (CC): the operand ``x`` stands for the composite ``xx``; number of (overlapping) occurrences
  of ``xx`` lying entirely inside the last O' tokens.
- index-of-occurrence (I): scanning back from EOT, the distance of the O'-th occurrence of O; 0 if O occurs
  fewer than O' times (so 0 means "not found").
- index-of-composition (IC): as I for the composite ``xx``; an occurrence's distance is that of its first
  (leftmost) token; overlapping occurrences count; 0 if fewer than O'.
- token-value (T): the operand is NULL; the answer is the terminal at distance O' from EOT.

Two optional families serve the synthetic jailbreak (paper App. E.2): ``count-j1`` and ``count-j2`` are counting
under their own task tokens (T_J1, T_J2), asked in pretraining only about O_PT. They join a task (and its
vocabulary) only when its family mix names them, so every other task keeps its tokens and run ids.

Every function here is also written as a plain loop in the tests and compared on many random strings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def count(text: np.ndarray, op: int, o2: int) -> np.ndarray:
    return (text[:, -o2:] == op).sum(axis=1)


def _pair_hits(text: np.ndarray, op: int) -> np.ndarray:
    """hits[:, i] = text[:, i] == text[:, i+1] == op (column i is where the pair starts)."""
    return (text[:, :-1] == op) & (text[:, 1:] == op)


def count_composition(text: np.ndarray, op: int, o2: int) -> np.ndarray:
    if o2 < 2:
        return np.zeros(text.shape[0], dtype=np.int64)
    return _pair_hits(text, op)[:, -(o2 - 1):].sum(axis=1)


def _kth_from_end(hits: np.ndarray, k: int, offset: int) -> np.ndarray:
    """Distance from EOT of the k-th True scanning from the right; 0 if fewer than k. ``offset`` converts a
    column index to a distance (distance = width + offset - column)."""
    rev = hits[:, ::-1]
    csum = np.cumsum(rev, axis=1)
    found = csum[:, -1] >= k if rev.shape[1] else np.zeros(hits.shape[0], bool)
    pos = np.argmax(csum >= k, axis=1)  # first reversed column reaching k
    return np.where(found, pos + 1 + offset, 0)


def index_of_occurrence(text: np.ndarray, op: int, k: int) -> np.ndarray:
    return _kth_from_end(text == op, k, 0)


def index_of_composition(text: np.ndarray, op: int, k: int) -> np.ndarray:
    # pair starting at column i has its first token at distance W - i; reversed column j <-> i = W-2-j,
    # distance = j + 2.
    return _kth_from_end(_pair_hits(text, op), k, 1)


def token_value(text: np.ndarray, o2: int) -> np.ndarray:
    """Terminal index at distance o2 (or -1 where the string is shorter)."""
    return text[:, -o2].astype(np.int64)


@dataclass(frozen=True)
class Family:
    name: str
    short: str  # the paper's shorthand prefix (C, CC, I, IC, T)
    uses_operand: bool
    answer_is_token: bool
    default_o2: int  # paper's O'
    computes: str | None = None  # the family whose answers it gives (None: its own)
    o_pt_only: bool = False  # drawn from the prior in pretraining, its operand is always O_PT (App. E.2)

    @property
    def base(self) -> str:
        return self.computes or self.name

    def answers(self, text: np.ndarray, op: int, o2: int) -> np.ndarray:
        """Raw answers: numbers for counts/indices, terminal index for token-value."""
        if self.base == "count":
            return count(text, op, o2)
        if self.base == "count-composition":
            return count_composition(text, op, o2)
        if self.base == "index-of-occurrence":
            return index_of_occurrence(text, op, o2)
        if self.base == "index-of-composition":
            return index_of_composition(text, op, o2)
        return token_value(text, o2)

    def max_answer(self, window: int, o2: int) -> int:
        """Largest numeric answer (sizes the vocabulary)."""
        if self.base in ("count", "count-composition"):
            return o2
        if self.base.startswith("index"):
            return window
        return 0

    def check_o2(self, o2: int, window: int) -> None:
        if not 1 <= o2 <= window:
            raise ValueError(f"o2 for {self.name} must be in 1..window ({window}), got {o2}")


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("count", "C", True, False, 40),
        Family("count-composition", "CC", True, False, 40),
        Family("index-of-occurrence", "I", True, False, 6),
        Family("index-of-composition", "IC", True, False, 6),
        Family("token-value", "T", False, True, 40),
    )
}


# the synthetic jailbreak's counting tokens T_J1, T_J2 (App. E.2); count itself is T_NJ
JAILBREAK_FAMILIES: dict[str, Family] = {
    f.name: f for f in (Family("count-j1", "CJ1", True, False, 40, computes="count", o_pt_only=True),
                        Family("count-j2", "CJ2", True, False, 40, computes="count", o_pt_only=True))
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES.get(name) or JAILBREAK_FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; choose from "
                         f"{', '.join([*FAMILIES, *JAILBREAK_FAMILIES])}") from None
