"""A capability given as data (``task.kind=capability``): a JSONL file of records ``{"prompt": str, "answer": str,
"label": optional}`` read with a model's tokenizer (a Hugging Face tokenizer directory, or a run's own word-level
vocabulary). The answer follows the prompt after one space unless either side has whitespace at the join
(:func:`joined`). As a task it trains any model on the records' answers: a batch is records of the training split,
right-padded (causal models never read the padding before an answer token), whose targets are the answer tokens
alone (``train.loss=masked``); the held-out split is what the ``capability`` evaluation scores. Relearning a
capability on a (fine-tuned, control) pair of models is a ``reft`` stage of this kind (paper §5: reverse
fine-tuning), through the one training loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from wrapperlab.tasks.registry import TaskKind, register
from wrapperlab.tasks.task import Batch


class CapabilityError(ValueError):
    """A capability file, tokenizer or model pair that cannot be used (one line naming what is wrong)."""


@dataclass(frozen=True)
class Record:
    prompt: str
    answer: str
    label: str | None = None
    line: int = 0


def read_records(path: str | Path) -> list[Record]:
    """The records of a capability JSONL file; a malformed line is an error naming its number."""
    p = Path(path)
    if not p.is_file():
        raise CapabilityError(f"--capability: {path} is not a file")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CapabilityError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("answer"),
                                                                                                  str):
            raise CapabilityError(f"{path}: line {n} needs string fields \"prompt\" and \"answer\"")
        label = rec.get("label")
        if label is not None and not isinstance(label, (str, int)):
            raise CapabilityError(f"{path}: line {n}: \"label\" must be a string or an integer")
        if not rec["answer"]:
            raise CapabilityError(f"{path}: line {n}: the answer is empty")
        out.append(Record(rec["prompt"], rec["answer"], None if label is None else str(label), n))
    if not out:
        raise CapabilityError(f"{path}: no records")
    return out


# ------------------------------------------------------------------------------------------------ tokenizers
class WordTokenizer:
    """A run's own vocabulary: text is split on whitespace and every piece must be a token."""

    def __init__(self, tokens: tuple[str, ...] | list[str]):
        self.tokens = tuple(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in text.split():
            if piece not in self.index:
                raise KeyError(piece)
            ids.append(self.index[piece])
        return ids

    def decode(self, ids) -> str:
        return " ".join(self.tokens[i] for i in ids)

    def identity(self) -> tuple:
        return ("word", self.tokens)


class HFTokenizer:
    """A Hugging Face tokenizer from a local model directory (no special tokens are added to the text)."""

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        self.path = str(path)
        cfg = Path(path) / "tokenizer_config.json"
        named = json.loads(cfg.read_text()).get("tokenizer_class") if cfg.is_file() else None
        # a plain tokenizer.json (as wrapperlab writes) is read as it is; AutoTokenizer would rebuild it as the
        # model type's own tokenizer class (a Qwen2 directory's, say), which can drop its vocabulary
        cls = PreTrainedTokenizerFast if named == "PreTrainedTokenizerFast" else AutoTokenizer
        self.tok = cls.from_pretrained(self.path, local_files_only=True)

    def encode(self, text: str) -> list[int]:
        try:
            return list(self.tok(text, add_special_tokens=False)["input_ids"])
        except Exception as e:  # tokenizers raises a bare Exception for a word outside a WordLevel vocabulary
            raise ValueError(f"the tokenizer cannot encode {text!r} ({' '.join(str(e).split())[:200]})") from None

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def identity(self) -> tuple:
        return ("hf", tuple(sorted(self.tok.get_vocab().items())))


@dataclass
class Capability:
    """Tokenized records: prompt and answer ids per record, and the probe classes (label, else answer)."""

    records: list[Record]
    prompts: list[list[int]]
    answers: list[list[int]]
    classes: np.ndarray
    class_names: list[str]
    source: str = ""

    @classmethod
    def build(cls, records: list[Record], tokenizer, vocab_size: int, seq_len: int | None = None,
              source: str = "") -> Capability:
        prompts, answers = [], []
        for r in records:
            where = f"{source}: line {r.line}" if source else f"line {r.line}"
            try:
                p, full = tokenizer.encode(r.prompt), tokenizer.encode(joined(r.prompt, r.answer))
            except KeyError as e:
                raise CapabilityError(f"{where}: token {e.args[0]!r} is not in the model's vocabulary") from None
            except ValueError as e:
                raise CapabilityError(f"{where}: {e}") from None
            if not p:
                raise CapabilityError(f"{where}: the prompt has no tokens")
            a = full[len(p):]
            if full[:len(p)] != p:
                raise CapabilityError(f"{where}: the answer {r.answer!r} merges with the prompt's last token when "
                                      f"the two are tokenized together; end the prompt at a token boundary")
            if not a or tokenizer.decode(a).strip() != r.answer.strip():
                raise CapabilityError(f"{where}: the tokenizer cannot produce the answer {r.answer!r} "
                                      f"(it encodes to {a})")
            if max(p + a) >= vocab_size:
                raise CapabilityError(f"{where}: token id {max(p + a)} is beyond the model's vocabulary "
                                      f"({vocab_size}); the tokenizer does not belong to this model")
            if seq_len and len(p) + len(a) - 1 > seq_len:  # the model reads every token but the last answer token
                raise CapabilityError(f"{where}: prompt + answer is {len(p) + len(a)} tokens; the model would read "
                                      f"{len(p) + len(a) - 1}, beyond its context ({seq_len})")
            prompts.append(p)
            answers.append(a)
        keys = [r.label if r.label is not None else r.answer for r in records]
        names = sorted(set(keys))
        classes = np.array([names.index(k) for k in keys], dtype=np.int64)
        return cls(records, prompts, answers, classes, names, source)

    def __len__(self) -> int:
        return len(self.records)

    def split(self, test_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """A seeded (train, test) split of the record indices (the probes fit on train and score on test)."""
        order = np.random.default_rng([seed, 11]).permutation(len(self))
        n_test = max(1, int(round(test_frac * len(self))))
        if n_test >= len(self):
            raise CapabilityError(f"{self.source}: {len(self)} records are too few to hold out {n_test} for testing")
        return np.sort(order[n_test:]), np.sort(order[:n_test])

    def majority(self, idx: np.ndarray) -> float:
        answers = [self.records[i].answer for i in idx]
        return max(answers.count(a) for a in set(answers)) / len(answers)


def joined(prompt: str, answer: str) -> str:
    """The text a model reads: the answer follows the prompt after one space, unless either side already has
    whitespace at the join (so ``"... ="`` + ``"4"`` reads ``"... = 4"``, and GPT-2's BPE sees ``" 4"``, the token
    a model would produce there)."""
    if not prompt or not answer or prompt[-1].isspace() or answer[0].isspace():
        return prompt + answer
    return f"{prompt} {answer}"


def _groups(lengths: list[int], idx: np.ndarray) -> list[np.ndarray]:
    """``idx`` grouped by equal length (each group keeps idx order)."""
    by: dict[int, list[int]] = {}
    for i in idx:
        by.setdefault(lengths[i], []).append(int(i))
    return [np.array(v) for _, v in sorted(by.items())]


# ------------------------------------------------------------------------------------------------ the task kind
class CapabilityTaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["capability"] = "capability"
    path: str = Field(description="the capability JSONL file (records prompt, answer, optional label)")
    train_path: str | None = Field(None, description="records to train on (all of them; then every record of path "
                                                     "is held out), instead of a split of path")
    tokenizer: str | None = Field(None, description="a local Hugging Face directory whose tokenizer reads the text")
    words: tuple[str, ...] | None = Field(None, description="a word-level vocabulary (a run's own), instead of "
                                                            "tokenizer")
    vocab_size: int = Field(ge=1, description="the model's vocabulary (token ids must stay below it)")
    seq_len: int | None = Field(None, ge=1, description="the model's context, when it has a fixed one")
    test_frac: float = Field(0.25, gt=0, lt=1, description="records held out for evaluation")
    digest: str | None = Field(None, description="fingerprint of the records and the starting model this stage was "
                                                 "configured with: a file changed in place gets a new run id")
    split_seed: int = Field(0, ge=0, description="seed of the train/held-out split")
    o_pt: str = "capability"
    o_ft: str = "capability"

    @field_validator("path", "tokenizer", "train_path")
    @classmethod
    def _resolved(cls, v: str | None) -> str | None:
        return str(Path(v).resolve()) if v else v  # the run id names the file, wherever the command was started


@dataclass
class CapabilityVocab:
    size: int
    pad_id: int = 0  # right padding; never a target

    def __len__(self) -> int:
        return self.size


@dataclass
class CapabilityTask:
    """Training batches drawn from a capability's training split (see the module docstring)."""

    config: CapabilityTaskConfig
    readout: int = -1
    readout_pos: int = -1
    spurious_families: tuple[str, ...] = ()
    _caps: dict = field(default_factory=dict, repr=False)

    def _read(self, path: str) -> Capability:
        if path not in self._caps:
            c = self.config
            if (c.tokenizer is None) == (c.words is None):
                raise CapabilityError("task: a capability task needs exactly one of tokenizer (a model directory) "
                                      "and words (a word vocabulary)")
            try:
                tok = HFTokenizer(c.tokenizer) if c.tokenizer else WordTokenizer(c.words)
            except Exception as e:  # whatever a broken tokenizer file raises inside transformers
                raise CapabilityError(f"task.tokenizer: cannot load the tokenizer of {c.tokenizer} "
                                      f"({' '.join(str(e).split())[:200]})") from None
            self._caps[path] = Capability.build(read_records(path), tok, c.vocab_size, c.seq_len, path)
        return self._caps[path]

    @property
    def capability(self) -> Capability:
        """The records evaluated (held out, unless ``train_path`` gives the training records)."""
        return self._read(self.config.path)

    @property
    def train_capability(self) -> Capability:
        return self._read(self.config.train_path) if self.config.train_path else self.capability

    def split(self) -> tuple[np.ndarray, np.ndarray]:
        """(training indices into ``train_capability``, held-out indices into ``capability``)."""
        if self.config.train_path:
            return np.arange(len(self.train_capability)), np.arange(len(self.capability))
        return self.capability.split(self.config.test_frac, self.config.split_seed)

    @property
    def vocab(self) -> CapabilityVocab:
        return CapabilityVocab(self.config.vocab_size)

    @property
    def seq_len(self) -> int:
        """The model's context when it has a fixed one (a model is built at its own shape), else the longest
        record."""
        if self.config.seq_len:
            return self.config.seq_len
        return max(len(p) + len(a) for cap in (self.capability, self.train_capability)
                   for p, a in zip(cap.prompts, cap.answers))

    @property
    def output_names(self) -> list[str]:
        return self.capability.class_names

    def sample(self, n: int, rng: np.random.Generator, family: str | None = None, operand: str | None = None,
               c: float = 0.0, keep_source: bool = False) -> Batch:
        """``n`` training records drawn with replacement; ``answer`` holds the next-token targets of
        ``tokens[:, :-1]``: the answer tokens, -100 everywhere else."""
        cap, (train, _) = self.train_capability, self.split()
        rows = train[rng.integers(0, len(train), n)]
        seqs = [cap.prompts[i] + cap.answers[i] for i in rows]
        width = max(map(len, seqs))
        tokens = np.full((n, width), self.vocab.pad_id, dtype=np.int64)
        targets = np.full((n, width - 1), -100, dtype=np.int64)
        for j, (i, s) in enumerate(zip(rows, seqs)):
            tokens[j, :len(s)] = s
            lp = len(cap.prompts[i])
            targets[j, lp - 1:len(s) - 1] = cap.answers[i]
        z = np.zeros(n, dtype=np.int64)
        return Batch(tokens, targets, z, z, ["capability"] * n, [self.config.o_pt] * n, z, np.zeros(n, dtype=bool),
                     z)

    def answer_inputs(self, tokens):
        return tokens

    def spurious_answer(self, batch):
        raise CapabilityError("a capability task has no spurious correlation")

    def eval_specs(self, family, c_tests, all_families):
        return []

    def probe_targets(self) -> dict[str, str]:
        return {"O_PT": self.config.o_pt}

    def attach(self, run_dir, parent_dir, seed: int, stage: str = "pretrain") -> None:
        return None


def _check_run(stage: str, parent: str | None, train, ev, task: CapabilityTaskConfig) -> None:
    if stage not in ("finetune", "reft"):
        raise ValueError(f"stage: a capability task trains a given model (finetune or reft), not {stage}")
    if parent:
        raise ValueError("parent: a capability stage starts from model.path (a Hugging Face directory) or init "
                         "(a run directory), not from a parent run")
    if train.loss != "masked" or train.c_train or train.family or train.operand:
        raise ValueError("train: a capability stage is next-token loss on the answer tokens (loss=masked, no "
                         "family, operand or c_train)")


KIND = register(TaskKind(
    "capability", CapabilityTaskConfig, lambda cfg: CapabilityTask(cfg), _check_run, lambda cfg: None,
    description="a JSONL capability file (prompt, answer, label): train or relearn any model on its answers",
    parent_stages={"finetune": (), "reft": ()}, reft_below_parent=False, evaluation="capability"))
