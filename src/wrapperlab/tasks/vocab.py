"""Token vocabulary of the PCFG tasks (paper App. B.2, eq. (1) and Fig. 15).

Spellings follow the paper's Fig. 15 where it shows them: ``$`` SOS/EOS, ``(`` the counting family, ``<`` SOT,
``=`` ART, ``#`` padding. The paper reuses ``<`` for EOT; we give EOT its own token ``>`` so the two ends of the
text are distinguishable (documented choice). The other family tokens are ours. Numbers are single tokens
``0``..``max_number``; ``max_number`` must cover every answer and every O' (counts <= O', indices <= window).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD, SOS, SOT, EOT, ART, NULL = "#", "$", "<", ">", "=", "_"
SPECIALS = (PAD, SOS, SOT, EOT, ART, NULL)
FAMILY_TOKENS = {
    "count": "(",
    "count-composition": ")",
    "index-of-occurrence": "[",
    "index-of-composition": "]",
    "token-value": "{",
}
JAILBREAK_TOKENS = {"count-j1": "%", "count-j2": "&"}  # T_J1, T_J2 (App. E.2): in a vocabulary only when used


@dataclass(frozen=True)
class Vocab:
    tokens: tuple[str, ...]

    @classmethod
    def build(cls, max_number: int, terminals: tuple[str, ...] = ("a", "b", "c"),
              extra_families: tuple[str, ...] = ()) -> Vocab:
        numbers = tuple(str(i) for i in range(max_number + 1))
        extra = tuple(JAILBREAK_TOKENS[f] for f in extra_families)
        toks = SPECIALS + tuple(FAMILY_TOKENS.values()) + extra + tuple(terminals) + numbers
        if len(set(toks)) != len(toks):
            raise ValueError("terminal symbols collide with special, family or number tokens")
        return cls(toks)

    @staticmethod
    def family_token(family: str) -> str:
        return FAMILY_TOKENS.get(family) or JAILBREAK_TOKENS[family]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_stoi", {t: i for i, t in enumerate(self.tokens)})

    def __len__(self) -> int:
        return len(self.tokens)

    def id(self, token: str) -> int:
        try:
            return self._stoi[token]  # type: ignore[attr-defined]
        except KeyError:
            raise KeyError(f"token {token!r} is not in the vocabulary") from None

    def number(self, value: int) -> int:
        return self.id(str(int(value)))

    def number_ids(self, values: np.ndarray) -> np.ndarray:
        """Vectorised ``number``: numbers 0..max_number are contiguous in the vocabulary."""
        base = self.id("0")
        top = len(self.tokens) - base - 1
        if values.size and (values.min() < 0 or values.max() > top):
            raise ValueError(f"answer out of vocabulary range 0..{top}")
        return values.astype(np.int64) + base

    def decode(self, ids) -> list[str]:
        return [self.tokens[int(i)] for i in ids]

    @property
    def pad_id(self) -> int:
        return self.id(PAD)
