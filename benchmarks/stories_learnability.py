#!/usr/bin/env python3
"""Can a small llama2.c-style model learn the procedural Twist feature on this CPU, and how fast?

The measurement behind the TinyStories cpu preset, before the preset exists: procedural stories -> the paper's
SentencePiece BPE -> a small ``LlamaTransformer`` trained with the LM loss on random windows of the token stream
(AdamW, warmup + cosine) -> at checkpoints, the held-out loss and the generation score (``training.generation``,
judged by the exact checker) for prompts that ask for a Twist, beside the Twist rate of generations whose prompts
do not ask for one (the feature must follow the instruction, not appear at random).

    python benchmarks/stories_learnability.py [--stories 20000] [--steps 1500] [--d-model 128] [--threads 2]

Prints one JSON line per evaluation and a final JSON summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from wrapperlab.models.llama import LlamaConfig, LlamaTransformer
from wrapperlab.tasks.stories import StoryRecord, generate_records
from wrapperlab.tasks.story_corpus import StoryStream, texts_of
from wrapperlab.tasks.tokenizer import Tokenizer
from wrapperlab.training.generation import GenerationSettings, generation_score


def without_twist_request(records: list[StoryRecord]) -> list[StoryRecord]:
    """Control prompts: Twist stories whose instruction does not ask for a Twist."""
    return [dataclasses.replace(r, features=tuple(f for f in r.features if f != "Twist")) for r in records]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stories", type=int, default=20000)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--n-gen", type=int, default=16)
    p.add_argument("--max-new", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    records = generate_records(a.stories, np.random.default_rng(a.seed))
    n_test = max(200, a.stories // 20)
    test, train = records[:n_test], records[n_test:]
    tok = Tokenizer.train(texts_of(train[:5000], a.seed), vocab_size=a.vocab)
    stream, held = StoryStream.build(train, tok, a.seed), StoryStream.build(test, tok, a.seed + 1)
    model = LlamaTransformer(LlamaConfig(vocab_size=a.vocab, seq_len=a.seq_len, d_model=a.d_model,
                                         n_layer=a.n_layer, n_head=a.n_head))
    decay = [q for q in model.parameters() if q.dim() >= 2]
    rest = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    warm = max(1, a.steps // 20)
    setup_s = time.perf_counter() - t0

    def lm_loss(batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def evaluate(step: int, train_s: float) -> dict:
        with torch.no_grad():
            model.eval()
            vl = float(np.mean([lm_loss(held.lm_batch(a.batch, a.seq_len, np.random.default_rng([9, i]))).item()
                                for i in range(4)]))
        s = GenerationSettings(n=a.n_gen, max_new_tokens=a.max_new, seed=step)
        asked = generation_score(model, tok, test, settings=s)
        control = generation_score(model, tok, without_twist_request([r for r in test if "Twist" in r.features])
                                   + [r for r in test if "Twist" not in r.features],
                                   settings=dataclasses.replace(s, feature="Foreshadowing"))
        twist_unasked = float(np.mean(["Twist" in r["judged"] for r in control.rows]))
        model.train()
        row = {"step": step, "train_s": round(train_s, 1), "heldout_loss": round(vl, 4),
               "twist_when_asked": asked.meta["score"], "twist_when_not_asked": twist_unasked,
               "mean_new_tokens": float(np.mean([r["new_tokens"] for r in asked.rows]))}
        print(json.dumps(row), flush=True)
        return row

    rows, train_s, rng = [], 0.0, np.random.default_rng([a.seed, 1])
    model.train()
    for step in range(a.steps):
        t1 = time.perf_counter()
        lr = a.lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / a.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = lm_loss(stream.lm_batch(a.batch, a.seq_len, rng))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_s += time.perf_counter() - t1
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            rows.append(evaluate(step + 1, train_s))
    print(json.dumps({"summary": True, "params": model.n_params(), "stream_tokens": int(stream.tokens.shape[0]),
                      "setup_s": round(setup_s, 1), "train_s": round(train_s, 1),
                      "s_per_step": round(train_s / a.steps, 4), "final": rows[-1], "args": vars(a)}))


if __name__ == "__main__":
    main()
