"""Single-step saliency pruning (paper App. D, Alg. 3; Figs. 7, 55–59, 79–89).

Objective: the pretraining-task loss — cross-entropy of the answer for the task asked with O_PT (strings from
the generating process, c_test = 0), averaged over ``n_grad`` samples (not given by the paper).

Score: grad(w) · w for every weight. To first order, zeroing w changes the loss by −grad·w, so the largest
scores are the weights whose removal most *lowers* the pretraining loss — a wrapper, if there is one.

Units:
- ``neuron`` (PCFG, paper: "a neuron is a row in the weight matrix"): one output unit of a linear map, i.e. one
  row of a PyTorch ``Linear.weight`` (shape out × in) together with that output's bias entry. Its score is the
  sum of grad·w over the row plus grad·b of the bias (the first-order loss change of removing the whole unit;
  the paper does not state the aggregation; see docs/analysis.md). Pruning zeroes the row and the bias entry.
  Candidate matrices (the paper does not say; we take every linear map inside the blocks):
  ``attn.qkv`` (a row = one query/key/value dimension of one head), ``attn.proj`` (a row = one residual
  dimension written by attention), ``mlp.fc`` (a row = one MLP hidden neuron), ``mlp.proj`` (a row = one
  residual dimension written by the MLP). Embeddings and the unembedding are excluded by default (a row of the
  unembedding is one output class: removing it cannot revive a capability, only forbid an answer).
- ``weight`` (Tracr, Figs. 55, 57): every single entry of the candidate matrices and their biases.

K is a global top-K over all candidates (inferred, the paper does not say). The ranking is computed once, on the
unpruned model (single-step), so the pruned sets for increasing K are nested. For each K we report the accuracy
on O_PT and O_FT at every c_test, and the predicted-class histogram on the O_PT set (Fig. 59): an accuracy gain
that is only a collapse onto one class shows up there, and cannot exceed the set's majority rate.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from wrapperlab.analysis.common import AnalysisError, Result, Settings, need
from wrapperlab.models.registry import Matrix
from wrapperlab.tasks.task import PCFGTask
from wrapperlab.training.evaluation import build_eval_sets, evaluate_sets, predict


class PruneSettings(Settings):
    ks: tuple[int, ...] = tuple(range(16))  # Fig. 7: 0..15
    unit: Literal["neuron", "weight"] = "neuron"
    matrices: tuple[str, ...] = ()  # () = the model family's default (gpt: attn.qkv, attn.proj, mlp.fc, mlp.proj)
    n_grad: int = Field(1024, ge=1)
    n_eval: int = Field(500, ge=1)
    c_tests: tuple[float, ...] = (0.0, 1.0)
    seed: int = Field(0, ge=0)
    units_listed: int = Field(100, ge=0)

    @field_validator("ks")
    @classmethod
    def _ks(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or min(v) < 0:
            raise ValueError(f"need one or more K >= 0 (got {list(v)})")
        return v

    @field_validator("c_tests")
    @classmethod
    def _c_tests(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 <= c <= 1 for c in v):
            raise ValueError(f"every value must be in [0, 1] (got {list(v)})")
        return v


@dataclass
class Unit:
    """One prunable unit: ``param`` is the weight's name, ``index`` the row or column (an output unit) or
    (row, col) (weight);
    ``bias`` the name of the bias entry pruned with it (neurons), if any."""
    block: int
    matrix: str
    kind: str  # "row" or "column" (an output unit), "weight" or "bias"
    index: tuple[int, ...]
    score: float
    param: str
    bias: str | None = field(default=None)

    def row(self, rank: int) -> dict:
        return {"rank": rank, "block": self.block, "matrix": self.matrix, "kind": self.kind,
                "index": list(self.index), "score": self.score}


def _candidates(model, matrices: tuple[str, ...]) -> list[Matrix]:
    """The prunable matrices of the model's family named in ``matrices`` (its default set when empty)."""
    comp = need(model, "matrices")
    wanted = matrices or comp.default_matrices
    out = [m for m in comp.matrices if m.name in wanted]
    if not out:
        raise AnalysisError(f"matrices: none of {list(wanted)} is a prunable matrix of this {comp.family} model "
                            f"(choose from {', '.join(comp.matrix_names)})")
    return out


def pretraining_loss(model, task: PCFGTask, family: str, n: int, seed: int) -> torch.Tensor:
    """Mean answer cross-entropy on ``n`` fresh samples of (family, O_PT) at c = 0."""
    b = task.sample(n, np.random.default_rng([seed, 7]), family=family, operand=task.config.o_pt, c=0.0)
    device = next(model.parameters()).device
    x = torch.from_numpy(task.answer_inputs(b.tokens)).to(device)
    return F.cross_entropy(model(x, positions=task.readout), torch.from_numpy(b.answer).to(device))


def saliency(model, task: PCFGTask, *, family: str = "count", settings: PruneSettings | None = None,
             top: int | None = None) -> tuple[list[Unit], int]:
    """The ``top`` highest-scoring candidate units (all if None), highest first — ties keep parameter order —
    and the number of candidates."""
    s = settings or PruneSettings()
    return rank_units(model, lambda m: pretraining_loss(m, task, family, s.n_grad, s.seed), s.matrices, s.unit, top)


def rank_units(model, loss_fn, matrices: tuple[str, ...] = (), unit: str = "neuron",
               top: int | None = None) -> tuple[list[Unit], int]:
    """grad·w saliency of ``loss_fn(model)`` (a scalar to minimise; or already backpropagated and returned detached)
    over the candidate matrices: the ``top``
    highest-scoring units (all if None), highest first — ties keep parameter order — and the number of candidates.
    ``unit``: "neuron" (an output unit with its bias entry) or "weight" (every entry)."""
    was = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    wanted = [params[n] for m in _candidates(model, matrices) for n in (m.param, m.bias) if n is not None]
    flags = [p.requires_grad for p in wanted]
    for p in wanted:  # a model loaded frozen (a merged PEFT adapter, say) still needs the candidates' gradients
        p.requires_grad_(True)
    try:
        loss = loss_fn(model)
        if loss.requires_grad:  # a loss_fn may backpropagate itself, batch by batch, and return the value detached
            loss.backward()
    finally:
        for p, f in zip(wanted, flags):
            p.requires_grad_(f)
        model.train(was)
    chunks: list[torch.Tensor] = []
    meta: list[tuple[str, int, str, str, str | None, tuple[int, ...]]] = []  # name, block, matrix, kind, bias, shape
    with torch.no_grad():
        for m in _candidates(model, matrices):
            p = params[m.param]
            gw = _grad_w(p)
            if unit == "weight":  # every entry of the matrix, then of its bias (the parameter order)
                chunks.append(gw.flatten())
                meta.append((m.param, m.block, m.name, "weight", None, tuple(p.shape)))
                if m.bias is not None:
                    chunks.append(_grad_w(params[m.bias]).flatten())
                    meta.append((m.bias, m.block, m.name, "bias", None, tuple(params[m.bias].shape)))
            else:
                rows = gw.sum(1 - m.axis)
                if m.bias is not None:
                    bp = params[m.bias]
                    if bp.grad is not None:
                        rows = rows + (bp.grad * bp).double()
                chunks.append(rows)
                meta.append((m.param, m.block, m.name, ("row", "column")[m.axis], m.bias, (p.shape[m.axis],)))
    model.zero_grad(set_to_none=True)
    scores = torch.cat(chunks)
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order if top is None else order[:top]
    offsets = np.cumsum([0] + [c.numel() for c in chunks])
    units = []
    for i in order.tolist():
        j = int(np.searchsorted(offsets, i, side="right") - 1)
        name, block, matrix, kind, bias, shape = meta[j]
        idx = tuple(int(v) for v in np.unravel_index(i - offsets[j], shape))
        units.append(Unit(block, matrix, kind, idx, float(scores[i]), name, bias))
    return units, int(scores.numel())


def _grad_w(p: torch.Tensor) -> torch.Tensor:
    return (p.grad * p).double() if p.grad is not None else torch.zeros_like(p, dtype=torch.float64)


@torch.no_grad()
def zero_units(model, units: list[Unit]) -> None:
    params = dict(model.named_parameters())
    for u in units:
        if u.kind in ("row", "column"):
            w = params[u.param]
            (w[u.index[0]] if u.kind == "row" else w[:, u.index[0]]).zero_()
            if u.bias:
                params[u.bias][u.index[0]] = 0.0
        else:
            params[u.param][u.index] = 0.0


def prune(model, task: PCFGTask, *, family: str = "count",
          settings: PruneSettings | None = None) -> Result:
    """Accuracy against K for the top-K pruned units. Rows: k, operand, target (O_PT/O_FT), c_test, acc,
    majority[, follows_spurious]. Side tables: ``units`` (the ranked units), ``histogram`` (predicted classes
    on the O_PT c_test=0 set for every K, and the true answers as k = "truth")."""
    s = settings or PruneSettings()
    n_list = max(s.units_listed, max(s.ks))
    units, n_candidates = saliency(model, task, family=family, settings=s, top=n_list)
    sets = build_eval_sets(task, family, list(s.c_tests), s.n_eval, s.seed + 1)
    pt0 = next(x for x in sets if x.operand == task.config.o_pt and x.c_test == 0.0)
    names = task.output_names
    pruned = copy.deepcopy(model).eval()
    device = next(model.parameters()).device
    rows, hist = [], []
    for t, c in zip(*np.unique(pt0.batch.answer, return_counts=True)):
        hist.append({"k": "truth", "class": names[int(t)], "count": int(c)})
    done = 0
    for k in sorted(set(s.ks)):
        if k > n_candidates:
            raise AnalysisError(f"ks: K={k} exceeds the {n_candidates} candidate units")
        zero_units(pruned, units[done:k])
        done = k
        for r in evaluate_sets(pruned, task, sets, str(device)):
            target = "O_PT" if r["operand"] == task.config.o_pt else "O_FT"
            rows.append({"k": k, "target": target, **r})
        pred = predict(pruned, task, pt0.batch.tokens, str(device))
        for t, c in zip(*np.unique(pred, return_counts=True)):
            hist.append({"k": k, "class": names[int(t)], "count": int(c)})
    listed = [u.row(i + 1) for i, u in enumerate(units)]
    meta = {"settings": s.to_dict(), "family": family, "n_candidates": n_candidates,
            "matrices": list(dict.fromkeys(m.name for m in _candidates(model, s.matrices))),
            "objective": f"CE of {family} {task.config.o_pt} (c=0), n={s.n_grad}"}
    return Result("prune", rows, meta, {"units": listed, "histogram": hist,
                                        "summary": prune_summary(rows, listed, max(s.ks))})


def prune_summary(rows: list[dict], units: list[dict], k_max: int) -> list[dict]:
    """Per (target, c_test): accuracy at K=0, the best K ≤ k_max and its accuracy, and the blocks holding the
    pruned units up to that K."""
    out = []
    keys = sorted({(r["target"], r["c_test"]) for r in rows})
    for target, c in keys:
        sub = sorted((r for r in rows if r["target"] == target and r["c_test"] == c and r["k"] <= k_max),
                     key=lambda r: r["k"])
        base = sub[0]["acc"]
        best = max(sub, key=lambda r: (r["acc"], -r["k"])) if target == "O_PT" else min(sub, key=lambda r: r["acc"])
        blocks = sorted({u["block"] for u in units[:best["k"]]})
        out.append({"target": target, "c_test": c, "acc_k0": base, "best_k": best["k"], "acc_best": best["acc"],
                    "change": best["acc"] - base, "majority": best["majority"], "blocks": blocks,
                    "matrices": sorted({u["matrix"] for u in units[:best["k"]]})})
    return out
