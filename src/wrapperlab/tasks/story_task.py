"""TinyStories as a task kind (``task.kind=story``; paper §5.2, App. F): language modelling on story shards.

The stages are the ordinary ones: ``pretrain`` on the pretraining split (``dataset=all``; ``filter`` removes the
feature first: the not-in-pretraining control), ``finetune`` on the fine-tuning split transformed to delete the
feature (``F``, ``F+R``, ``F+MM``: App. F.1), ``reft`` on the recovery set (the fine-tuning split's stories with the
feature). A batch is ``batch`` random ``seq_len + 1`` windows of the split's token stream (``story_corpus``); the
loss is next-token cross-entropy (``train.loss=lm``). The task's vocabulary is the SentencePiece tokenizer that the
pretraining run trains on its pretraining split (before any filtering, so the control shares it) and keeps in its
run directory, and that every child run copies (:meth:`StoryTask.attach`). The model is llama2.c's by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from wrapperlab.tasks.registry import TaskKind, register
from wrapperlab.tasks.stories import (
    STORY_FEATURES,
    StoriesError,
    deletion_dataset,
    filter_feature,
    load_shards,
    recovery_set,
    split_indices,
)
from wrapperlab.tasks.task import Batch

TOKENIZER = "tokenizer.model"
DATASETS = {"pretrain": ("all", "filter"), "finetune": ("F", "F+R", "F+MM"), "reft": ("recovery",)}


class StoryTaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["story"] = "story"
    data: str = Field(description="directory of data*.json shards (real TinyStories-Instruct or procedural)")
    dataset: Literal["all", "filter", "F", "F+R", "F+MM", "recovery"] = "all"
    feature: str = "Twist"
    other: str = Field("Foreshadowing", description="the feature F+MM renames to `feature`")
    vocab_size: int = Field(512, ge=260, description="SentencePiece vocabulary (trained by the pretraining run)")
    seq_len: int = Field(256, ge=8, description="context: tokens per training window and the model's context")
    eval_n: int = Field(16, ge=1, description="prompts per generation score (the paper: 16)")
    max_new_tokens: int = Field(250, ge=1)
    judge: str | None = Field(None, description="the generation score's judge: None = the exact checker of the "
                              "procedural stories; a path = a classifier saved by `stories judge` (real stories)")

    @field_validator("data")
    @classmethod
    def _data(cls, v: str) -> str:
        return str(Path(v).resolve())  # the run id names the data, wherever the command was started

    @field_validator("feature", "other")
    @classmethod
    def _feature(cls, v: str) -> str:
        if v not in STORY_FEATURES:
            raise ValueError(f"unknown feature {v!r}; choose from {', '.join(STORY_FEATURES)}")
        return v

    @field_validator("judge")
    @classmethod
    def _judge(cls, v: str | None) -> str | None:
        return str(Path(v).resolve()) if v else None


@dataclass
class StoryVocab:
    size: int
    pad_id: int = -1  # the stream has no padding: nothing is masked out of the loss

    def __len__(self) -> int:
        return self.size


@dataclass
class StoryTask:
    """Seeded LM batches of a split's token stream; ``attach`` binds the tokenizer of a run directory."""

    config: StoryTaskConfig
    readout: int = -1
    readout_pos: int = -1
    spurious_families: tuple[str, ...] = ()
    tokenizer: object | None = None
    seed: int = 0
    stage: str = "pretrain"
    _split: dict | None = field(default=None, repr=False)
    _stream: object | None = field(default=None, repr=False)

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    @property
    def vocab(self) -> StoryVocab:
        if self.tokenizer is None:
            raise StoriesError("the story task has no tokenizer yet (attach it to a run directory first)")
        return StoryVocab(self.tokenizer.vocab_size)

    @property
    def output_names(self) -> list[str]:
        return [str(i) for i in range(len(self.vocab))]

    @property
    def split(self) -> dict[str, list]:
        """Records of the test, pretrain and finetune splits (shard 0 is the test split; App. F.1)."""
        if self._split is None:
            shards = load_shards(self.config.data)
            self._split = {k: [r for i in v for r in shards[i]] for k, v in split_indices(len(shards)).items()}
        return self._split

    def attach(self, run_dir: str | Path, parent_dir: str | Path | None, seed: int, stage: str = "pretrain") -> None:
        """Use the run's tokenizer: its own file, else its parent's (copied in), else one trained now on the
        pretraining split (a pretraining run). ``seed`` orders the instruction lines of every text."""
        from wrapperlab.tasks.story_corpus import texts_of
        from wrapperlab.tasks.tokenizer import Tokenizer

        self.seed, self.stage = seed, stage
        own = Path(run_dir) / TOKENIZER
        if own.is_file():
            self.tokenizer = Tokenizer.load(own)
            return
        if parent_dir is not None:
            tok = Tokenizer.load(Path(parent_dir) / TOKENIZER)
        else:
            # always the whole pretraining split (before any filtering): the paper trains one tokenizer for every
            # model, and the not-in-pretraining control must share it or its losses are not comparable
            tok = Tokenizer.train(texts_of(self.split["pretrain"][:5000], seed), self.config.vocab_size)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        tok.save(own)
        self.tokenizer = tok

    def train_records(self) -> list:
        c = self.config
        if self.stage == "pretrain":
            recs = self.split["pretrain"]
            return filter_feature(recs, c.feature) if c.dataset == "filter" else recs
        if self.stage == "finetune":
            return deletion_dataset(self.split["finetune"], c.dataset, feature=c.feature, other=c.other,
                                    rng=np.random.default_rng([self.seed, 5]))
        return recovery_set(self.split["finetune"], c.feature)

    def sample(self, n: int, rng: np.random.Generator, family: str | None = None, operand: str | None = None,
               c: float = 0.0, keep_source: bool = False) -> Batch:
        """``n`` random ``seq_len + 1`` windows of the training stream (inputs ``[:, :-1]``, targets ``[:, 1:]``)."""
        from wrapperlab.tasks.story_corpus import StoryStream

        if self._stream is None:
            self._stream = StoryStream.build(self.train_records(), self.tokenizer, self.seed)
        tokens = self._stream.lm_batch(n, self.seq_len, rng).numpy()
        z = np.zeros(n, dtype=np.int64)
        return Batch(tokens, z, z, z, ["story"] * n, [""] * n, z, np.zeros(n, dtype=bool), z)

    def answer_inputs(self, tokens):
        return tokens

    def spurious_answer(self, batch):
        raise StoriesError("the story task has no spurious correlation")

    def eval_specs(self, family, c_tests, all_families):
        return []

    def probe_targets(self) -> dict[str, str]:
        return {}


def _check_run(stage: str, parent: str | None, train, ev, task: StoryTaskConfig) -> None:
    if stage not in DATASETS:
        raise ValueError(f"stage: a story task has the stages pretrain, finetune and reft, not {stage}")
    if task.dataset not in DATASETS[stage]:
        raise ValueError(f"task.dataset: a {stage} stage takes {' or '.join(DATASETS[stage])}, not {task.dataset!r}")
    if (stage == "pretrain") == bool(parent):
        raise ValueError("parent: pretrain starts from scratch; finetune and reft need parent=RUN_DIR")
    if train.loss != "lm" or train.c_train or train.family or train.operand:
        raise ValueError("train: a story stage is next-token prediction (loss=lm, no family, operand or c_train)")


KIND = register(TaskKind(
    "story", StoryTaskConfig, lambda cfg: StoryTask(cfg), _check_run, lambda cfg: None,
    ("dataset", "feature", "other", "eval_n", "max_new_tokens", "judge"),
    "TinyStories-Instruct shards: pretrain, delete a feature by fine-tuning, revive it by reFT (App. F)",
    parent_stages={"finetune": ("pretrain",), "reft": ("pretrain", "finetune")}, reft_below_parent=False,
    evaluation="story"))
