#!/usr/bin/env python3
"""PCFG sampling throughput against training's consumption, measured in the same run.

Sequences/s of the sampler at the paper's 250-token window (pretraining family mix, and fine-tuning data with
the spurious edit at c = 1), and sequences/s that one training step of the paper-preset model consumes on
this machine. ``ratio`` = sampling / consumption (issue 2: sampling must never be what training waits on).

    python benchmarks/sampling.py [--window 250] [--batch 96] [--repeats 20] [--train-steps 3]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def seqs_per_s(fn, n: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def main() -> None:
    from wrapperlab.training import build_config, resolve
    from wrapperlab.training.stage import Stage, build_model, compute_loss, make_optimizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=int, default=250)
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--preset", default="paper")
    a = p.parse_args()

    cfg, _ = resolve(build_config("pretrain", a.preset, overrides=[f"task.window={a.window}",
                                                                  f"batch_size={a.batch}"]))
    task = Stage(cfg, None, "/unused").task
    rng = np.random.default_rng(0)
    mix = seqs_per_s(lambda: task.sample(a.batch, rng), a.batch, a.repeats)
    ft = seqs_per_s(lambda: task.sample(a.batch, rng, family="count", operand="b", c=1.0), a.batch, a.repeats)

    model = build_model(cfg, task)
    opt = make_optimizer(model, cfg)
    batch = task.sample(a.batch, rng)
    tokens, answer = torch.from_numpy(batch.tokens), torch.from_numpy(batch.answer)

    def step() -> None:
        loss = compute_loss(model, task, tokens, answer, cfg.train.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train = seqs_per_s(step, a.batch, a.train_steps)
    print(json.dumps({
        "benchmark": "pcfg_sampling", "window": a.window, "seq_len": task.seq_len, "batch": a.batch,
        "sample_mix_seq_per_s": round(mix, 1), "sample_finetune_c1_seq_per_s": round(ft, 1),
        "train_consumes_seq_per_s": round(train, 1), "train_loss": cfg.train.loss,
        "model": f"d{cfg.model.d_model} L{cfg.model.n_layer} H{cfg.model.n_head}",
        "ratio_mix": round(mix / train, 1), "ratio_finetune": round(ft / train, 1),
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
