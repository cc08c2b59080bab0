"""A PCFG task: configuration plus a seeded generator of (token sequence, answer) batches.

Sequence layout, paper App. B.2, eq. (1):  SOS T O O' SOT Txt EOT ART Ans EOS,  length window + 9
(259 for the paper's 250-token window — the paper's "~260-token sequences").

Strings shorter than the window (≈24 % of the paper grammar's strings at window 250; the paper does not say
what it does with them) are **kept whole and left-padded**: the PAD tokens go before SOS, so every sequence has
the same length, the answer sits at the same position in every row, and no grammar token is invented or thrown away.
All five families count positions backwards from EOT, so their answers are well defined on a short string as
long as it is at least O' long (the paper grammar's shortest string has 161 tokens). ``short_strings="reject"``
instead redraws strings until they fill the window (this biases the data toward long derivations).
Full-LM loss never predicts PAD or predicts from PAD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from wrapperlab.tasks.families import FAMILIES, JAILBREAK_FAMILIES, get_family
from wrapperlab.tasks.pcfg import PAPER_GRAMMAR, PCFGSampler
from wrapperlab.tasks.priors import resolve_prior
from wrapperlab.tasks.registry import TaskKind, operand_eval_specs, register
from wrapperlab.tasks.spurious import SPURIOUS_FAMILIES, edit_count, edit_index
from wrapperlab.tasks.vocab import ART, EOT, NULL, PAD, SOS, SOT, Vocab

TERMINALS = PAPER_GRAMMAR.terminals  # ("a", "b", "c")
PREFIX_LEN, SUFFIX_LEN = 5, 4


class TaskConfig(BaseModel):
    """Knobs of the PCFG task. Paper values are the defaults (paper §5, App. B.2, C.2)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["pcfg"] = "pcfg"

    window: int = Field(250, ge=2, le=4096, description="tokens of each string shown to the model")
    o2: dict[str, int] = Field(
        default_factory=lambda: {n: f.default_o2 for n, f in FAMILIES.items()},
        description="O' per family (paper: 40 for count/token-value, 6 for index)",
    )
    prior: str = Field("low", description="operand prior: low | medium-low | medium | medium-high | high | 'pa,pb,pc'")
    families: dict[str, float] = Field(
        default_factory=lambda: {n: 1.0 for n in FAMILIES}, description="pretraining family mix (weights)"
    )
    o_pt: Literal["a", "b", "c"] = "a"
    o_ft: Literal["a", "b", "c"] = "b"
    q: int = Field(1, description="spurious offset r(x, O_FT) - r(x, O_PT)")
    short_strings: Literal["pad", "reject"] = "pad"
    max_depth: int = Field(64, ge=1)
    max_length: int = Field(4096, ge=1)

    @field_validator("prior")
    @classmethod
    def _prior(cls, v: str) -> str:
        resolve_prior(v)
        return v

    @field_validator("o2")
    @classmethod
    def _o2(cls, v: dict[str, int]) -> dict[str, int]:
        merged = {n: f.default_o2 for n, f in FAMILIES.items()} | dict(v)
        for name in merged:
            get_family(name)
        return merged

    @field_validator("families")
    @classmethod
    def _families(cls, v: dict[str, float]) -> dict[str, float]:
        for name, w in v.items():
            get_family(name)
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"family weight for {name} must be a finite number >= 0, got {w}")
        if sum(v.values()) <= 0:
            raise ValueError("family weights must not all be zero")
        return v

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        for name, o2 in self.o2.items():
            get_family(name).check_o2(o2, self.window)
        if self.o_pt == self.o_ft:
            raise ValueError("o_pt and o_ft must differ")
        if abs(self.q) > self.o2["count"]:
            raise ValueError(f"|q| = {abs(self.q)} cannot exceed o2 of count ({self.o2['count']})")
        return self

    @property
    def seq_len(self) -> int:
        return self.window + PREFIX_LEN + SUFFIX_LEN

    @property
    def max_number(self) -> int:
        return max([self.window] + list(self.o2.values()))

    @property
    def jailbreak_families(self) -> tuple[str, ...]:
        """The jailbreak task tokens this task's mix names (App. E.2); they are in its vocabulary, at any weight."""
        return tuple(f for f in JAILBREAK_FAMILIES if f in self.families)

    def o2_of(self, family: str) -> int:
        """O' of a family; a jailbreak family shares the O' of the family it computes."""
        return self.o2[family] if family in self.o2 else self.o2[get_family(family).base]


@dataclass
class Batch:
    tokens: np.ndarray  # (n, L) int64 token ids
    answer: np.ndarray  # (n,) token id of the answer
    value: np.ndarray  # (n,) raw answer (number, or terminal index for token-value)
    value_pt: np.ndarray  # (n,) the same family's answer for operand O_PT (for the spurious-rule check)
    family: list[str]
    operand: list[str]
    o2: np.ndarray
    spurious: np.ndarray  # (n,) bool: this sample was made to satisfy the relation
    n_edits: np.ndarray  # (n,) substitutions made by the spurious edit
    source: list[np.ndarray] | None = None  # full sampled strings (terminal indices), before windowing/edits
    text: np.ndarray | None = None  # (n, W) windows after edits (-1 = no token)
    rejected: int = 0  # strings redrawn because no spurious edit existed
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def concat(self, other: Batch) -> Batch:
        """This batch followed by ``other`` (same sequence length); sources and texts only when both carry them."""
        def cat(a, b):
            return None if a is None or b is None else (a + b if isinstance(a, list) else np.concatenate([a, b]))

        fields = ("tokens", "answer", "value", "value_pt", "family", "operand", "o2", "spurious", "n_edits", "source",
                  "text")
        return Batch(*(cat(getattr(self, f), getattr(other, f)) for f in fields),
                     rejected=self.rejected + other.rejected, extra={**self.extra, **other.extra})


class PCFGTask:
    def __init__(self, config: TaskConfig | None = None):
        self.config = config or TaskConfig()
        c = self.config
        self.vocab = Vocab.build(c.max_number, TERMINALS, c.jailbreak_families)
        self.sampler = PCFGSampler(PAPER_GRAMMAR, c.max_depth, c.max_length)
        self.prior = np.array(resolve_prior(c.prior))
        names = [n for n, w in c.families.items() if w > 0]
        w = np.array([c.families[n] for n in names], dtype=float)
        self.mix_names, self.mix_p = names, w / w.sum()
        self.t = {t: i for i, t in enumerate(TERMINALS)}
        v = self.vocab
        self._sos, self._sot, self._eot, self._art, self._pad = (v.id(x) for x in (SOS, SOT, EOT, ART, PAD))
        self._null = v.id(NULL)
        self._term_ids = np.array([v.id(t) for t in TERMINALS])

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    @property
    def answer_pos(self) -> int:
        """Index of the answer token; the model predicts it from position ``answer_pos - 1`` (ART)."""
        return self.seq_len - 2

    # The task protocol shared with TracrTask: what the model sees, where its answer is read, which classes.
    readout = -1  # logits position of the answer within ``answer_inputs(tokens)`` (ART = the last input)

    @property
    def readout_pos(self) -> int:
        """Absolute position (in full sequences) whose output is the answer: ART."""
        return self.answer_pos - 1
    spurious_families = SPURIOUS_FAMILIES

    def answer_inputs(self, tokens):
        """The part of full sequences the model reads to answer (causal: everything before the answer)."""
        return tokens[:, : self.answer_pos]

    @property
    def output_names(self) -> list[str]:
        return self.vocab.tokens

    def eval_specs(self, family: str, c_tests: list[float], all_families: bool) -> list[tuple[str, str | None, float]]:
        """O_PT/O_FT of ``family`` at every c_test; with ``all_families`` also each family at c_test = 0 (the
        pretraining columns of the paper's tables)."""
        cfg = self.config
        specs = operand_eval_specs(self, family, c_tests)
        if all_families:
            for fam, f in FAMILIES.items():
                for op in ((cfg.o_pt, cfg.o_ft) if f.uses_operand else (None,)):
                    if (fam, op, 0.0) not in specs:
                        specs.append((fam, op, 0.0))
            for fam in cfg.jailbreak_families:  # asked only about O_PT in pretraining: that is the test
                if (fam, cfg.o_pt, 0.0) not in specs:
                    specs.append((fam, cfg.o_pt, 0.0))
        return specs

    def probe_targets(self) -> dict[str, str]:
        return {"O_PT": self.config.o_pt, "O_FT": self.config.o_ft}

    def attach(self, run_dir, parent_dir, seed: int, stage: str = "pretrain") -> None:
        """Nothing to bind: the task is a pure function of its config."""

    def spurious_answer(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """(answer id of r(x, O_PT) + q, whether that number is in the vocabulary)."""
        target = batch.value_pt + self.config.q
        ok = (target >= 0) & (target <= self.config.max_number)
        return np.where(ok, target, 0) + self.vocab.id("0"), ok

    # ---------------------------------------------------------------- strings
    def _strings(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if self.config.short_strings == "pad":
            return self.sampler.sample(n, rng)
        flats, lens, got = [], [], 0
        for _ in range(1000):
            if got >= n:
                break
            flat, ln = self.sampler.sample(max(n - got, 8), rng)
            offs = np.cumsum(ln) - ln
            keep = np.flatnonzero(ln >= self.config.window)[: n - got]
            for i in keep:
                flats.append(flat[offs[i] : offs[i] + ln[i]])
            lens.append(ln[keep])
            got += keep.size
        else:
            raise RuntimeError(f"short_strings='reject': only {got} of {n} strings reached the window of "
                               f"{self.config.window} tokens after 1000 rounds; use a smaller window or 'pad'")
        return np.concatenate(flats), np.concatenate(lens)

    def _windows(self, flat: np.ndarray, lens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        w = self.config.window
        offs = np.cumsum(lens) - lens
        m = np.minimum(lens, w)
        start = np.floor(rng.random(lens.shape[0]) * (np.maximum(lens - w, 0) + 1)).astype(np.int64)
        j = np.arange(w)[None, :]
        src = offs[:, None] + start[:, None] + j - (w - m)[:, None]
        valid = j >= (w - m)[:, None]
        return np.where(valid, flat[np.clip(src, 0, flat.shape[0] - 1)], -1).astype(np.int8)

    def draw_text(self, n: int, rng: np.random.Generator, keep_source: bool = False):
        flat, lens = self._strings(n, rng)
        text = self._windows(flat, lens, rng)
        source = None
        if keep_source:
            offs = np.cumsum(lens) - lens
            source = [flat[o : o + ln] for o, ln in zip(offs, lens)]
        return text, source

    # ---------------------------------------------------------------- batches
    def sample(
        self,
        n: int,
        rng: np.random.Generator,
        family: str | None = None,
        operand: str | None = None,
        c: float = 0.0,
        keep_source: bool = False,
        answer_operand: str | None = None,
    ) -> Batch:
        """n samples. ``family``/``operand`` None = drawn from the family mix / operand prior.
        ``c`` = probability that a sample is edited to satisfy r(x, O_FT) - r(x, O_PT) = q. ``answer_operand``
        (randFT, paper App. E.4): every answer is the one for that operand, whatever operand the input asks about."""
        cfg = self.config
        if not 0.0 <= c <= 1.0:
            raise ValueError(f"spurious rate must be in [0, 1], got {c}")
        if family is None:
            fams = [self.mix_names[i] for i in rng.choice(len(self.mix_names), size=n, p=self.mix_p)]
        else:
            get_family(family)
            if family in JAILBREAK_FAMILIES and family not in cfg.jailbreak_families:
                raise ValueError(f"family {family} is a jailbreak token (App. E.2) this task's vocabulary lacks; "
                                 f"name it in task.families")
            fams = [family] * n
        if c > 0 and any(f not in SPURIOUS_FAMILIES for f in set(fams)):
            raise ValueError(f"a spurious correlation is defined only for {', '.join(SPURIOUS_FAMILIES)}")
        for name, op in (("operand", operand), ("answer_operand", answer_operand)):
            if op is not None and op not in self.t:
                raise ValueError(f"unknown {name} {op!r}; choose from {', '.join(TERMINALS)}")
        drawn = rng.choice(len(TERMINALS), size=n, p=self.prior)
        ops = []
        for i, f in enumerate(fams):
            fobj = get_family(f)
            if not fobj.uses_operand:
                ops.append(NULL)
            elif operand is None and fobj.o_pt_only:  # T_J1/T_J2 only ever ask about O_PT (App. E.2)
                ops.append(cfg.o_pt)
            else:
                ops.append(operand if operand is not None else TERMINALS[drawn[i]])

        text, source = self.draw_text(n, rng, keep_source)
        spurious = rng.random(n) < c if c > 0 else np.zeros(n, dtype=bool)
        n_edits = np.zeros(n, dtype=np.int64)
        rejected = 0
        o_pt, o_ft = self.t[cfg.o_pt], self.t[cfg.o_ft]
        other = next(i for i in range(len(TERMINALS)) if i not in (o_pt, o_ft))
        for i in np.flatnonzero(spurious):
            fam = fams[i]
            for _ in range(1000):
                if fam == "count":
                    new = edit_count(text[i], o_pt, o_ft, other, cfg.q, cfg.o2["count"], rng)
                else:
                    new = edit_index(text[i], o_pt, o_ft, other, cfg.q, cfg.o2[fam], rng)
                if new is not None:
                    break
                rejected += 1
                t1, s1 = self.draw_text(1, rng, keep_source)
                text[i] = t1[0]
                if keep_source:
                    source[i] = s1[0]
            else:
                raise RuntimeError("no spurious edit found after 1000 redraws; check q and o2")
            n_edits[i] = int((new != text[i]).sum())
            text[i] = new

        value = np.zeros(n, dtype=np.int64)
        value_pt = np.zeros(n, dtype=np.int64)
        o2 = np.zeros(n, dtype=np.int64)
        answer = np.zeros(n, dtype=np.int64)
        fam_arr = np.array(fams)
        op_arr = np.array(ops)
        op_tok = np.zeros(n, dtype=np.int64)
        for fam in set(fams):
            fobj = get_family(fam)
            k = cfg.o2_of(fam)
            rows = np.flatnonzero(fam_arr == fam)
            o2[rows] = k
            if fobj.uses_operand:
                value_pt[rows] = fobj.answers(text[rows], o_pt, k)
                for op in set(op_arr[rows]):
                    sub = rows[op_arr[rows] == op]
                    value[sub] = fobj.answers(text[sub], self.t[answer_operand or op], k)
                    op_tok[sub] = self.vocab.id(op)
                answer[rows] = self.vocab.number_ids(value[rows])
            else:
                value[rows] = fobj.answers(text[rows], -1, k)
                value_pt[rows] = value[rows]
                op_tok[rows] = self._null
                answer[rows] = np.where(value[rows] >= 0, self._term_ids[np.clip(value[rows], 0, None)], self._null)

        fam_tok = np.array([self.vocab.id(Vocab.family_token(f)) for f in fams], dtype=np.int64)
        tokens = self._assemble(text, fam_tok, op_tok, self.vocab.number_ids(o2), answer)
        return Batch(tokens, answer, value, value_pt, fams, ops, o2, spurious, n_edits,
                     source, text if keep_source else None, rejected)

    def _assemble(self, text, fam_tok, op_tok, o2_tok, answer) -> np.ndarray:
        n = text.shape[0]
        text_ids = np.where(text >= 0, self._term_ids[np.clip(text, 0, None)], self._pad)

        def col(v) -> np.ndarray:
            return np.broadcast_to(np.asarray(v, dtype=np.int64).reshape(-1, 1), (n, 1))

        seq = np.concatenate(
            [col(self._sos), col(fam_tok), col(op_tok), col(o2_tok), col(self._sot), text_ids,
             col(self._eot), col(self._art), col(answer), col(self._sos)], axis=1,
        )
        if (text < 0).any():  # move PAD to the far left, keeping the order of everything else
            order = np.argsort(seq != self._pad, axis=1, kind="stable")
            seq = np.take_along_axis(seq, order, axis=1)
        return seq


def _check_run(stage: str, parent: str | None, train, ev, task: TaskConfig) -> None:
    """The rules of PCFG runs (paper §4, App. C.2): a known family and operand; fine-tuning and reFT start from a
    trained run, pretraining from scratch; a spurious correlation exists only for count and index-of-occurrence."""
    for name, fam in (("train.family", train.family), ("eval.family", ev.family)):
        if fam is not None:
            try:
                get_family(fam)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
    if train.operand is not None and train.operand not in TERMINALS:
        raise ValueError(f"train.operand: unknown operand {train.operand!r}; choose from {', '.join(TERMINALS)}")
    if stage in ("finetune", "reft", "scratch+ft") and not parent:
        need = {"finetune": "a finished pretrain run", "reft": "a finished finetune run",
                "scratch+ft": "a finished scratch run"}[stage]
        raise ValueError(f"parent: {stage} needs parent=RUN_DIR ({need})")
    if stage == "pretrain" and parent:
        raise ValueError("parent: pretrain starts from scratch; remove parent=")
    if train.answer_operand is not None:
        if train.answer_operand not in TERMINALS:
            raise ValueError(f"train.answer_operand: unknown operand {train.answer_operand!r}; choose from "
                             f"{', '.join(TERMINALS)}")
        if stage != "finetune" or train.c_train or (train.family is not None
                                                   and not get_family(train.family).uses_operand):
            raise ValueError("train.answer_operand: randFT is a finetune stage on one family that takes an operand, "
                             "without a spurious correlation (paper App. E.4)")
        if train.operand is not None and train.operand == train.answer_operand:
            raise ValueError("train.answer_operand: equal to train.operand, so the answers would be right")
    if train.c_train > 0 and train.family not in SPURIOUS_FAMILIES:
        raise ValueError(f"train.c_train: a spurious correlation needs train.family in {SPURIOUS_FAMILIES}")
    if train.pt_mix and stage != "finetune":
        raise ValueError(f"train.pt_mix: pretraining data are mixed into a finetune stage (paper App. E.1), not a "
                         f"{stage} stage")
    for name, fam in (("train.family", train.family), ("eval.family", ev.family)):
        if fam in JAILBREAK_FAMILIES and fam not in task.jailbreak_families:
            raise ValueError(f"{name}: {fam} is a jailbreak token (App. E.2) this task's vocabulary lacks; name it in "
                             f"task.families (and pretrain with it)")
    if train.pt_mix and (train.answer_operand is not None or task.jailbreak_families):
        raise ValueError("train.pt_mix: one appendix protocol per run (App. E.1 does not combine with randFT or the "
                         "jailbreak tokens)")


def _check_child(parent: TaskConfig, child: TaskConfig) -> None:
    """The jailbreak tokens size the vocabulary: a stage keeps its parent's (the family weights may change)."""
    if parent.jailbreak_families != child.jailbreak_families:
        raise ValueError(f"task.families: the jailbreak families size the vocabulary, so a stage keeps its "
                         f"parent's ({', '.join(parent.jailbreak_families) or 'none'}; got "
                         f"{', '.join(child.jailbreak_families) or 'none'})")


KIND = register(TaskKind("pcfg", TaskConfig, PCFGTask, _check_run, lambda cfg: "count",
                         ("q", "o_pt", "o_ft", "prior", "families"),
                         "the paper's PCFG: five counting/indexing families over a probabilistic grammar",
                         wrong_answers=True, pt_mix=True, check_child=_check_child))
