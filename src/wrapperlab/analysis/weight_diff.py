"""The structure of a fine-tuning's weight change ΔW = W_finetuned − W_base, matrix by matrix: how large, how
low-rank and how local it is (the question analyses of safety fine-tuning ask of ΔW: a thin wrapper should be a
small, low-rank, concentrated change; a deletion rewrites what carried the capability).

Per matrix of the model's ``matrices`` component (oriented as (output units, inputs)): the relative change
‖ΔW‖_F / ‖W_base‖_F; the effective rank exp(H(σ/Σσ)) of ΔW's singular values (Roy & Vetterli 2007: 1 for a rank-1
change, n for n equal singular values); the rank whose singular values hold ``energy`` of ‖ΔW‖_F²; and the share of
‖ΔW‖_F² in the ``top_k`` output units (rows) and in the ``top_k`` inputs (columns), beside k / n, the share a change
spread evenly would give. Side table ``blocks``: each block's share of the whole change. ``summary``: one row of
model-wide numbers (energy-weighted over matrices) for calibration.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from wrapperlab.analysis.common import AnalysisError, Result, Settings, need


class WeightDiffSettings(Settings):
    top_k: int = Field(4, ge=1, description="rows/columns whose share of the change is reported")
    energy: float = Field(0.9, gt=0, le=1, description="share of ‖ΔW‖² the reported rank must explain")


def effective_rank(sv: np.ndarray) -> float:
    """exp of the entropy of the normalised singular values (0 for a zero matrix)."""
    total = float(sv.sum())
    if total <= 0:
        return 0.0
    p = sv[sv > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def energy_rank(sv: np.ndarray, energy: float) -> int:
    """The fewest singular values whose squares hold ``energy`` of the total (0 for a zero matrix)."""
    e = sv.astype(np.float64) ** 2
    if e.sum() <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(e) / e.sum(), energy - 1e-12) + 1)


def top_share(norms2: np.ndarray, k: int) -> float:
    """Share of the total held by the ``k`` largest entries."""
    total = float(norms2.sum())
    return float(np.sort(norms2)[::-1][:k].sum() / total) if total > 0 else 0.0


def _oriented(w: torch.Tensor, axis: int) -> np.ndarray:
    w = w.detach().double().cpu()
    return (w if axis == 0 else w.T).numpy()


def weight_diff(base, finetuned, s: WeightDiffSettings | None = None) -> Result:
    """ΔW structure of every prunable matrix of ``finetuned`` against the same-named matrix of ``base``."""
    s = s or WeightDiffSettings()
    comp = need(finetuned, "matrices")
    pb, pf = dict(base.named_parameters()), dict(finetuned.named_parameters())
    rows = []
    for m in comp.matrices:
        if m.param not in pb:
            raise AnalysisError(f"base model has no parameter {m.param}; a pair must share an architecture")
        if pb[m.param].shape != pf[m.param].shape:
            raise AnalysisError(f"{m.param}: shapes differ ({tuple(pb[m.param].shape)} in the base, "
                                f"{tuple(pf[m.param].shape)} fine-tuned)")
        wb = _oriented(pb[m.param], m.axis)
        dw = _oriented(pf[m.param], m.axis) - wb
        sv = np.linalg.svd(dw, compute_uv=False)
        d2 = float((dw ** 2).sum())
        k_r, k_c = min(s.top_k, dw.shape[0]), min(s.top_k, dw.shape[1])
        rows.append({"param": m.param, "block": m.block, "matrix": m.name, "rows": dw.shape[0], "cols": dw.shape[1],
                     "delta_norm": d2 ** 0.5, "base_norm": float(np.sqrt((wb ** 2).sum())),
                     "rel_change": d2 ** 0.5 / max(float(np.sqrt((wb ** 2).sum())), 1e-12),
                     "effective_rank": effective_rank(sv), "energy_rank": energy_rank(sv, s.energy),
                     "top_rows_share": top_share((dw ** 2).sum(1), k_r), "even_rows_share": k_r / dw.shape[0],
                     "top_cols_share": top_share((dw ** 2).sum(0), k_c), "even_cols_share": k_c / dw.shape[1]})
    total = sum(r["delta_norm"] ** 2 for r in rows)
    blocks = []
    for b in sorted({r["block"] for r in rows}):
        mine = [r for r in rows if r["block"] == b]
        blocks.append({"block": b, "share": sum(r["delta_norm"] ** 2 for r in mine) / total if total > 0 else 0.0,
                       "rel_change": (sum(r["delta_norm"] ** 2 for r in mine)
                                      / max(sum(r["base_norm"] ** 2 for r in mine), 1e-24)) ** 0.5})
    w = [r["delta_norm"] ** 2 / total if total > 0 else 1 / len(rows) for r in rows]
    top = max(rows, key=lambda r: r["delta_norm"])
    summary = {"rel_change": (total / max(sum(r["base_norm"] ** 2 for r in rows), 1e-24)) ** 0.5,
               "effective_rank": float(np.dot(w, [r["effective_rank"] for r in rows])),
               "energy_rank": float(np.dot(w, [r["energy_rank"] for r in rows])),
               "top_rows_share": float(np.dot(w, [r["top_rows_share"] for r in rows])),
               "top_cols_share": float(np.dot(w, [r["top_cols_share"] for r in rows])),
               "top_block": max(blocks, key=lambda b: b["share"])["block"],
               "top_block_share": max(b["share"] for b in blocks), "top_matrix": top["param"]}
    return Result("weight_diff", rows, {"settings": s.to_dict(), "weighting": "each matrix by its share of ‖ΔW‖²"},
                  {"blocks": blocks, "summary": [summary]})
