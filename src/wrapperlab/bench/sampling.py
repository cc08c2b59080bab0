#!/usr/bin/env python3
"""PCFG sampling throughput against training's consumption, measured in the same run.

Sequences/s of the sampler at the paper's 250-token window (pretraining family mix, and fine-tuning data with
the spurious edit at c = 1), and sequences/s that one training step of the paper-preset model consumes on
this machine. ``ratio`` = sampling / consumption (sampling must never be what training waits on).

    python benchmarks/sampling.py [--window 250] [--batch 96] [--repeats 20] [--train-steps 3]
    wrapperlab bench sampling --json

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


def measure(window: int = 250, batch: int = 96, repeats: int = 20, train_steps: int = 3, preset: str = "paper",
            threads: int = 0) -> dict:
    from wrapperlab.training import build_config, resolve
    from wrapperlab.training.stage import Stage, compute_loss

    over = [f"task.window={window}", f"batch_size={batch}"] + ([f"threads={threads}"] if threads else [])
    cfg, _ = resolve(build_config("pretrain", preset, overrides=over))
    if threads:
        torch.set_num_threads(threads)
    stage = Stage(cfg, None, "/unused")
    task = stage.task
    rng = np.random.default_rng(0)
    mix = seqs_per_s(lambda: task.sample(batch, rng), batch, repeats)
    ft = seqs_per_s(lambda: task.sample(batch, rng, family="count", operand="b", c=1.0), batch, repeats)

    model, opt, _, _ = stage._fresh()
    b = task.sample(batch, rng)
    tokens, answer = torch.from_numpy(b.tokens), torch.from_numpy(b.answer)

    def step() -> None:  # the training step without its sampling (what training consumes)
        with stage.autocast():
            loss = compute_loss(model, task, tokens, answer, cfg.train.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train = seqs_per_s(step, batch, train_steps)
    return {
        "benchmark": "sampling", "window": window, "seq_len": task.seq_len, "batch": batch,
        "sample_mix_seq_per_s": round(mix, 1), "sample_finetune_c1_seq_per_s": round(ft, 1),
        "train_consumes_seq_per_s": round(train, 1), "train_loss": cfg.train.loss,
        "train_precision": cfg.train.precision,
        "model": f"d{cfg.model.d_model} L{cfg.model.n_layer} H{cfg.model.n_head}",
        "ratio_mix": round(mix / train, 1), "ratio_finetune": round(ft / train, 1),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=int, default=250)
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--preset", default="paper")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    print(json.dumps(measure(a.window, a.batch, a.repeats, a.train_steps, a.preset, a.threads)))


if __name__ == "__main__":
    main()
