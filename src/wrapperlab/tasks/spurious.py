"""Planting the spurious correlation r(x, O_FT) - r(x, O_PT) = q (paper §5, App. B.2).

The paper says only that the correlation is planted "by artificially adding the target tokens O_FT" and that
the label histograms should barely move (its Fig. 16). Our edit is the **smallest Hamming edit** that makes the
relation hold, touching only tokens that the answer depends on, at positions drawn uniformly at random:

count (region = the last O' tokens). With A = #O_PT and B = #O_FT we need B = A + q. We change only
O_FT and third-terminal tokens: D = A + q - B of the third terminal become O_FT (D > 0), or |D| O_FT tokens
become the third terminal (D < 0). This is the smallest edit that leaves r(x, O_PT) untouched, so the O_PT
label histogram at c = 1 is exactly the pretraining one and the O_FT histogram is that one shifted by q —
the "small distribution shift" the paper asks for (its Fig. 16). (A Hamming-minimal edit that may also turn
O_PT into O_FT needs half as many substitutions but, because this grammar's counts vary little, squeezes
both histograms onto one or two classes: we measured an 81 % majority class at O' = 16 against 45 % without
edits, so we rejected it.)

index-of-occurrence (q >= 1). Let i_a be the distance of the k-th O_PT from EOT. We set the token at
distance i_a + q to O_FT, turn any O_FT strictly between i_a and i_a + q into the third terminal, and make
exactly k - 1 O_FT among distances 1..i_a - 1 by switching O_FT <-> third terminal. No O_PT token at distance
<= i_a is touched, so r(x, O_PT) is unchanged; the token at i_a + q may itself have been O_PT (it lies beyond the
k-th occurrence, so the answer does not move, but the window's O_PT count does). This is the minimal edit that
keeps r(x, O_PT) fixed.

If no such edit exists for a string (e.g. O_PT occurs fewer than k times), the caller draws a fresh string
(rejection) — documented in ``task.py`` and counted in the spurious report.
"""

from __future__ import annotations

import numpy as np


def _pick(rng: np.random.Generator, positions: np.ndarray, n: int) -> np.ndarray:
    return rng.choice(positions, size=n, replace=False) if n else positions[:0]


def edit_count(row: np.ndarray, o_pt: int, o_ft: int, other: int, q: int, o2: int,
               rng: np.random.Generator) -> np.ndarray | None:
    """Return an edited copy of ``row`` with count(O_FT) - count(O_PT) = q in the last o2 tokens, or None."""
    row = row.copy()
    start = row.shape[0] - o2
    region = row[start:]
    n_pt = int((region == o_pt).sum())
    b_pos = np.flatnonzero(region == o_ft) + start
    c_pos = np.flatnonzero(region == other) + start
    d = n_pt + q - b_pos.size
    if d > 0:
        if c_pos.size < d:
            return None
        row[_pick(rng, c_pos, d)] = o_ft
    elif d < 0:
        if n_pt + q < 0:
            return None
        row[_pick(rng, b_pos, -d)] = other
    return row


def edit_index(row: np.ndarray, o_pt: int, o_ft: int, other: int, q: int, k: int,
               rng: np.random.Generator) -> np.ndarray | None:
    """Return an edited copy with index(O_FT, k) - index(O_PT, k) = q, or None when impossible."""
    if q < 1:
        raise ValueError("the index-of-occurrence spurious edit needs q >= 1")
    row = row.copy()
    w = row.shape[0]
    dist = w - np.arange(w)  # distance from EOT of each column
    a_cols = np.flatnonzero(row == o_pt)[::-1]
    if a_cols.size < k:
        return None
    ia = dist[a_cols[k - 1]]
    target = ia + q
    if target > w or row[w - target] < 0:
        return None
    row[w - target] = o_ft
    between = (dist > ia) & (dist < target) & (row == o_ft)
    row[between] = other
    near = dist < ia
    b_near = np.flatnonzero(near & (row == o_ft))
    c_near = np.flatnonzero(near & (row == other))
    diff = b_near.size - (k - 1)
    if diff > 0:
        row[_pick(rng, b_near, diff)] = other
    elif diff < 0:
        if c_near.size < -diff:
            return None
        row[_pick(rng, c_near, -diff)] = o_ft
    return row


SPURIOUS_FAMILIES = ("count", "index-of-occurrence")


def relation_holds(r_ft: np.ndarray, r_pt: np.ndarray, q: int) -> np.ndarray:
    return (r_ft - r_pt) == q


def spurious_statistics(task, family: str, cs, n: int, seed: int) -> list[dict]:
    """Per spurious rate c: the realised share of edited samples and of samples satisfying the relation, the mean
    number of edits, the strings redrawn, and the label histograms of O_PT and O_FT (the paper's Fig. 16)."""
    cfg = task.config
    results = []
    for cv in cs:
        rng = np.random.default_rng([seed, int(cv * 1000)])
        res = {"c": cv, "n": n}
        for op in (cfg.o_pt, cfg.o_ft):
            b = task.sample(n, rng, family=family, operand=op, c=cv)
            res[f"hist_{op}"] = np.bincount(b.value, minlength=1).tolist()
            if op == cfg.o_ft:
                res["edited_rate"] = float(b.spurious.mean())
                res["relation_rate"] = float(relation_holds(b.value, b.value_pt, cfg.q).mean())
                res["mean_edits"] = float(b.n_edits[b.spurious].mean()) if b.spurious.any() else 0.0
                res["redrawn"] = int(b.rejected)
        results.append(res)
    return results
