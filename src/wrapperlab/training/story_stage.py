"""The TinyStories training stages (paper App. F.1–F.2): pretrain, delete, recover — one loop.

- ``pretrain``: from scratch on the pretraining split (shards 1 … 80 %), LM loss on random windows of the token
  stream, AdamW with warmup + cosine (App. F.1). ``dataset=filter`` removes the feature first: the paper's
  "not in pretraining" control. Trains the SentencePiece tokenizer on its own texts and keeps it in the run.
- ``delete``: from a finished pretrain run, on the fine-tuning split transformed by ``dataset`` ∈ {F, F+R, F+MM}
  (App. F.1), at a **constant** LR (the authors' deletion configs); η_M / η_S are the learning rates.
- ``recover`` (reFT): from a finished run, on the recovery set (the fine-tuning split's stories with the feature),
  constant LR (the paper: 1e-5 for every deleted model, and the control gets the same).

Evaluation at step 0 and every ``eval_every`` steps: the held-out LM loss on the test split's stories with the
feature (Figs. 31/33) and the generation score for prompts that ask for it (Table 1, Figs. 32/34; judged by the exact
checker of the procedural stories). A run directory holds ``checkpoint.json`` + one safetensors file (the same
atomic, checksummed checkpoints as every wrapperlab stage) and ``tokenizer.model``; rerunning the same call resumes
an interrupted run bit-identically (the batch of step s comes from ``(seed, s)``).

``eval_at`` adds evaluation steps (the reFT columns of Table 1); ``judge`` names a classifier saved by ``wrapperlab
stories judge`` for real stories (the exact checker judges procedural ones). ``experiments/stories_table.py`` drives
the whole protocol (the cpu and paper presets, the Table 1 and Fig. 11a analogs).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from wrapperlab.fileio import remove_stale_temps
from wrapperlab.models.llama import LlamaConfig, LlamaTransformer
from wrapperlab.tasks.stories import (
    deletion_dataset,
    detect_features,
    filter_feature,
    load_shards,
    recovery_set,
    split_indices,
)
from wrapperlab.tasks.story_corpus import StoryStream, texts_of
from wrapperlab.tasks.tokenizer import Tokenizer
from wrapperlab.training import checkpoint as ck
from wrapperlab.training.config import ConfigError
from wrapperlab.training.generation import GenerationSettings, generation_score
from wrapperlab.training.story_judge import load_judge

TOKENIZER = "tokenizer.model"
DATASETS = {"pretrain": ("all", "filter"), "delete": ("F", "F+R", "F+MM"), "recover": ("recovery",)}


class StoryModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    d_model: int = Field(128, ge=1)
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    seq_len: int = Field(256, ge=8)


class StoryStageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: Literal["pretrain", "delete", "recover"]
    data: str = Field(description="directory of data*.json shards (real TinyStories-Instruct or procedural)")
    dataset: str = "all"
    feature: str = "Twist"
    other: str = "Foreshadowing"
    parent: str | None = None
    vocab_size: int = Field(512, ge=260)
    model: StoryModel = Field(default_factory=StoryModel)
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_frac: float = Field(0.05, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = Field(0, ge=0)
    eval_every: int = Field(250, ge=1)
    eval_at: list[int] = Field(default_factory=list, description="extra evaluation steps (the reFT columns of "
                               "Table 1: 30, 270, 3000 in the paper)")
    judge: str | None = Field(None, description="the generation score's judge: None = the exact checker of the "
                              "procedural stories; a path = a classifier saved by `stories judge` (real stories)")
    eval_n: int = Field(16, ge=1, description="prompts per generation score (the paper: 16)")
    max_new_tokens: int = Field(250, ge=1)
    threads: int = Field(0, ge=0)
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="cpu or cuda[:N] (not part of the run id)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 = bf16 autocast (the authors' default on "
                                               "a GPU); left out of the run id at fp32")

    def check(self) -> StoryStageConfig:
        if self.dataset not in DATASETS[self.stage]:
            raise ConfigError(f"dataset: a {self.stage} stage takes {' or '.join(DATASETS[self.stage])}, "
                              f"not {self.dataset!r}")
        bad = [s for s in self.eval_at if not 0 < s <= self.steps]
        if bad:
            raise ConfigError(f"eval_at: steps must be in 1..steps={self.steps} (got {bad[0]})")
        if (self.stage == "pretrain") == (self.parent is not None):
            raise ConfigError("parent: pretrain starts from scratch; delete and recover need parent=RUN_DIR")
        return self

    @property
    def schedule(self) -> str:
        return "cosine" if self.stage == "pretrain" else "constant"

    def run_id(self, parent_id: str | None) -> str:
        d = self.model_dump(mode="json")
        for k in ("parent", "threads", "data", "device"):
            d.pop(k)
        if d["precision"] == "fp32":
            d.pop("precision")
        for k in ("eval_at", "judge"):  # left out while unset, so ids from before these fields stay valid
            if not d[k]:
                d.pop(k)
        blob = json.dumps({"config": d, "parent": parent_id, "data": str(Path(self.data).resolve())}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def story_config(**values) -> StoryStageConfig:
    """Validate a stage config; every problem is a one-line ``ConfigError`` naming the field."""
    try:
        return StoryStageConfig(**values).check()
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None


class StoryStage:
    def __init__(self, cfg: StoryStageConfig, run_dir: str | Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.parent = ck.read_sidecar(cfg.parent) if cfg.parent else None
        if self.parent is not None and self.parent.get("status") != "done":
            raise ConfigError(f"parent: run {cfg.parent} is not finished")
        if self.parent is not None and self.parent.get("stage") not in ("pretrain", "delete"):
            raise ConfigError(f"parent: a {cfg.stage} run starts from a pretrain or delete run")
        self.run_id = cfg.run_id(self.parent["run_id"] if self.parent else None)
        # a child inherits the model shape (and the tokenizer) of its parent, whatever its own config says
        self.model_cfg = cfg.model if self.parent is None else StoryModel(**self.parent["config"]["model"])
        shards = load_shards(cfg.data)
        idx = split_indices(len(shards))
        self.split = {k: [r for i in v for r in shards[i]] for k, v in idx.items()}

    # ------------------------------------------------------------------ data
    def train_records(self) -> list:
        c = self.cfg
        if c.stage == "pretrain":
            recs = self.split["pretrain"]
            return filter_feature(recs, c.feature) if c.dataset == "filter" else recs
        if c.stage == "delete":
            return deletion_dataset(self.split["finetune"], c.dataset, feature=c.feature, other=c.other,
                                    rng=np.random.default_rng([c.seed, 5]))
        return recovery_set(self.split["finetune"], c.feature)

    def tokenizer(self) -> Tokenizer:
        own = self.run_dir / TOKENIZER
        if own.is_file():
            return Tokenizer.load(own)
        if self.parent is not None:
            tok = Tokenizer.load(Path(self.cfg.parent) / TOKENIZER)
        else:
            # always the whole pretraining split (before any filtering), as the paper trains one tokenizer for every
            # model: the "not in pretraining" control must share the pieces of the main model, or its losses on
            # feature stories are measured in other, rarer tokens and are not comparable (found in the pilot)
            tok = Tokenizer.train(texts_of(self.split["pretrain"][:5000], self.cfg.seed), self.cfg.vocab_size)
        tok.save(own)
        return tok

    def build_model(self, tok: Tokenizer) -> LlamaTransformer:
        m = self.model_cfg
        return LlamaTransformer(LlamaConfig(vocab_size=tok.vocab_size, seq_len=m.seq_len, d_model=m.d_model,
                                            n_layer=m.n_layer, n_head=m.n_head))

    # ------------------------------------------------------------------ loop
    def run(self, stop_after: int | None = None, log=lambda s: None) -> dict:
        """Train to ``cfg.steps`` (or pause after ``stop_after`` steps of this call: tests of resuming)."""
        c = self.cfg
        if c.threads:
            torch.set_num_threads(c.threads)
        if c.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device: {c.device} requested but torch sees no CUDA device")
        dev = torch.device(c.device)
        side = ck.read_sidecar(self.run_dir) if (self.run_dir / ck.SIDECAR).is_file() else None
        if side and side.get("run_id") != self.run_id:
            raise ConfigError(f"out: {self.run_dir} holds a different run ({side.get('run_id')})")
        if side and side.get("status") == "done":
            return side
        self.run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.run_dir)  # left by a process killed mid-write
        tok = self.tokenizer()
        torch.manual_seed(c.seed)
        model = self.build_model(tok).to(dev)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                lr=c.lr, betas=(0.9, 0.95))
        step, metrics, wall0 = 0, [], 0.0
        if side:
            _, t = ck.load_tensors(self.run_dir, side)
            model.load_state_dict(ck.split_prefix(t, "model"))
            ck.load_optimizer(opt, ck.split_prefix(t, "optim"), side["optim_groups"])
            step, metrics, wall0 = int(side["step"]), list(side["metrics"]), float(side["wall_s"])
        elif self.parent is not None:
            _, t = ck.load_tensors(c.parent, self.parent)
            model.load_state_dict(ck.split_prefix(t, "model"))
        seq = model.cfg.seq_len
        stream = StoryStream.build(self.train_records(), tok, c.seed)
        test_f = recovery_set(self.split["test"], c.feature)
        held = StoryStream.build(test_f, tok, c.seed + 1)
        heldout = [held.lm_batch(c.batch_size, seq, np.random.default_rng([c.seed, 9, i])) for i in range(4)]

        def lm_loss(batch: torch.Tensor) -> torch.Tensor:
            batch = batch.to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=c.precision == "bf16"):
                logits = model(batch[:, :-1])
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

        judge = load_judge(c.judge) if c.judge else detect_features

        def evaluate(at: int) -> None:
            model.eval()
            with torch.no_grad():
                loss = float(np.mean([lm_loss(b).item() for b in heldout]))
            gen = generation_score(model, tok, self.split["test"], judge=judge, settings=GenerationSettings(
                feature=c.feature, n=c.eval_n, max_new_tokens=c.max_new_tokens, seed=c.seed + at))
            model.train()
            metrics.append({"step": at, "heldout_loss": round(loss, 5), "score": gen.meta["score"],
                            "n": gen.meta["n"]})
            log(f"step {at:>6}: held-out loss on {c.feature} stories {loss:.4f}, {c.feature} in "
                f"{gen.meta['score']:.0%} of {gen.meta['n']} generations asked for it")

        def save(status: str) -> dict:
            otensors, groups = ck.optimizer_tensors(opt)
            tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
            tensors |= {f"optim.{k}": v for k, v in otensors.items()}
            return ck.save_checkpoint(self.run_dir, step, tensors, {
                "run_id": self.run_id, "stage": c.stage, "status": status,
                "config": c.model_copy(update={"model": self.model_cfg}).model_dump(mode="json"),
                "parent": c.parent, "parent_id": self.parent["run_id"] if self.parent else None,
                "optim_groups": groups, "metrics": metrics, "wall_s": round(wall0 + time.perf_counter() - t0, 2),
                "tokenizer_sha256": tok.sha256})

        t0 = time.perf_counter()
        if step == 0 and not metrics:
            evaluate(0)
        warm = int(round(c.warmup_frac * c.steps)) if c.schedule == "cosine" else 0
        done_here = 0
        model.train()
        while step < c.steps:
            if c.schedule == "cosine":
                lr = c.lr * min(1.0, (step + 1) / max(1, warm)) * 0.5 * (1 + math.cos(math.pi * step / c.steps))
            else:
                lr = c.lr
            for g in opt.param_groups:
                g["lr"] = lr
            loss = lm_loss(stream.lm_batch(c.batch_size, seq, np.random.default_rng([c.seed, step])))
            if not math.isfinite(loss.item()):
                side = save("diverged") if step else {"status": "diverged", "step": step}
                return side
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
            opt.step()
            step += 1
            done_here += 1
            if step % c.eval_every == 0 or step == c.steps or step in c.eval_at:
                evaluate(step)
                side = save("done" if step == c.steps else "running")
            if stop_after is not None and done_here >= stop_after and step < c.steps:
                return save("running")
        return side
