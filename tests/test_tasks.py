"""Tests of the PCFG task layer (wrapperlab.tasks) against independent references.

Every expected value comes from outside the code under test:

- the grammar rules are retyped from the paper's Fig. 14 and parsed with nltk (membership) or expanded exactly with
  plain-Python generating functions (length distribution, terminal frequencies);
- the five task families are re-implemented as plain loops from the definitions in families.py's docstring and
  evaluated both on ``batch.text`` and on the decoded token sequence;
- the spurious edit is checked against the unedited window recovered from ``batch.source``;
- priors and the sequence spellings come from the paper's App. C.2 and Fig. 15 (App. B.2).
"""

from __future__ import annotations

import math
import signal
from contextlib import contextmanager
from functools import cache

import nltk
import numpy as np
import pytest
from nltk.parse.earleychart import EarleyChartParser
from pydantic import ValidationError

from wrapperlab.tasks import PAPER_GRAMMAR, PCFGSampler, PCFGTask, TaskConfig, resolve_prior

# ------------------------------------------------------------------------------------------------------------
# Independent references
# ------------------------------------------------------------------------------------------------------------

# paper Fig. 14 (App. B.2), retyped one rule per line (not taken from the package's grammar text).
PAPER_RULES = """
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
TERMINALS = "abc"
NO_TOKEN = None  # a window position left empty by a string shorter than the window

# Sequence spellings from the paper's Fig. 15 (App. B.2), plus the package's documented EOT ">" and NULL "_".
PAD, SOS, SOT, EOT, ART, NULL = "#", "$", "<", ">", "=", "_"
FAMILY_TOKEN_COUNT = "("  # paper Fig. 15: "(" is the counting task-family token
SPECIAL_LEN = 9  # SOS T O O' SOT ... EOT ART Ans EOS


def reference_rules() -> dict[str, list[list[str]]]:
    rules = {}
    for line in PAPER_RULES.strip().splitlines():
        lhs, rhs = line.split("->")
        rules[lhs.strip()] = [alt.split() for alt in rhs.split("|")]
    return rules


RULES = reference_rules()


@cache
def nltk_parser() -> EarleyChartParser:
    def quote(sym: str) -> str:
        return sym if sym in RULES else f"'{sym}'"

    lines = [f"{lhs} -> " + " | ".join(" ".join(map(quote, alt)) for alt in alts)
             for lhs, alts in RULES.items()]
    return EarleyChartParser(nltk.CFG.fromstring("\n".join(lines)))


def is_grammatical(string: str) -> bool:
    parser = nltk_parser()
    chart = parser.chart_parse(list(string))
    return any(True for _ in chart.parses(parser.grammar().start()))


def convolve(p: dict[int, float], q: dict[int, float]) -> dict[int, float]:
    out: dict[int, float] = {}
    for a, pa in p.items():
        for b, pb in q.items():
            out[a + b] = out.get(a + b, 0.0) + pa * pb
    return out


@cache
def length_distribution(symbol: str = "s") -> dict[int, float]:
    """Exact P(len = L) of strings derived from ``symbol`` (each rule taken with p = 0.5, paper App. B.2)."""
    if symbol not in RULES:
        return {1: 1.0}
    alts = RULES[symbol]
    out: dict[int, float] = {}
    for alt in alts:
        dist = {0: 1.0}
        for child in alt:
            dist = convolve(dist, length_distribution(child))
        for length, p in dist.items():
            out[length] = out.get(length, 0.0) + p / len(alts)
    return out


@cache
def expected_terminal_counts(symbol: str = "s") -> tuple[float, ...]:
    if symbol not in RULES:
        return tuple(float(symbol == t) for t in TERMINALS)
    alts = RULES[symbol]
    return tuple(
        sum(expected_terminal_counts(child)[t] for alt in alts for child in alt) / len(alts)
        for t in range(len(TERMINALS))
    )


# The five families, as plain loops over a window given as a list of symbols ("a"/"b"/"c" or NO_TOKEN).
# Distances are counted back from EOT: window[-d] is at distance d.
def ref_count(window: list, op: str, o2: int) -> int:
    return sum(1 for sym in window[-o2:] if sym == op)


def ref_count_composition(window: list, op: str, o2: int) -> int:
    last = window[-o2:]
    return sum(1 for i in range(len(last) - 1) if last[i] == op and last[i + 1] == op)


def ref_index_of_occurrence(window: list, op: str, k: int) -> int:
    seen = 0
    for d in range(1, len(window) + 1):
        if window[-d] == op:
            seen += 1
            if seen == k:
                return d
    return 0


def ref_index_of_composition(window: list, op: str, k: int) -> int:
    seen = 0
    for d in range(2, len(window) + 1):  # the pair's first token at distance d, its second at d - 1
        if window[-d] == op and window[-d + 1] == op:
            seen += 1
            if seen == k:
                return d
    return 0


def ref_token_value(window: list, op: str, o2: int):
    return window[-o2] if o2 <= len(window) else NO_TOKEN


REFERENCE = {
    "count": ref_count,
    "count-composition": ref_count_composition,
    "index-of-occurrence": ref_index_of_occurrence,
    "index-of-composition": ref_index_of_composition,
    "token-value": ref_token_value,
}
FAMILY_NAMES = tuple(REFERENCE)
OPERAND_FAMILIES = FAMILY_NAMES[:4]


def answer_token(answer) -> str:
    """The token that spells a reference answer: a number, a terminal, or NULL for no token."""
    if answer is NO_TOKEN:
        return NULL
    return answer if isinstance(answer, str) else str(answer)


def raw_value(answer) -> int:
    """A reference answer as ``batch.value`` stores it: numbers as is, terminals by index, no token as -1."""
    if answer is NO_TOKEN:
        return -1
    return TERMINALS.index(answer) if isinstance(answer, str) else answer


def symbols(text_row: np.ndarray) -> list:
    return [NO_TOKEN if t < 0 else TERMINALS[t] for t in text_row]


def decode_sequence(tokens: list[str]) -> dict:
    """Split a decoded sequence: leading PADs, then SOS T O O' SOT text EOT ART Ans EOS."""
    n_pad = next(i for i, tok in enumerate(tokens) if tok != PAD)
    body = tokens[n_pad:]
    assert (body[0], body[4], body[-4], body[-3], body[-1]) == (SOS, SOT, EOT, ART, SOS), tokens
    text = body[5:-4]
    assert set(text) <= set(TERMINALS), "text holds a non-terminal token (e.g. a PAD not moved left)"
    return {"n_pad": n_pad, "family": body[1], "operand": body[2], "o2": int(body[3]), "text": text,
            "answer": body[-2]}


def original_window(source: np.ndarray, window: int, offset: int) -> np.ndarray:
    if source.size < window:
        return np.concatenate([np.full(window - source.size, -1), source]).astype(np.int64)
    return source[offset : offset + window].astype(np.int64)


def locate_window(edited: np.ndarray, source: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """The unedited window of ``source`` that ``edited`` came from: exact on the ``fixed`` positions (which an
    edit may not touch), and among those the offset with the fewest differences overall."""
    w = edited.size
    offsets = range(max(source.size - w, 0) + 1)
    candidates = [original_window(source, w, o) for o in offsets]
    exact = [c for c in candidates if np.array_equal(c[fixed], edited[fixed])]
    assert exact, "the edited window matches no window of the source outside the editable region"
    return min(exact, key=lambda c: int((c != edited).sum()))


def is_window_of(text_row: np.ndarray, source: np.ndarray) -> bool:
    """c = 0 windowing: a contiguous substring of the source, or the whole short source right-aligned."""
    w = text_row.size
    if source.size < w:
        return np.array_equal(text_row, original_window(source, w, 0))
    return (text_row >= 0).all() and bytes(text_row.astype(np.int8)) in bytes(source.astype(np.int8))


def within_sigmas(observed: float, p: float, n: int, k: float = 3.0) -> bool:
    return abs(observed - p) <= k * math.sqrt(p * (1 - p) / n)


def make_task(window: int = 250, **kw) -> PCFGTask:
    return PCFGTask(TaskConfig(window=window, **kw))


# ------------------------------------------------------------------------------------------------------------
# 1. Grammar membership and string statistics
# ------------------------------------------------------------------------------------------------------------


def test_reference_grammar_matches_paper_shape():
    assert len(RULES) == 16
    assert all(len(alts) == 2 and all(len(a) in (2, 3) for a in alts) for alts in RULES.values())
    assert {s for alts in RULES.values() for a in alts for s in a} - set(RULES) == set(TERMINALS)


def test_sampled_strings_are_parsed_by_independent_nltk_grammar():
    strings = PCFGSampler(PAPER_GRAMMAR).sample_strings(40, np.random.default_rng(11))
    assert len(strings) == 40
    bad = [s for s in strings if not is_grammatical(s)]
    assert not bad, f"{len(bad)} sampled strings are not in the paper grammar, e.g. {bad[0]}"


def corruptions(string: str) -> list[str]:
    mid = len(string) // 2
    flip = {"a": "b", "b": "c", "c": "a"}
    return [
        string + "a",  # appended terminal
        string[:100],  # truncated below the shortest derivation
        string[:mid] + flip[string[mid]] + string[mid + 1 :],  # one terminal changed
        string[:mid] + string[mid + 1 :] + string[mid],  # one terminal moved to the end
    ]


def test_parser_rejects_corrupted_strings():
    for string in PCFGSampler(PAPER_GRAMMAR).sample_strings(4, np.random.default_rng(12)):
        assert is_grammatical(string)
        for bad in corruptions(string):
            assert not is_grammatical(bad), bad


@pytest.fixture(scope="module")
def many_strings() -> tuple[np.ndarray, np.ndarray]:
    return PCFGSampler(PAPER_GRAMMAR).sample(20000, np.random.default_rng(13))


def test_length_support_matches_paper_and_exact_distribution(many_strings):
    _, lengths = many_strings
    exact = length_distribution()
    assert abs(sum(exact.values()) - 1) < 1e-9
    # a simulation of the paper's grammar saw lengths 161-384: the exact mass outside is negligible
    assert sum(p for length, p in exact.items() if not 161 <= length <= 384) < 1e-4
    assert set(lengths.tolist()) <= set(exact)
    assert lengths.min() < 200 and lengths.max() > 340  # both tails are reached


def test_length_statistics_match_exact_distribution(many_strings):
    _, lengths = many_strings
    n = lengths.size
    exact = length_distribution()
    mean = sum(length * p for length, p in exact.items())
    var = sum((length - mean) ** 2 * p for length, p in exact.items())
    assert abs(lengths.mean() - mean) <= 4 * math.sqrt(var / n)
    assert 265 < mean < 285  # a simulation of the grammar: mean ≈ 275

    p_short = sum(p for length, p in exact.items() if length < 250)
    assert abs(p_short - 0.24) < 0.02  # a simulation of the grammar: ≈24 % shorter than 250
    assert within_sigmas((lengths < 250).mean(), p_short, n, 4)

    # chi-square of binned lengths against the exact distribution (bins of 10 symbols, tails merged)
    edges = np.arange(180, 361, 10)
    exact_bins = np.zeros(edges.size + 1)
    for length, p in exact.items():
        exact_bins[np.searchsorted(edges, length, side="right")] += p
    observed = np.bincount(np.searchsorted(edges, lengths, side="right"), minlength=edges.size + 1)
    expected = exact_bins * n
    assert expected.min() > 5
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    dof = edges.size
    assert chi2 < dof + 5 * math.sqrt(2 * dof), chi2


def test_terminal_frequencies_are_about_one_third(many_strings):
    flat, lengths = many_strings
    counts = np.bincount(flat, minlength=3)
    expected = np.array(expected_terminal_counts()) / sum(expected_terminal_counts())
    assert np.allclose(expected, 1 / 3, atol=0.02)  # a simulation of the grammar: each terminal ≈ 1/3
    assert np.allclose(counts / counts.sum(), expected, atol=0.005)
    assert counts.sum() == lengths.sum()


# ------------------------------------------------------------------------------------------------------------
# 2. Seeded determinism
# ------------------------------------------------------------------------------------------------------------


def batch_fingerprint(batch) -> tuple:
    return (batch.tokens.tobytes(), batch.answer.tobytes(), batch.value.tobytes(), tuple(batch.family),
            tuple(batch.operand), batch.spurious.tobytes(), tuple(s.tobytes() for s in batch.source))


@pytest.mark.parametrize("c", [0.0, 0.5])
def test_same_seed_same_batch_different_seed_different_batch(c):
    def draw(seed):
        task = make_task(prior="high", families={"count": 1.0, "index-of-occurrence": 1.0})
        return batch_fingerprint(task.sample(64, np.random.default_rng(seed), c=c, keep_source=True))

    assert draw(5) == draw(5)
    first, other = draw(5), draw(6)
    assert all(a != b for a, b in zip(first[:3], other[:3]))  # tokens, answers and values all differ


def test_sampler_strings_are_seeded():
    sampler = PCFGSampler(PAPER_GRAMMAR)
    same = [sampler.sample_strings(8, np.random.default_rng(3)) for _ in range(2)]
    assert same[0] == same[1]
    assert sampler.sample_strings(8, np.random.default_rng(4)) != same[0]


# ------------------------------------------------------------------------------------------------------------
# 3. Every family's answer, by brute force on the text and on the decoded tokens
# ------------------------------------------------------------------------------------------------------------

O2_SETTINGS = [
    (64, {"count": 64, "count-composition": 1, "index-of-occurrence": 1, "index-of-composition": 2,
          "token-value": 1}),
    (64, {"count": 40, "count-composition": 20, "index-of-occurrence": 6, "index-of-composition": 3,
          "token-value": 64}),
    (250, {"count": 40, "count-composition": 40, "index-of-occurrence": 6, "index-of-composition": 6,
           "token-value": 40}),
    (250, {"count": 250, "count-composition": 250, "index-of-occurrence": 60, "index-of-composition": 20,
           "token-value": 200}),
]
CASES = [(f, op) for f in OPERAND_FAMILIES for op in TERMINALS] + [("token-value", None)]


def check_row_answers(task: PCFGTask, batch, i: int) -> None:
    """One row: the reference answer from ``batch.text`` and from the decoded tokens agree with the batch."""
    family, operand, o2 = batch.family[i], batch.operand[i], int(batch.o2[i])
    window = symbols(batch.text[i])
    expected = REFERENCE[family](window, operand, o2)
    seq = decode_sequence(task.vocab.decode(batch.tokens[i]))

    assert seq["answer"] == answer_token(expected)
    assert batch.value[i] == raw_value(expected)
    assert task.vocab.decode([batch.answer[i]]) == [seq["answer"]]
    # the decoded sequence on its own, without ``batch.text``
    assert seq["text"] == [s for s in window if s is not NO_TOKEN]
    assert seq["n_pad"] == window.count(NO_TOKEN)
    assert (seq["o2"], seq["operand"]) == (o2, operand)
    assert answer_token(REFERENCE[family](seq["text"], seq["operand"], seq["o2"])) == seq["answer"]


@pytest.mark.parametrize("window,o2s", O2_SETTINGS, ids=["w64-small", "w64-mid", "w250-paper", "w250-large"])
def test_family_answers_match_brute_force(window, o2s):
    task = make_task(window, o2=o2s)
    rng = np.random.default_rng(window + sum(o2s.values()))
    padded_rows = 0
    family_tokens = set()
    for family, operand in CASES:
        batch = task.sample(150, rng, family=family, operand=operand, keep_source=True)
        assert batch.tokens.shape == (150, window + SPECIAL_LEN)
        assert set(batch.operand) == {operand or NULL}
        for i in range(len(batch)):
            check_row_answers(task, batch, i)
            assert is_window_of(batch.text[i], batch.source[i])
        padded_rows += int((batch.text < 0).any(axis=1).sum())
        family_tokens |= {decode_sequence(task.vocab.decode(row))["family"] for row in batch.tokens}
    assert len(family_tokens) == len(FAMILY_NAMES)  # one distinct token per family
    if window == 250:
        assert padded_rows > 0.1 * 150 * len(CASES)  # short strings (~24 %) are covered


def test_count_family_token_is_paper_spelling():
    task = make_task()
    batch = task.sample(4, np.random.default_rng(0), family="count", operand="a")
    assert {decode_sequence(task.vocab.decode(row))["family"] for row in batch.tokens} == {FAMILY_TOKEN_COUNT}


def test_mixed_pretraining_batch_answers_match_brute_force():
    task = make_task(prior="high")
    batch = task.sample(600, np.random.default_rng(21), keep_source=True)
    assert set(batch.family) == set(FAMILY_NAMES)
    for i in range(len(batch)):
        check_row_answers(task, batch, i)


def test_answers_are_nontrivial():
    """Guards the brute-force comparison against a degenerate sampler (e.g. all answers 0)."""
    task = make_task()
    rng = np.random.default_rng(22)
    for family in OPERAND_FAMILIES:
        values = task.sample(300, rng, family=family, operand="a").value
        assert len(set(values.tolist())) >= 4, family


@pytest.mark.parametrize("window", [64, 250])
def test_window_is_contiguous_substring_of_source(window):
    task = make_task(window, o2={"count": 40, "token-value": 40})
    batch = task.sample(500, np.random.default_rng(window), family="count", operand="a", keep_source=True)
    for text_row, source in zip(batch.text, batch.source):
        assert is_window_of(text_row, source)
        assert source.size in length_distribution()
    short = sum(s.size < window for s in batch.source)
    assert (short > 50) if window == 250 else (short == 0)


def test_window_start_is_uniform_over_long_strings():
    """paper App. B.2: a window is subsampled at random, so each of the m = len - W + 1 starts has p = 1/m."""
    window = 250
    task = make_task(window)
    batch = task.sample(3000, np.random.default_rng(31), family="count", operand="a", keep_source=True)
    long_rows = [(t, s) for t, s in zip(batch.text, batch.source) if s.size > window]
    p_end = np.array([1 / (s.size - window + 1) for _, s in long_rows])
    expected, sigma = p_end.sum(), math.sqrt((p_end * (1 - p_end)).sum())
    at_start = sum(np.array_equal(t, s[:window]) for t, s in long_rows)
    at_end = sum(np.array_equal(t, s[-window:]) for t, s in long_rows)
    assert abs(at_start - expected) <= 4 * sigma and abs(at_end - expected) <= 4 * sigma, (at_start, at_end)
    rel = np.array([bytes(s.astype(np.int8)).find(bytes(t.astype(np.int8))) / (s.size - window)
                    for t, s in long_rows])
    assert abs(rel.mean() - 0.5) <= 4 * math.sqrt(1 / 12 / rel.size)


@contextmanager
def time_limit(seconds: int):
    def expire(signum, frame):
        raise TimeoutError(f"did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_reject_mode_with_unfillable_window_fails_fast():
    try:
        task = make_task(max(length_distribution()) + 1, short_strings="reject")
    except ValidationError:
        return
    with time_limit(3), pytest.raises((ValueError, RuntimeError)):
        task.sample(1, np.random.default_rng(0), family="count", operand="a")


def test_reject_mode_keeps_only_strings_that_fill_the_window():
    task = make_task(short_strings="reject")
    batch = task.sample(200, np.random.default_rng(41), family="count", operand="a", keep_source=True)
    assert (batch.text >= 0).all()
    assert all(s.size >= 250 and is_window_of(t, s) for t, s in zip(batch.text, batch.source))


# ------------------------------------------------------------------------------------------------------------
# 4. Spurious correlation r(x, O_FT) - r(x, O_PT) = q
# ------------------------------------------------------------------------------------------------------------

O_PT, O_FT = 0, 1  # a, b: the package defaults (paper §5)


def roles(o_pt: str, o_ft: str) -> tuple[int, int, int]:
    """Terminal indices of O_PT, O_FT and the third terminal."""
    (other,) = set(TERMINALS) - {o_pt, o_ft}
    return TERMINALS.index(o_pt), TERMINALS.index(o_ft), TERMINALS.index(other)


def count_in(row: np.ndarray, token: int, o2: int) -> int:
    return ref_count(symbols(row), TERMINALS[token], o2)


def index_in(row: np.ndarray, token: int, k: int) -> int:
    return ref_index_of_occurrence(symbols(row), TERMINALS[token], k)


@pytest.mark.parametrize(
    "window,o2,q,o_pt,o_ft", [(250, 40, 1, "a", "b"), (64, 16, 3, "a", "b"), (250, 250, 2, "a", "b"),
                              (250, 40, 1, "c", "a")],
)
def test_count_edit_plants_relation_and_keeps_pt_count(window, o2, q, o_pt, o_ft):
    pt, ft, other = roles(o_pt, o_ft)
    task = make_task(window, o2={"count": o2}, q=q, o_pt=o_pt, o_ft=o_ft)
    batch = task.sample(300, np.random.default_rng(o2 + q), family="count", operand=o_ft, c=1.0,
                        keep_source=True)
    assert batch.spurious.all()
    region = np.arange(window) >= window - o2
    near_half = np.arange(window) >= window - o2 // 2
    near_edits, expected_near_edits, var_near_edits = 0, 0.0, 0.0
    for i, (edited, source) in enumerate(zip(batch.text, batch.source)):
        r_pt, r_ft = count_in(edited, pt, o2), count_in(edited, ft, o2)
        assert r_ft - r_pt == q
        assert (batch.value[i], batch.value_pt[i]) == (r_ft, r_pt)

        original = locate_window(edited, source, ~region | (edited == pt))
        changed = original != edited
        assert not changed[~region].any()  # edits stay inside the last O' tokens
        assert np.isin(original[changed], [ft, other]).all() and np.isin(edited[changed], [ft, other]).all()
        assert count_in(original, pt, o2) == r_pt  # the O_PT answer is unchanged by the edit
        minimal = abs(count_in(original, pt, o2) + q - count_in(original, ft, o2))
        assert batch.n_edits[i] == changed.sum() == minimal

        if minimal:  # edited positions are drawn uniformly among the eligible ones (hypergeometric mean)
            eligible = region & (original == original[changed][0])
            frac = (eligible & near_half).sum() / eligible.sum()
            near_edits += int((changed & near_half).sum())
            expected_near_edits += minimal * frac
            var_near_edits += minimal * frac * (1 - frac)
    assert abs(near_edits - expected_near_edits) <= 4 * math.sqrt(var_near_edits)


@pytest.mark.parametrize(
    "window,k,q,o_pt,o_ft", [(250, 6, 1, "a", "b"), (250, 2, 3, "a", "b"), (64, 6, 1, "a", "b"),
                             (250, 6, 2, "b", "c")],
)
def test_index_edit_plants_relation_and_keeps_pt_index(window, k, q, o_pt, o_ft):
    pt, ft, other = roles(o_pt, o_ft)
    o2s = {"index-of-occurrence": k, "count": min(40, window)}
    task = make_task(window, o2=o2s, q=q, o_pt=o_pt, o_ft=o_ft)
    batch = task.sample(300, np.random.default_rng(k + q), family="index-of-occurrence", operand=o_ft, c=1.0,
                        keep_source=True)
    distance = window - np.arange(window)
    for i, (edited, source) in enumerate(zip(batch.text, batch.source)):
        i_pt, i_ft = index_in(edited, pt, k), index_in(edited, ft, k)
        assert i_pt > 0 and i_ft - i_pt == q
        assert (batch.value[i], batch.value_pt[i]) == (i_ft, i_pt)

        target = i_pt + q
        original = locate_window(edited, source, distance > target)
        changed = original != edited
        assert index_in(original, pt, k) == i_pt  # the O_PT answer is unchanged by the edit
        assert not changed[distance > target].any()
        assert not (edited[changed] == pt).any()  # no token is turned into O_PT
        near = distance < i_pt
        assert np.isin(original[changed & near], [ft, other]).all()  # O_PT before i_pt is never touched
        # minimal edit that keeps r(x, O_PT): exactly k-1 O_FT nearer than i_pt, none strictly between
        # i_pt and the target, and O_FT at the target
        minimal = (abs(int((original[near] == ft).sum()) - (k - 1))
                   + int((original[(distance > i_pt) & (distance < target)] == ft).sum())
                   + int(original[distance == target][0] != ft))
        assert batch.n_edits[i] == changed.sum() == minimal


@pytest.mark.parametrize("c", [0.25, 0.5, 0.8])
def test_realised_spurious_rate_and_untouched_rest(c):
    n = 2000
    task = make_task()
    batch = task.sample(n, np.random.default_rng(int(c * 100)), family="count", operand="b", c=c,
                        keep_source=True)
    assert within_sigmas(batch.spurious.mean(), c, n)
    for i, (text_row, source) in enumerate(zip(batch.text, batch.source)):
        if batch.spurious[i]:
            assert count_in(text_row, O_FT, 40) - count_in(text_row, O_PT, 40) == 1
        else:
            assert batch.n_edits[i] == 0 and is_window_of(text_row, source)


def majority_share(labels: list[int]) -> float:
    return max(np.bincount(labels)) / len(labels)


def test_label_histogram_barely_moves_under_full_correlation():
    """paper App. B.2, Fig. 16: the O_PT label histogram at c = 1 looks like the c = 0 one."""
    task = make_task()
    shares = {}
    for c in (0.0, 1.0):
        batch = task.sample(3000, np.random.default_rng(51), family="count", operand="a", c=c,
                            keep_source=True)
        labels = [count_in(row, O_PT, 40) for row in batch.text]
        assert labels == batch.value_pt.tolist()
        shares[c] = majority_share(labels)
    assert abs(shares[1.0] - shares[0.0]) < 0.05, shares


def test_spurious_rate_is_validated():
    task = make_task()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        task.sample(4, rng, family="count", c=1.5)
    with pytest.raises(ValueError):
        task.sample(4, rng, family="token-value", c=0.5)


# ------------------------------------------------------------------------------------------------------------
# 5. Operand priors and the family mix
# ------------------------------------------------------------------------------------------------------------

# paper §5, App. C.2
PAPER_PRIORS = {"low": (0.999, 0.001, 0.0), "medium": (0.9, 0.1, 0.0), "high": (0.5, 0.3, 0.2)}


@pytest.mark.parametrize("name", PAPER_PRIORS)
def test_named_priors_match_paper(name):
    assert np.allclose(resolve_prior(name), PAPER_PRIORS[name])


def test_prior_as_numbers():
    assert np.allclose(resolve_prior("0.7,0.2,0.1"), (0.7, 0.2, 0.1))
    assert np.allclose(resolve_prior([0.2, 0.3, 0.5]), (0.2, 0.3, 0.5))


@pytest.mark.parametrize("bad", ["nonsense", "0.5,0.5", "0.6,0.6,-0.2", "0.5,0.3,0.3", "a,b,c", (0.5, 0.5)])
def test_bad_priors_raise(bad):
    with pytest.raises(ValueError):
        resolve_prior(bad)


def test_nan_prior_raises():
    with pytest.raises(ValueError):
        resolve_prior("nan,0.5,0.5")


def test_pretraining_mix_follows_high_prior_and_uniform_families():
    n = 20000
    batch = make_task(prior="high").sample(n, np.random.default_rng(61))
    families = np.array(batch.family)
    operands = np.array(batch.operand)
    for name in FAMILY_NAMES:
        assert within_sigmas((families == name).mean(), 1 / 5, n), name
    assert set(operands[families == "token-value"]) == {NULL}
    with_operand = operands[families != "token-value"]
    for op, p in zip(TERMINALS, PAPER_PRIORS["high"]):
        assert within_sigmas((with_operand == op).mean(), p, with_operand.size), op


def test_low_prior_almost_never_draws_b():
    batch = make_task(prior="low").sample(5000, np.random.default_rng(62), family="count")
    operands = np.array(batch.operand)
    assert (operands == "c").sum() == 0
    assert (operands == "b").sum() <= 20  # expected 5


# ------------------------------------------------------------------------------------------------------------
# 6. Vocabulary and configuration validation
# ------------------------------------------------------------------------------------------------------------


def test_vocabulary_covers_every_number_and_symbol_at_window_250():
    vocab = make_task(250).vocab
    for token in [str(i) for i in range(251)] + list(TERMINALS) + [PAD, SOS, SOT, EOT, ART, NULL]:
        assert vocab.decode([vocab.id(token)]) == [token]
    assert len(set(vocab.tokens)) == len(vocab.tokens)


def test_extreme_answers_are_in_vocabulary():
    """O' up to the window and indices far back in the window all encode as single tokens."""
    o2s = {"count": 250, "count-composition": 250, "index-of-occurrence": 80, "index-of-composition": 1,
           "token-value": 250}
    task = make_task(250, o2=o2s)
    rng = np.random.default_rng(71)
    largest = 0
    for family, operand in CASES:
        batch = task.sample(100, rng, family=family, operand=operand, keep_source=True)
        for i in range(len(batch)):
            check_row_answers(task, batch, i)
        largest = max(largest, int(batch.value.max()))
    assert largest > 230


def test_encode_decode_roundtrip_on_batch():
    task = make_task(prior="high")
    batch = task.sample(50, np.random.default_rng(72))
    for row in batch.tokens:
        decoded = task.vocab.decode(row)
        assert [task.vocab.id(t) for t in decoded] == row.tolist()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window": 1},
        {"window": 250, "o2": {"count": 251}},
        {"window": 30},  # the default O' = 40 of count and token-value exceeds the window
        {"o2": {"count": 0}},
        {"o2": {"no-such-family": 3}},
        {"families": {"no-such-family": 1.0}},
        {"families": {"count": -1.0, "token-value": 2.0}},
        {"families": {"count": 0.0}},
        {"o_pt": "b", "o_ft": "b"},
        {"prior": "nonsense"},
        {"prior": "0.5,0.3,0.3"},
    ],
)
def test_invalid_config_raises(kwargs):
    with pytest.raises(ValidationError):
        TaskConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"prior": "nan,0.5,0.5"}, {"families": {"count": float("nan")}}])
def test_nan_config_values_raise(kwargs):
    with pytest.raises(ValidationError):
        TaskConfig(**kwargs)
