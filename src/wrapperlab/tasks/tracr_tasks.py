"""Data for the Tracr programs (paper App. B.1, C.1): Counter and Max-identifier, with the spurious correlation
r(x, O_FT) - r(x, O_PT) = q.

Choices where the paper is silent, written down here and in docs/tracr.md:

- **Lengths.** Counter inputs are 44 letters a–i drawn uniformly with replacement (BOS + 44 = the 45 positions
  of the paper's attention maps). Max-identifier inputs are 10 distinct letters from a–z. Every input has the
  same length and no padding: a compiled model has no padding mask, so a pad token would be read as a token.
- **Readout.** Both programs write their answer at RASP index 1, i.e. sequence position 2 (BOS is position 0).
  The loss is cross-entropy of the output scores at that position (the paper does not state it; inferred).
- **Operands.** Counter: the letter counted (O_PT = a, O_FT = b). Max-identifier: the rank k of the k-th
  largest letter, "largest" meaning alphabetically first (O_PT = 5; O_FT = 6, i.e. q = 1 — the paper does not
  state O_FT).
- **Spurious correlation.** A correlated sample is drawn from the natural distribution *conditioned on*
  r(x, O_FT) - r(x, O_PT) = q (rejection sampling): for Counter count(b) = count(a) + q; for Max-identifier the
  O_FT-th largest letter is q letters after the O_PT-th largest (paper App. B.1: with q = 1, if the 5th largest
  is a the target is b). q = 1 for both (the paper states q only for PCFG). C_Te = 0 is the natural distribution.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from wrapperlab.tasks.registry import TaskKind, operand_eval_specs, register
from wrapperlab.tasks.task import Batch
from wrapperlab.tasks.tracr_programs import BOS, PAD, TracrMeta, program_meta

READOUT = 2  # sequence position of RASP index 1


class TracrTaskConfig(BaseModel):
    """A fine-tuning task on a shipped compiled program (paper App. B.1, C.1)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["tracr"] = "tracr"
    program: Literal["counter", "max-identifier"] = "counter"
    o_pt: str | None = Field(None, description="counter: a letter (default a); max-identifier: a rank (default 5)")
    o_ft: str | None = Field(None, description="counter: a letter (default b); max-identifier: a rank (default 6)")
    q: int = Field(1, description="spurious offset r(x, O_FT) - r(x, O_PT)")
    init_noise: float = Field(1e-4, ge=0, description="std of the Gaussian noise added to every compiled weight "
                              "before fine-tuning (paper: N(0, 0.001); see docs/tracr.md for why 1e-4)")
    balance: bool = Field(True, description="rebalance the compiled weights (same function) before the noise")

    @model_validator(mode="after")
    def _check(self) -> TracrTaskConfig:
        defaults = {"counter": ("a", "b"), "max-identifier": ("5", "6")}[self.program]
        if self.o_pt is None:
            self.o_pt = defaults[0]
        if self.o_ft is None:
            self.o_ft = defaults[1]
        for name in ("o_pt", "o_ft"):
            _check_operand(self.program, getattr(self, name), name)
        if self.o_pt == self.o_ft:
            raise ValueError("o_pt and o_ft must differ")
        return self

    @field_validator("q")
    @classmethod
    def _q(cls, v: int) -> int:
        if v == 0 or abs(v) > 8:
            raise ValueError("q must be a non-zero integer with |q| <= 8")
        return v

    @property
    def seq_len(self) -> int:
        return program_meta(self.program).max_seq_len + 1


def _check_operand(program: str, op: str, name: str) -> None:
    if program == "counter":
        if op not in LETTERS9:
            raise ValueError(f"{name}: counter operands are letters a-i, got {op!r}")
    elif not (op.isdigit() and 1 <= int(op) <= MAX_LEN):
        raise ValueError(f"{name}: max-identifier operands are ranks 1-{MAX_LEN}, got {op!r}")


LETTERS9 = "abcdefghi"
COUNTER_LEN, MAX_LEN = 44, 10


class TracrVocab:
    """Input tokens (tracr's encoder ids) and output classes of a compiled program."""

    def __init__(self, meta: TracrMeta):
        self.tokens = [str(v) for v in meta.input_vocab]
        self.outputs = [str(v) for v in meta.output_vocab]
        self._ids = {t: i for i, t in enumerate(self.tokens)}
        self._out = {t: i for i, t in enumerate(self.outputs)}
        self.pad_id, self.bos_id = self._ids[PAD], self._ids[BOS]

    def __len__(self) -> int:
        return len(self.tokens)

    def id(self, tok: str) -> int:
        return self._ids[tok]

    def out_id(self, value) -> int:
        return self._out[str(value)]

    def decode(self, ids) -> list[str]:
        return [self.tokens[int(i)] for i in ids]


class TracrTask:
    """Seeded generator of (tokens, answer) batches for a compiled program; same ``sample`` contract and
    ``Batch`` as ``PCFGTask`` (``family`` is the program name, ``answer`` an output class id)."""

    readout = readout_pos = READOUT

    def __init__(self, config: TracrTaskConfig | None = None):
        self.config = config or TracrTaskConfig()
        self.meta: TracrMeta = program_meta(self.config.program)
        self.vocab = TracrVocab(self.meta)
        self.family = self.config.program
        self.spurious_families = (self.family,)
        self._letter_ids = np.array([self.vocab.id(c) for c in "abcdefghijklmnopqrstuvwxyz"
                                     if c in self.vocab._ids])

    @property
    def seq_len(self) -> int:
        return self.meta.max_seq_len + 1

    @property
    def output_names(self) -> list[str]:
        return self.vocab.outputs

    def answer_inputs(self, tokens):
        return tokens  # non-causal: the model sees the whole input

    # ------------------------------------------------------------------ rules
    def rule(self, letters: np.ndarray, operand: str) -> np.ndarray:
        """r(x, O) on letter indices (0 = a): the count of letter O, or the letter index of the O-th largest."""
        if self.config.program == "counter":
            return (letters == LETTERS9.index(operand)).sum(1)
        return np.sort(letters, axis=1)[:, int(operand) - 1]

    def _draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.config.program == "counter":
            return rng.integers(0, len(LETTERS9), size=(n, COUNTER_LEN))
        return np.argsort(rng.random((n, 26)), axis=1)[:, :MAX_LEN]  # 10 distinct letters, random order

    def _correlated(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        c = self.config
        out, got, tries = [], 0, 0
        while got < n:
            x = self._draw(max(4 * (n - got), 64), rng)
            tries += x.shape[0]
            keep = x[self.rule(x, c.o_ft) - self.rule(x, c.o_pt) == c.q]
            out.append(keep[: n - got])
            got += out[-1].shape[0]
            if tries > 10_000 * max(n, 1) and got == 0:
                raise RuntimeError(f"no input satisfies r(x, {c.o_ft}) - r(x, {c.o_pt}) = {c.q}; check q")
        return np.concatenate(out)[:n], tries - n

    # ------------------------------------------------------------------ batches
    def sample(self, n: int, rng: np.random.Generator, family: str | None = None, operand: str | None = None,
               c: float = 0.0, keep_source: bool = False) -> Batch:
        """n samples for ``operand`` (default O_FT); a fraction ``c`` (each sample independently) is drawn from
        the correlated distribution."""
        cfg = self.config
        if not 0.0 <= c <= 1.0:
            raise ValueError(f"spurious rate must be in [0, 1], got {c}")
        if family not in (None, self.family):
            raise ValueError(f"unknown family {family!r} for the {self.family} task")
        operand = operand or cfg.o_ft
        _check_operand(cfg.program, operand, "operand")
        letters = self._draw(n, rng)
        spurious = rng.random(n) < c if c > 0 else np.zeros(n, dtype=bool)
        rejected = 0
        if spurious.any():
            letters[spurious], rejected = self._correlated(int(spurious.sum()), rng)
        value, value_pt = self.rule(letters, operand), self.rule(letters, cfg.o_pt)
        if cfg.program == "counter":
            answer = np.array([self.vocab.out_id(v) for v in value])
        else:
            answer = np.array([self.vocab.out_id(chr(97 + v)) for v in value])
        ids = self._letter_ids[letters]
        tokens = np.concatenate([np.full((n, 1), self.vocab.bos_id), ids], axis=1).astype(np.int64)
        return Batch(tokens, answer.astype(np.int64), value.astype(np.int64), value_pt.astype(np.int64),
                     [self.family] * n, [operand] * n, np.zeros(n, dtype=np.int64), spurious,
                     np.zeros(n, dtype=np.int64), text=letters if keep_source else None, rejected=rejected)

    def eval_specs(self, family: str, c_tests: list[float], all_families: bool) -> list[tuple[str, str | None, float]]:
        return operand_eval_specs(self, family, c_tests)  # one family: the program

    def probe_targets(self) -> dict[str, str]:
        return {"O_PT": self.config.o_pt, "O_FT": self.config.o_ft}

    def attach(self, run_dir, parent_dir, seed: int, stage: str = "pretrain") -> None:
        """Nothing to bind: the task is a pure function of its config."""

    def spurious_answer(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """(answer id of r(x, O_PT) + q, whether that value exists) — what a model that learned the spurious rule
        answers."""
        target = batch.value_pt + self.config.q
        if self.config.program == "counter":
            ok = (target >= 0) & (target <= COUNTER_LEN)
            ids = [self.vocab.out_id(int(v)) if k else 0 for v, k in zip(target, ok)]
        else:
            ok = (target >= 0) & (target < 26)
            ids = [self.vocab.out_id(chr(97 + int(v))) if k else 0 for v, k in zip(target, ok)]
        return np.array(ids, dtype=np.int64), ok


def _check_run(stage: str, parent: str | None, train, ev, task: TracrTaskConfig) -> None:
    """Tracr runs (paper App. C.1): the compiled program is the pretrained model, so a finetune without a parent
    starts from it; there is no pretrain stage, and the loss is on the answer only."""
    prog = task.program
    if stage == "pretrain":
        raise ValueError("stage: a Tracr task has no pretrain stage (the compiled program is the pretrained "
                         "model); use finetune")
    if stage in ("reft", "scratch+ft") and not parent:
        raise ValueError(f"parent: {stage} needs parent=RUN_DIR")
    for name, fam in (("train.family", train.family), ("eval.family", ev.family)):
        if fam not in (None, prog):
            raise ValueError(f"{name}: the {prog} task has no family {fam!r}")
    if train.loss != "answer":
        raise ValueError("train.loss: Tracr programs are trained on the answer only (loss=answer)")
    if train.operand is not None:
        _check_operand(prog, train.operand, "train.operand")


KIND = register(TaskKind("tracr", TracrTaskConfig, TracrTask, _check_run, lambda cfg: cfg.program,
                         ("q", "o_pt", "o_ft"), "a compiled Tracr program (Counter, Max-identifier)"))
