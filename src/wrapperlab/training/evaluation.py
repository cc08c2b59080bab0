"""Behavioural accuracy on fixed, seeded evaluation sets (the columns of the paper's Tables 5–8).

For the stage's family F: accuracy on O_PT and O_FT at every c_test (default 0 and 1). For pretraining also each
of the five families on operands a and b at c_test = 0. Every accuracy comes with its majority-class rate (always
answering the set's most common answer) and, for O_FT sets, ``follows_spurious``: the fraction of answers equal to
r(x, O_PT) + q — the signature of a model that learned the spurious rule instead of counting O_FT.
"""

from __future__ import annotations

import importlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from wrapperlab.tasks.registry import Task
from wrapperlab.tasks.task import Batch


@dataclass
class EvalSet:
    family: str
    operand: str
    c_test: float
    batch: Batch

    @property
    def key(self) -> str:
        return f"{self.family}/{self.operand}/c{self.c_test:g}"


def build_eval_sets(task: Task, family: str, c_tests: list[float], n: int, seed: int,
                    all_families: bool = False) -> list[EvalSet]:
    """The task's evaluation sets (``task.eval_specs``), each drawn from its own seeded stream."""
    specs = task.eval_specs(family, c_tests, all_families)
    sets = []
    for fam, op, c in specs:
        rng = np.random.default_rng([seed, zlib.crc32(f"{fam}/{op}/{c:g}".encode())])
        b = task.sample(n, rng, family=fam, operand=op, c=c)
        sets.append(EvalSet(fam, op or "_", c, b))
    return sets


@torch.no_grad()
def predict(model: torch.nn.Module, task, tokens: np.ndarray, device: str = "cpu",
            batch_size: int = 512) -> np.ndarray:
    """Argmax class the model predicts for the answer slot (PCFG: from the ART position; Tracr: the readout)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, tokens.shape[0], batch_size):
        x = torch.from_numpy(task.answer_inputs(tokens[i : i + batch_size])).to(device)
        out.append(model(x, positions=task.readout).argmax(-1).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


def majority_rate(answers: np.ndarray) -> float:
    _, counts = np.unique(answers, return_counts=True)
    return float(counts.max() / answers.shape[0])


def evaluate_sets(model: torch.nn.Module, task: Task, sets: list[EvalSet], device: str = "cpu") -> list[dict]:
    rows = []
    cfg = task.config
    for s in sets:
        b = s.batch
        pred = predict(model, task, b.tokens, device)
        row = {"family": s.family, "operand": s.operand, "c_test": s.c_test,
               "acc": float((pred == b.answer).mean()), "majority": majority_rate(b.answer), "n": len(b)}
        if s.operand == cfg.o_ft and s.family in task.spurious_families:
            spur, ok = task.spurious_answer(b)
            row["follows_spurious"] = float(((pred == spur) & ok).mean())
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- evaluators by task kind
class Evaluator:
    """What a stage measures at each evaluation: ``evaluator(model, step) -> rows`` and a one-line summary;
    ``stoppable`` ones also name the ``headline`` row that ``eval.stop_margin`` reads."""

    stoppable = False

    def __call__(self, model: torch.nn.Module, step: int) -> list[dict]:
        raise NotImplementedError

    def line(self, step: int, rows: list[dict]) -> str:
        return f"step {step:>6}: " + " | ".join(str(r) for r in rows)

    def headline(self, rows: list[dict]) -> dict | None:
        """The row ``eval.stop_margin`` reads (an ``acc`` and its ``majority``); None: these rows have none."""
        return None


class AccuracyEvaluator(Evaluator):
    """Accuracy on the task's fixed, seeded evaluation sets (PCFG and Tracr tasks)."""

    stoppable = True

    def __init__(self, cfg, task: Task):
        self.task, self.device = task, cfg.device
        self.family, self.c0 = cfg.eval_family, cfg.eval.c_test[0] if cfg.eval.c_test else None
        self.sets = build_eval_sets(task, cfg.eval_family, cfg.eval.c_test, cfg.eval.n, cfg.eval.seed,
                                    cfg.report_all_families)

    def __call__(self, model: torch.nn.Module, step: int) -> list[dict]:
        return evaluate_sets(model, self.task, self.sets, self.device)

    def headline(self, rows: list[dict]) -> dict | None:
        o_pt = getattr(self.task.config, "o_pt", None)
        return next((r for r in rows if r["family"] == self.family and r["c_test"] == self.c0
                     and (o_pt is None or r["operand"] == o_pt)), None)

    def line(self, step: int, rows: list[dict]) -> str:
        o_pt, o_ft = self.task.config.o_pt, self.task.config.o_ft
        parts = [f"{r['family'][:5]}/{r['operand']}/c{r['c_test']:g} {100 * r['acc']:.1f}% "
                 f"(maj {100 * r['majority']:.0f}%)" for r in rows[:4]]
        more = f" +{len(rows) - 4} sets" if len(rows) > 4 else ""
        return f"step {step:>6}: " + " | ".join(parts) + more + f"  [O_PT={o_pt}, O_FT={o_ft}]"


EVALUATIONS: dict[str, Callable] = {"accuracy": AccuracyEvaluator}
# modules that register further evaluations on import
EVALUATION_MODULES = ("wrapperlab.training.generation", "wrapperlab.training.capability_eval")


def evaluator_class(task_kind: str) -> type[Evaluator]:
    """The evaluator class a task kind names (``TaskKind.evaluation``)."""
    from wrapperlab.tasks.registry import get_task_kind

    name = get_task_kind(task_kind).evaluation
    if name not in EVALUATIONS:
        for mod in EVALUATION_MODULES:
            importlib.import_module(mod)
    return EVALUATIONS[name]


def make_evaluator(cfg, task: Task) -> Evaluator:
    return evaluator_class(cfg.task.kind)(cfg, task)
