"""Difference-in-means direction ablation: does removing one direction of the fine-tuned model's residual stream
restore the capability? (As the refusal-direction work ablates one difference-in-means direction; here the two
means contrast the models, not two prompt sets: a wrapper that shifts the residual stream along one direction is
undone by removing it, a deletion is not.)

At every residual boundary B_l the direction d_l is the mean, over the capability's training records, of the
fine-tuned minus the base model's residual at the last prompt token. Scored on the held-out records, per l:
``mode: project`` removes the component along d_l from the fine-tuned model's residual at every boundary and
position (the refusal work's directional ablation); ``mode: subtract`` subtracts d_l itself at B_l, every position
(activation steering by the mean difference). Rows: per boundary, ‖d_l‖, accuracy and restored fraction; ``summary``:
the boundary that restores most.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from wrapperlab.analysis.common import Result, Settings, need
from wrapperlab.analysis.interventions import Intervened, last_token_residuals, restored, same_shape
from wrapperlab.tasks.capability import Capability
from wrapperlab.training.capability_eval import accuracy


class DirectionSettings(Settings):
    mode: Literal["project", "subtract"] = Field("project", description="remove the direction's component at every "
                                                                        "boundary (project) or subtract the mean "
                                                                        "difference at its own boundary (subtract)")
    test_frac: float = Field(0.25, gt=0, lt=1, description="records held out to score the ablation")
    limit: int = Field(1000, ge=2, description="training records the means are taken over (at most)")
    min_gap: float = Field(0.1, ge=0, le=1)
    seed: int = Field(0, ge=0)


def ablated(finetuned, directions: torch.Tensor, at: int, mode: str) -> Intervened:
    """``finetuned`` with direction ``directions[at]`` removed (project: at every boundary) or subtracted (at B_at)."""
    names = [h for _, h in need(finetuned, "residual").residual]
    d = directions[at]
    unit = d / d.norm() if d.norm() > 0 else torch.zeros_like(d)

    def project(x, hook):
        u = unit.to(x.dtype)
        return x - (x @ u)[..., None] * u

    def subtract(x, hook):
        return x - d.to(x.dtype)

    hooks = [(n, project) for n in names] if mode == "project" else [(names[at], subtract)]
    return Intervened(finetuned, lambda _tokens: hooks)


def direction(base, finetuned, cap: Capability, s: DirectionSettings | None = None) -> Result:
    """Per boundary: the difference-in-means direction of ``finetuned`` against ``base`` and the capability's
    held-out accuracy with it ablated."""
    s = s or DirectionSettings()
    same_shape(base, finetuned)
    tr, te = cap.split(s.test_frac, s.seed)
    tr = tr[:s.limit]
    dirs = (last_token_residuals(finetuned, cap, tr) - last_token_residuals(base, cap, tr)).mean(1)
    acc_b, acc_f = accuracy(base, cap, te), accuracy(finetuned, cap, te)
    labels = [lab for lab, _ in need(finetuned, "residual").residual]
    rows = []
    for i, lab in enumerate(labels):
        acc = accuracy(ablated(finetuned, dirs, i, s.mode), cap, te)
        rows.append({"boundary": lab, "index": i, "norm": float(dirs[i].norm()), "acc": acc,
                     "restored": restored(acc, acc_b, acc_f, s.min_gap)})
    best = max(rows, key=lambda r: (r["acc"], -r["index"]))
    summary = {"acc_base": acc_b, "acc_finetuned": acc_f, "best_boundary": best["boundary"], "best_acc": best["acc"],
               "best_restored": best["restored"], "n_train": len(tr), "n_test": len(te)}
    return Result("direction", rows, {"settings": s.to_dict(), "capability": cap.source,
                                      "position": "last prompt token"}, {"summary": [summary]})
