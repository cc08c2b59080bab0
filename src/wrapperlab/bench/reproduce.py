"""End-to-end wall time of ``wrapperlab reproduce --preset quick`` (target <= 15 min here), from
an empty output directory, as a user runs it (a subprocess of the console entry point). The outcome line reports
how many runs executed, so a timing that reused earlier runs cannot pass for a fresh one.

    python -m wrapperlab.bench.reproduce [--preset quick] [--out DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = {"quick": 900}


def measure(preset: str = "quick", out: str | Path | None = None, keep: bool = False,
            extra: list[str] | None = None) -> dict:
    tmp = Path(out) if out else Path(tempfile.mkdtemp(prefix="wl-bench-reproduce-"))
    if tmp.exists() and any(tmp.iterdir()):
        raise ValueError(f"--out: {tmp} is not empty; the benchmark times a fresh reproduction")
    try:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "wrapperlab.cli", "reproduce", "--preset", preset, "--out",
                            str(tmp), "--json", "--no-progress", *(extra or [])], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"reproduce exited {r.returncode}: {tail}")
        done = json.loads(r.stdout)
        outcome = {k: done.get(k) for k in ("planned", "reused", "executed", "failed")}
    finally:
        if not keep and not out:
            shutil.rmtree(tmp, ignore_errors=True)
    res = {"benchmark": "reproduce", "preset": preset, "wall_s": round(wall, 1), "outcome": outcome}
    if preset in TARGET_S:
        res["target_s"] = TARGET_S[preset]
        res["within_target"] = wall <= TARGET_S[preset]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="quick")
    p.add_argument("--out", help="an empty directory to reproduce into (default: a temporary one, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = p.parse_args()
    print(json.dumps(measure(a.preset, a.out, a.keep)))


if __name__ == "__main__":
    main()
