"""Analysis throughput: probing, a pruning sweep over K and a revival curve each evaluate the
model many times. For each tool: wall time, the number of sequences it pushed through the model, and the share
of its wall time that a bare batched forward of that many sequences (timed in the same run) accounts for —
``forward_share`` near 1 means the tool is bound by the model's forward, lower means its own overhead
(probe fitting, saliency gradients, training steps, bookkeeping) dominates.

The subject is the cpu preset's model shape, freshly initialised (a tool's cost does not depend on what the
weights learned); revival needs run directories, so it trains a short pretrain -> finetune lineage first.

    python -m wrapperlab.bench.analysis [--tools probe,prune,revival] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TOOLS = ("probe", "prune", "revival")


class ForwardCounter:
    """Counts the sequences every Transformer's forward sees while it is open (the class's forward is wrapped,
    so copies a tool makes of the model — pruning works on one — are counted too)."""

    def __init__(self):
        from wrapperlab.models.transformer import Transformer

        self.n, self._cls, self._orig = 0, Transformer, Transformer.forward
        orig = self._orig

        def forward(model, tokens, *args, **kw):
            self.n += int(tokens.shape[0])
            return orig(model, tokens, *args, **kw)

        Transformer.forward = forward

    def close(self) -> None:
        self._cls.forward = self._orig


def bare_forward_rate(model, task, n: int = 2048, batch: int = 512) -> float:
    """Sequences/s of a plain batched no-grad forward at the answer slot (the evaluation's own path)."""
    from wrapperlab.training.evaluation import predict

    tokens = task.sample(n, np.random.default_rng(0), family="count", operand=task.config.o_pt).tokens
    predict(model, task, tokens[:batch])
    t0 = time.perf_counter()
    predict(model, task, tokens, batch_size=batch)
    return n / (time.perf_counter() - t0)


def _subject(threads: int):
    from wrapperlab.training.config import build_config
    from wrapperlab.training.stage import Stage, build_model, resolve

    cfg, _ = resolve(build_config("pretrain", "cpu", None, [f"threads={threads}"] if threads else []))
    task = Stage(cfg, None, "/nonexistent").task
    torch.manual_seed(0)
    return cfg, task, build_model(cfg, task).eval()


def measure(tools=TOOLS, threads: int = 2, revival_steps: int = 100) -> dict:
    if threads:
        torch.set_num_threads(threads)
    from wrapperlab.analysis.probing import ProbeSettings, probe
    from wrapperlab.analysis.pruning import PruneSettings, prune

    cfg, task, model = _subject(threads)
    rate = bare_forward_rate(model, task)
    out = {"benchmark": "analysis", "model": f"d{cfg.model.d_model} L{cfg.model.n_layer} H{cfg.model.n_head}",
           "threads": torch.get_num_threads(), "bare_forward_seq_per_s": round(rate, 1), "tools": {}}

    def record(name: str, fn) -> None:
        counter = ForwardCounter()
        t0 = time.perf_counter()
        try:
            fn()
        finally:
            counter.close()
        wall = time.perf_counter() - t0
        out["tools"][name] = {"wall_s": round(wall, 2), "forward_seqs": counter.n,
                              "forward_share": round(counter.n / rate / wall, 3)}

    if "probe" in tools:
        s = ProbeSettings()
        record("probe", lambda: probe(model, task, settings=s))
        out["tools"]["probe"]["settings"] = f"n_train={s.n_train} n_test={s.n_test} iters={s.iters}, O_PT and O_FT"
    if "prune" in tools:
        s = PruneSettings()
        record("prune", lambda: prune(model, task, settings=s))
        out["tools"]["prune"]["settings"] = f"K=0..{max(s.ks)} n_eval={s.n_eval} n_grad={s.n_grad}"
    if "revival" in tools:
        out["tools"]["revival"] = _revival(threads, revival_steps)
    return out


def _revival(threads: int, steps: int) -> dict:
    """A revival curve (reFT, Scr.+FT behind its scratch run, Scr.) on a short cpu-preset lineage. The training
    runs are not hooked, so this reports wall time and the number of optimisation steps and evaluations."""
    from wrapperlab.analysis.revival import RevivalSettings, revival
    from wrapperlab.training.config import build_config
    from wrapperlab.training.stage import Stage, resolve

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        over = [f"threads={threads}"] if threads else []
        cfg, _ = resolve(build_config("pretrain", "cpu", None, [*over, "steps=20", "eval.every=20"]))
        Stage(cfg, None, d / "pt").run(progress=False)
        cfg, parent = resolve(build_config("finetune", "cpu", None, [*over, f"parent={d / 'pt'}", "steps=20",
                                                                     "eval.every=20", "lr=M"]))
        Stage(cfg, parent, d / "ft").run(progress=False)
        s = RevivalSettings(steps=steps, scratch_steps=steps, threads=threads)
        t0 = time.perf_counter()
        res = revival(d / "ft", d / "rev", settings=s, progress=False)
        wall = time.perf_counter() - t0
    curves = {r["curve"] for r in res.rows}
    return {"wall_s": round(wall, 2), "curves": sorted(curves), "points": len(res.rows),
            "train_steps": steps * (len(curves) + 1), "settings": f"steps={steps} per curve, log-spaced evals"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {', '.join(TOOLS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--revival-steps", type=int, default=100)
    a = p.parse_args()
    tools = [t for t in a.tools.split(",") if t]
    bad = [t for t in tools if t not in TOOLS]
    if bad:
        p.error(f"--tools: unknown tool {bad[0]!r}; choose from {', '.join(TOOLS)}")
    print(json.dumps(measure(tools, a.threads, a.revival_steps)))


if __name__ == "__main__":
    main()
