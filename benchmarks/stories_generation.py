#!/usr/bin/env python3
"""Time one generation score (16 stories asked for a Twist, as Table 1's points), with or without the KV cache.

``models.llama.generate`` keeps a KV cache while the sequence fits the context; with ``--no-cache`` a no-op hook on
the residual stream forces the path every hooked model takes (each step reruns the whole context), so the two
commands differ only in the cache. Time them as whole processes, A against B, e.g.

    python benchmarks/stories_generation.py --run runs/stories/pretrain
    python benchmarks/stories_generation.py --run runs/stories/pretrain --no-cache

Prints one JSON line: seconds of the score alone, the score, and the mean story length in tokens; with ``--judge``,
how often a classifier judge agrees with the exact checker on these generations (a judge's accuracy on model-written
text, not only on the dataset's stories).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from wrapperlab.analysis.evaluate import load_run
from wrapperlab.training.generation import GenerationSettings, generation_score
from wrapperlab.training.story_judge import load_judge


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished story run (e.g. runs/stories/pretrain)")
    p.add_argument("--no-cache", action="store_true", help="rerun the whole context every step")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=250)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judge", help="a judge saved by `wrapperlab stories judge`: also report how often it agrees "
                                   "with the exact checker on these generations")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    _, task, model, _ = load_run(a.run)  # the run's model and its task (tokenizer, splits)
    tok, test = task.tokenizer, task.split["test"]
    hooks = [("blocks.0.hook_resid_post", lambda x, hook: x)] if a.no_cache else []
    t0 = time.perf_counter()
    with model.hooks(hooks):
        res = generation_score(model, tok, test, settings=GenerationSettings(n=a.n, max_new_tokens=a.max_new_tokens,
                                                                          seed=a.seed))
    sec = time.perf_counter() - t0
    out = {"cache": not a.no_cache, "seconds": round(sec, 3), "score": res.meta["score"],
           "mean_new_tokens": sum(r["new_tokens"] for r in res.rows) / len(res.rows)}
    if a.judge:
        judge = load_judge(a.judge)
        said = [("Twist" in judge(r["story"]), r["has_feature"]) for r in res.rows]
        out |= {"judge_agrees": sum(j == e for j, e in said) / len(said), "judge_twist": sum(j for j, _ in said),
                "exact_twist": sum(e for _, e in said)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
