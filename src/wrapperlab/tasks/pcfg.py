"""The paper's probabilistic context-free grammar and a fast, seeded, vectorised sampler.

Spec: the paper's App. B.2 and Fig. 14: 16 non-terminals, terminals {a, b, c}, two rules per
non-terminal chosen with p = 0.5, right-hand sides of length 2 or 3, root ``s``.

The sampler expands *every* open non-terminal of a whole batch of strings at once with numpy (one round per
level of the derivation tree), so a batch of 96 paper-length strings costs a handful of array operations rather
than ~40k Python calls. It works for any grammar given as rules with probabilities, recursive ones included:
``max_depth`` caps the number of expansion rounds and ``max_length`` the number of symbols; a derivation that
breaks either cap is discarded and a fresh one drawn (rejection), so every returned string is a complete
derivation of the grammar.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PAPER_GRAMMAR_TEXT = """
s -> r q | q p
p -> m n o | n o m
q -> n m o | m n
r -> o m | m o n
m -> l j | j l k
n -> k j l | l j k
o -> l k j | k j
j -> h i | i h
k -> h g i | g h i
l -> i h g | h i g
g -> d f e | f e d
h -> e d f | d e f
i -> e f d | f d e
d -> c a | a b c
e -> c b | c a b
f -> c b a | b a
"""


@dataclass(frozen=True)
class Grammar:
    """A PCFG: ``rules[lhs] = [(rhs_symbols, probability), ...]``. Symbols not on any left side are terminals."""

    rules: dict[str, list[tuple[tuple[str, ...], float]]]
    root: str = "s"
    terminals: tuple[str, ...] = field(default=())

    @classmethod
    def from_text(cls, text: str, root: str = "s") -> Grammar:
        """Parse ``lhs -> x y | z w`` lines; alternatives are equiprobable unless written ``x y [0.3]``."""
        rules: dict[str, list[tuple[tuple[str, ...], float]]] = {}
        for raw in text.strip().splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if "->" not in line:
                raise ValueError(f"grammar line {raw!r} has no '->'")
            lhs, rhs = (part.strip() for part in line.split("->", 1))
            alts = [a.strip() for a in rhs.split("|")]
            parsed = []
            for alt in alts:
                prob = None
                if alt.endswith("]") and "[" in alt:
                    alt, p = alt[:-1].split("[", 1)
                    prob = float(p)
                syms = tuple(alt.split())
                if not syms:
                    raise ValueError(f"empty alternative in grammar line {raw!r}")
                parsed.append((syms, prob))
            n_free = sum(p is None for _, p in parsed)
            left = 1.0 - sum(p for _, p in parsed if p is not None)
            rules[lhs] = [(s, p if p is not None else left / n_free) for s, p in parsed]
        lhs_set = set(rules)
        terms = sorted({s for alts in rules.values() for rhs, _ in alts for s in rhs if s not in lhs_set})
        grammar = cls(rules=rules, root=root, terminals=tuple(terms))
        grammar.validate()
        return grammar

    def validate(self) -> None:
        if self.root not in self.rules:
            raise ValueError(f"grammar root {self.root!r} has no rules")
        for lhs, alts in self.rules.items():
            total = sum(p for _, p in alts)
            if abs(total - 1.0) > 1e-6 or any(p < 0 for _, p in alts):
                raise ValueError(f"rule probabilities of {lhs!r} must be >= 0 and sum to 1 (got {total:.6f})")

    @property
    def nonterminals(self) -> tuple[str, ...]:
        return tuple(self.rules)


PAPER_GRAMMAR = Grammar.from_text(PAPER_GRAMMAR_TEXT)


class PCFGSampler:
    """Vectorised sampler. ``sample(n, rng)`` returns ``(flat, lengths)``: terminal indices (into
    ``grammar.terminals``) of n strings concatenated, and each string's length."""

    def __init__(self, grammar: Grammar = PAPER_GRAMMAR, max_depth: int = 64, max_length: int = 4096):
        if max_depth < 1 or max_length < 1:
            raise ValueError("max_depth and max_length must be >= 1")
        self.grammar, self.max_depth, self.max_length = grammar, max_depth, max_length
        terms, nts = grammar.terminals, grammar.nonterminals
        self.n_terminals = len(terms)
        code = {s: i for i, s in enumerate(terms)} | {s: len(terms) + i for i, s in enumerate(nts)}
        n_sym = len(code)
        n_rules = max(len(a) for a in grammar.rules.values())
        max_rhs = max(len(rhs) for a in grammar.rules.values() for rhs, _ in a)
        self.rhs = np.zeros((n_sym, n_rules, max_rhs), dtype=np.int16)
        self.rhs_len = np.ones((n_sym, n_rules), dtype=np.int64)
        self.cum = np.ones((n_sym, n_rules), dtype=np.float64)
        for t in range(len(terms)):  # a terminal rewrites to itself
            self.rhs[t, :, 0] = t
        for lhs, alts in grammar.rules.items():
            s = code[lhs]
            acc = 0.0
            for r in range(n_rules):
                rhs, p = alts[min(r, len(alts) - 1)]
                if r < len(alts):
                    acc += p
                self.rhs[s, r, : len(rhs)] = [code[x] for x in rhs]
                self.rhs_len[s, r] = len(rhs)
                self.cum[s, r] = acc if r < len(alts) - 1 else 1.0 + 1e-9
        self.root_code = code[grammar.root]

    def _attempt(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sym = np.full(n, self.root_code, dtype=np.int16)
        sid = np.arange(n, dtype=np.int64)
        ok = np.ones(n, dtype=bool)
        for _ in range(self.max_depth):
            if (sym < self.n_terminals).all():
                break
            u = rng.random(sym.shape[0])
            rule = (u[:, None] >= self.cum[sym]).sum(axis=1)
            lens = self.rhs_len[sym, rule]
            src = np.repeat(np.arange(sym.shape[0]), lens)
            starts = np.cumsum(lens) - lens
            within = np.arange(src.shape[0]) - starts[src]
            sym = self.rhs[sym[src], rule[src], within]
            sid = sid[src]
            too_long = np.bincount(sid, minlength=n) > self.max_length
            if too_long.any():
                ok &= ~too_long
                keep = ok[sid]
                sym, sid = sym[keep], sid[keep]
        unfinished = np.unique(sid[sym >= self.n_terminals])
        ok[unfinished] = False
        keep = ok[sid]
        return sym[keep].astype(np.int8), np.bincount(sid[keep], minlength=n)[ok], ok

    def sample(self, n: int, rng: np.random.Generator, max_tries: int = 100) -> tuple[np.ndarray, np.ndarray]:
        flats, lens, got = [], [], 0
        for _ in range(max_tries):
            flat, length, _ = self._attempt(n - got, rng)
            flats.append(flat)
            lens.append(length)
            got += length.shape[0]
            if got == n:
                return np.concatenate(flats), np.concatenate(lens)
        raise RuntimeError(
            f"could not sample {n} strings within max_depth={self.max_depth}, max_length={self.max_length} "
            f"after {max_tries} tries; raise the caps"
        )

    def sample_strings(self, n: int, rng: np.random.Generator) -> list[str]:
        """Convenience: n strings as Python strings of terminals (for tests and inspection)."""
        flat, lengths = self.sample(n, rng)
        terms = self.grammar.terminals
        out, pos = [], 0
        for ln in lengths:
            out.append("".join(terms[t] for t in flat[pos : pos + ln]))
            pos += ln
        return out
