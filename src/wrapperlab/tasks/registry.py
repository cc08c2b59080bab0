"""The task contract: every task kind registers its config, how to build it, and the rules its runs follow.

A task (``PCFGTask``, ``TracrTask``, or one of yours) is what training, evaluation and the analyses read from:

- ``config`` — its pydantic config, with a ``kind`` literal and the operands ``o_pt`` (the pretraining capability's
  operand) and ``o_ft`` (the fine-tuning one);
- ``vocab`` (``len``, ``pad_id``, ``tokens``, ``decode``), ``seq_len``, ``output_names`` (the answer classes);
- ``sample(n, rng, family=None, operand=None, c=0.0, keep_source=False) -> Batch`` — a seeded batch; ``c`` is the
  rate of the spurious correlation r(x, O_FT) − r(x, O_PT) = q;
- ``answer_inputs(tokens)`` and ``readout`` (where the answer is read in the model's output on them),
  ``readout_pos`` (the absolute position of the answer's readout: the probes read the residual stream there);
- ``spurious_families`` and ``spurious_answer(batch)`` — where the correlation exists and what a model that
  learned the spurious rule answers;
- ``eval_specs(family, c_tests, all_families)`` — the (family, operand, c_test) evaluation sets of a run;
- ``probe_targets()`` — target name -> operand (``{"O_PT": o_pt, "O_FT": o_ft}``);
- ``attach(run_dir, parent_dir, seed, stage)`` — bind the task to a run directory (a story task keeps its
  tokenizer there; the others need nothing).

A kind registers with :func:`register`; :data:`BUILTIN` lists the modules imported on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel

from wrapperlab.registry import Registry

BUILTIN = ("wrapperlab.tasks.task", "wrapperlab.tasks.tracr_tasks", "wrapperlab.tasks.story_task",
           "wrapperlab.tasks.capability")


class Task(Protocol):
    config: Any
    vocab: Any
    seq_len: int
    readout: int
    readout_pos: int
    spurious_families: tuple[str, ...]

    @property
    def output_names(self) -> list[str]: ...

    def sample(self, n: int, rng: np.random.Generator, family: str | None = None, operand: str | None = None,
               c: float = 0.0, keep_source: bool = False): ...

    def answer_inputs(self, tokens): ...

    def spurious_answer(self, batch) -> tuple[np.ndarray, np.ndarray]: ...

    def eval_specs(self, family: str, c_tests: list[float], all_families: bool) -> list[tuple[str, str | None, float]]:
        ...

    def probe_targets(self) -> dict[str, str]: ...

    def attach(self, run_dir, parent_dir, seed: int, stage: str = "pretrain") -> None: ...


PARENT_STAGES = {"finetune": ("pretrain",), "reft": ("finetune",), "scratch+ft": ("scratch",)}


@dataclass(frozen=True)
class TaskKind:
    """A registered task kind. ``check_run(stage, parent, train, eval, task_config)`` raises ``ValueError`` (a one-line
    message naming the field) for a run this kind cannot have; ``default_family(task_config)`` is the family a
    single-task stage trains and evaluates when none is given (None: the task has no families);
    ``inherited_keys`` are the task keys a stage that starts from a trained model may still change (the others must
    match the weights); ``parent_stages`` which stage each child stage starts from."""

    name: str
    config: type[BaseModel]
    build: Callable[[BaseModel], Task]
    check_run: Callable[[str, str | None, Any, Any, BaseModel], None]
    default_family: Callable[[BaseModel], str | None]
    inherited_keys: tuple[str, ...] = ()
    description: str = ""
    parent_stages: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(PARENT_STAGES))
    reft_below_parent: bool = True  # the paper's rule for PCFG and Tracr (App. D): reFT LR < the fine-tuning LR
    evaluation: str = "accuracy"  # how training evaluates it (training.evaluation's registry)
    wrong_answers: bool = False  # sample() takes answer_operand (randFT, paper App. E.4)
    pt_mix: bool = False  # sample() with no family/operand draws the pretraining distribution (paper App. E.1)
    check_child: Callable[[BaseModel, BaseModel], None] | None = None  # (parent task, child task): ValueError if
    # the child changed an inheritable key in a way the parent's weights cannot follow


KINDS: Registry[TaskKind] = Registry("task kind", BUILTIN, group="wrapperlab.task_kinds")
register, task_kinds, get_task_kind = KINDS.register, KINDS.all, KINDS.get


def build_task(config: BaseModel) -> Task:
    return get_task_kind(config.kind).build(config)


def operand_eval_specs(task: Task, family: str, c_tests: list[float]) -> list[tuple[str, str | None, float]]:
    """O_PT and O_FT of ``family`` at every c_test (c_test > 0 only where the spurious correlation exists)."""
    cfg = task.config
    return [(family, op, c) for op in (cfg.o_pt, cfg.o_ft) for c in c_tests
            if c == 0 or family in task.spurious_families]
