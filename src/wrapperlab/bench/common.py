"""Shared pieces of the benchmarks: run a worker as its own process and read its one JSON line, alternate two
commands round by round, summarise.

Speed is always reported as a ratio against a baseline timed in the same run (these machines are shared and
noisy): A and B alternate, A B A B ..., and the ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence


class BenchError(RuntimeError):
    """A benchmark worker failed (one-line message)."""


def run_json(cmd: Sequence[str], timeout: float = 1800) -> dict:
    """Run ``cmd`` and return the last JSON object it printed on stdout."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BenchError(f"{' '.join(cmd[:4])} ... exited {r.returncode}: {tail}")
    for line in reversed(r.stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise BenchError(f"{' '.join(cmd[:4])} ... printed no JSON")


def worker(module: str, *args: str) -> list[str]:
    """The command line of ``python -m wrapperlab.bench.MODULE ARGS`` with this interpreter."""
    return [sys.executable, "-m", f"wrapperlab.bench.{module}", *args]


def alternate(a: Callable[[], dict], b: Callable[[], dict], rounds: int, key: str) -> dict:
    """Call ``a`` then ``b``, ``rounds`` times; ratio of ``key`` (a over b) per round, then the median."""
    ra, rb = [], []
    for _ in range(rounds):
        ra.append(a())
        rb.append(b())
    ratios = [x[key] / y[key] for x, y in zip(ra, rb)]
    return {"a": ra, "b": rb, "ratios": [round(r, 3) for r in ratios], "ratio": round(statistics.median(ratios), 3),
            "a_median": statistics.median(x[key] for x in ra), "b_median": statistics.median(y[key] for y in rb)}


def median_of(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)
