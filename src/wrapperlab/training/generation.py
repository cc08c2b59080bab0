"""Generation score (paper App. F.2, Table 1, Figs. 32/34): the fraction of stories a model writes from
instructions that ask for a feature (Twist) which a judge says contain it.

As the authors: prompts are instruction prefixes up to ``"Story: "`` taken from stories whose features include
the feature, left-padded to one length with the tail of other stories' text, BOS-prefixed; generation at
temperature 1.0 without top-k, at most 350 new tokens; 16 prompts per point. A generated story ends at the first BOS
the model writes (the start of a next story) or at the token limit. The judge: for procedural stories, the exact
checker ``tasks.stories.detect_features``; for real TinyStories a classifier trained here would take its place (the
paper used a fine-tuned GPT-3.5 at 92 % held-out accuracy) — any ``judge(story) -> set of features`` fits.

It lives in ``training`` (like ``evaluation.py``) because the story stages evaluate with it during training; it
returns plain data (``GenerationResult``) and raises ``GenerationError`` (a ValueError) with a one-line message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from wrapperlab.models.llama import generate
from wrapperlab.tasks.stories import StoryRecord, detect_features, prompt_text
from wrapperlab.tasks.story_corpus import left_padded, texts_of
from wrapperlab.tasks.tokenizer import Tokenizer
from wrapperlab.training.evaluation import EVALUATIONS, Evaluator


class GenerationError(ValueError):
    """A generation request that cannot be served (one-line message)."""


@dataclass
class GenerationResult:
    rows: list[dict]
    meta: dict


@dataclass(frozen=True)
class GenerationSettings:
    feature: str = "Twist"
    n: int = 16
    max_new_tokens: int = 350
    temperature: float = 1.0
    seed: int = 0

    def check(self) -> GenerationSettings:
        for name in ("n", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise GenerationError(f"{name}: must be >= 1 (got {getattr(self, name)})")
        if self.temperature < 0:
            raise GenerationError(f"temperature: must be >= 0 (got {self.temperature})")
        return self


def generation_score(model, tokenizer: Tokenizer, records: Sequence[StoryRecord], *,
                     settings: GenerationSettings | None = None,
                     judge: Callable[[str], set[str]] = detect_features) -> GenerationResult:
    """Score ``model`` on prompts from the ``records`` that carry ``settings.feature`` (the others are the left
    padding). Rows: index, has_feature, judged (all the judge found), new_tokens, story. ``meta['score']``."""
    s = (settings or GenerationSettings()).check()
    rng = np.random.default_rng([s.seed, 1])
    with_f = [r for r in records if s.feature in r.features]
    others = [r for r in records if s.feature not in r.features] or list(records)
    if not with_f:
        raise GenerationError(f"records: none has the feature {s.feature!r} to prompt with")
    chosen = [with_f[int(i)] for i in rng.choice(len(with_f), size=min(s.n, len(with_f)), replace=False)]
    prompts = [tokenizer.encode(prompt_text(r, np.random.default_rng([s.seed, 2, i]))) for i, r in enumerate(chosen)]
    fillers = [tokenizer.encode(t) for t in texts_of(others[:256], s.seed + 3)]
    length = min(max(len(p) for p in prompts), model.cfg.seq_len)
    batch = left_padded(prompts, fillers, length, rng).to(next(model.parameters()).device)
    g = torch.Generator(device=batch.device).manual_seed(s.seed)
    was = model.training
    model.eval()
    out = generate(model, batch, s.max_new_tokens, temperature=s.temperature, generator=g,
                   stop_token=tokenizer.bos_id)
    model.train(was)
    rows = []
    for i, row in enumerate(out[:, length:].tolist()):
        if tokenizer.bos_id in row:
            row = row[:row.index(tokenizer.bos_id)]
        story = tokenizer.decode(row)
        found = judge(story)
        rows.append({"index": i, "has_feature": s.feature in found, "judged": sorted(found), "new_tokens": len(row),
                     "story": story})
    score = float(np.mean([r["has_feature"] for r in rows]))
    return GenerationResult(rows, {"settings": asdict(s), "score": score, "n": len(rows), "prompt_tokens": length})


class StoryEvaluator(Evaluator):
    """A story run's evaluation (paper App. F.2; Table 1, Figs. 31-34): the held-out LM loss on the test split's
    stories with the feature (four fixed batches) and the generation score of prompts that ask for it."""

    def __init__(self, cfg, task):
        import torch.nn.functional as F

        from wrapperlab.tasks.stories import recovery_set
        from wrapperlab.tasks.story_corpus import StoryStream
        from wrapperlab.training.story_judge import load_judge

        c, seed = task.config, cfg.train.seed
        self.task, self.cfg, self.F = task, cfg, F
        held = StoryStream.build(recovery_set(task.split["test"], c.feature), task.tokenizer, seed + 1)
        self.heldout = [held.lm_batch(cfg.train.batch_size, task.seq_len, np.random.default_rng([seed, 9, i]))
                        for i in range(4)]
        self.judge = load_judge(c.judge) if c.judge else detect_features

    def _loss(self, model, batch: torch.Tensor) -> torch.Tensor:
        dev = next(model.parameters()).device
        batch = batch.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16"):
            logits = model(batch[:, :-1])
        return self.F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def __call__(self, model, step: int) -> list[dict]:
        c = self.task.config
        was = model.training
        model.eval()
        with torch.no_grad():
            loss = float(np.mean([self._loss(model, b).item() for b in self.heldout]))
        gen = generation_score(model, self.task.tokenizer, self.task.split["test"], judge=self.judge,
                               settings=GenerationSettings(feature=c.feature, n=c.eval_n,
                                                           max_new_tokens=c.max_new_tokens,
                                                           seed=self.cfg.train.seed + step))
        model.train(was)
        return [{"heldout_loss": round(loss, 5), "score": gen.meta["score"], "n": gen.meta["n"]}]

    def line(self, step: int, rows: list[dict]) -> str:
        r, f = rows[0], self.task.config.feature
        return (f"step {step:>6}: held-out loss on {f} stories {r['heldout_loss']:.4f}, {f} in {r['score']:.0%} of "
                f"{r['n']} generations asked for it")


EVALUATIONS["story"] = StoryEvaluator
