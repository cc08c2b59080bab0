"""Procedural tasks: the PCFG grammar and sampler, the five task families, operand priors, spurious edits."""

from wrapperlab.tasks.families import FAMILIES, Family
from wrapperlab.tasks.pcfg import PAPER_GRAMMAR, Grammar, PCFGSampler
from wrapperlab.tasks.priors import PRIORS, resolve_prior
from wrapperlab.tasks.registry import Task, TaskKind, build_task, get_task_kind, register, task_kinds
from wrapperlab.tasks.task import Batch, PCFGTask, TaskConfig
from wrapperlab.tasks.vocab import Vocab

__all__ = [
    "Task",
    "TaskKind",
    "build_task",
    "get_task_kind",
    "register",
    "task_kinds",
    "FAMILIES",
    "PAPER_GRAMMAR",
    "PRIORS",
    "Batch",
    "Family",
    "Grammar",
    "PCFGSampler",
    "PCFGTask",
    "TaskConfig",
    "Vocab",
    "resolve_prior",
]
