"""Measurements of a capability (``tasks/capability.py``) on a model, and the ``capability`` evaluation of its
training stages: behaviour (greedy decoding from the prompt reproduces every answer token) and the teacher-forced
answer loss, on the held-out records. Records of different lengths are batched by length (no padding, so no
attention mask is needed and positions are exact)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from wrapperlab.tasks.capability import Capability, _groups
from wrapperlab.training.evaluation import EVALUATIONS, Evaluator


def _device(model) -> torch.device:
    return next(model.parameters()).device


# -------------------------------------------------------------------------------------------- measurements
@torch.no_grad()
def correct(model, cap: Capability, idx: np.ndarray | None = None, batch_size: int = 256) -> np.ndarray:
    """Per record of ``idx``: does greedy decoding from the prompt reproduce every answer token?"""
    idx = np.arange(len(cap)) if idx is None else idx
    dev, was = _device(model), model.training
    model.eval()
    ok = {}
    keys = [len(p) * 10_000 + len(a) for p, a in zip(cap.prompts, cap.answers)]
    for g in _groups(keys, idx):
        for s in range(0, len(g), batch_size):
            rows = g[s:s + batch_size]
            x = torch.tensor([cap.prompts[i] for i in rows], device=dev)
            ans = torch.tensor([cap.answers[i] for i in rows], device=dev)
            hit = torch.ones(len(rows), dtype=torch.bool, device=dev)
            for j in range(ans.shape[1]):
                pred = model(x, positions=-1).argmax(-1)
                hit &= pred == ans[:, j]
                x = torch.cat([x, pred[:, None]], 1)
            ok.update(zip(rows.tolist(), hit.cpu().tolist()))
    model.train(was)
    return np.array([ok[int(i)] for i in idx], dtype=bool)


def accuracy(model, cap: Capability, idx: np.ndarray | None = None) -> float:
    return float(correct(model, cap, idx).mean())


def answer_loss(model, cap: Capability, idx: np.ndarray, *, batch_size: int = 128,
                backward: bool = False) -> torch.Tensor:
    """Mean teacher-forced cross-entropy of the answer tokens given the prompt, over every answer token of the
    records ``idx``, in batches of ``batch_size`` records. ``backward``: backpropagate batch by batch (the
    gradient of the mean, without holding every batch's graph) and return the value detached; otherwise the
    returned value is differentiable."""
    dev = _device(model)
    count = sum(len(cap.answers[i]) for i in idx)
    total = torch.zeros((), device=dev)
    keys = [len(p) * 10_000 + len(a) for p, a in zip(cap.prompts, cap.answers)]
    for g in _groups(keys, idx):
        lp, la = len(cap.prompts[g[0]]), len(cap.answers[g[0]])
        for s in range(0, len(g), batch_size):
            seq = torch.tensor([cap.prompts[i] + cap.answers[i] for i in g[s:s + batch_size]], device=dev)
            logits = model(seq[:, :-1], positions=torch.arange(lp - 1, lp - 1 + la, device=dev))
            part = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, lp:].reshape(-1),
                                   reduction="sum") / count
            if backward:
                part.backward()
                part = part.detach()
            total = total + part
    return total


class CapabilityEvaluator(Evaluator):
    """A capability stage's evaluation: accuracy and answer loss on the held-out records, as one row in the shape of
    the accuracy rows (family ``capability``, operand O_PT, c_test 0) so revival curves read it alike."""

    stoppable = True

    def __init__(self, cfg, task):
        self.task = task
        self.cap = task.capability
        self.held_out = task.split()[1]
        answers = [self.cap.records[i].answer for i in self.held_out]
        self.majority = max(answers.count(a) for a in set(answers)) / len(answers)

    def __call__(self, model: torch.nn.Module, step: int) -> list[dict]:
        was = model.training
        model.eval()
        with torch.no_grad():
            loss = float(answer_loss(model, self.cap, self.held_out))
        acc = accuracy(model, self.cap, self.held_out)
        model.train(was)
        return [{"family": "capability", "operand": self.task.config.o_pt, "c_test": 0.0, "acc": acc,
                 "majority": self.majority, "n": len(self.held_out), "loss": loss}]

    def line(self, step: int, rows: list[dict]) -> str:
        r = rows[0]
        return f"step {step:>6}: held-out accuracy {100 * r['acc']:.1f}% (maj {100 * r['majority']:.0f}%), " \
               f"answer loss {r['loss']:.4f}"

    def headline(self, rows: list[dict]) -> dict | None:
        return rows[0]


EVALUATIONS["capability"] = CapabilityEvaluator
