import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Ray 2.60 writes ~/.ray/auth_token at a local ray.init and then demands it from clusters started without one, so a
# test that starts a local instance would break a later test that starts a cluster: the tests run Ray without tokens
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# A tiny configuration that trains in seconds: every stage test and CLI test builds on it.
TINY = ["task.window=32", "model.d_model=32", "model.n_layer=1", "model.n_head=2", "batch_size=8",
        "eval.n=40", "threads=1"]


def wl(*args: str, cwd: Path | None = None, timeout: float = 300,
       env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the wrapperlab CLI the way a user does: a subprocess of the installed console entry point (``env``
    adds environment variables)."""
    env = dict(os.environ, PYTHONHASHSEED="0", COLUMNS="200", **(env or {}))
    return subprocess.run([sys.executable, "-m", "wrapperlab.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def run_spec(spec: dict, tmp_path: Path, workers: int = 1) -> Path:
    """Run an experiment spec (a dict) with `wrapperlab run` into tmp_path/store; returns the store."""
    path, store = tmp_path / "spec.yaml", tmp_path / "store"
    path.write_text(yaml.safe_dump(spec))
    r = wl("run", str(path), "--out", str(store), "--no-progress", "--workers", str(workers))
    assert r.returncode == 0, r.stderr
    return store


def stored_claim(store: Path, out: Path, claim: str) -> dict:
    """One row of the claims table `wrapperlab report STORE --json` computes from what the store holds."""
    r = wl("report", str(store), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    return {c["id"]: c for c in json.loads(r.stdout)["claims"]}[claim]


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, exactly one line on stderr, no traceback, and every needle in that line."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> Path:
    """A finished tiny pretraining run (answer loss), shared by tests that need a parent."""
    out = tmp_path_factory.mktemp("runs") / "pt"
    r = wl("pretrain", "--preset", "cpu", *TINY, "steps=30", "eval.every=15", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def counter(tmp_path_factory) -> Path:
    """A tiny model that really counts `a` (100 % in ~7 s): the subject for analysis tests that need a
    capability to suppress, revive or read."""
    out = tmp_path_factory.mktemp("runs") / "counter"
    r = wl("scratch", "--preset", "cpu", "task.window=32", "model.d_model=32", "model.n_layer=1", "model.n_head=2",
           "threads=1", "steps=400", "batch_size=64", "lr=3e-3", "eval.n=200", "eval.every=400", "family=count",
           "operand=a", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    return out


def need_module(name: str):
    """The module, or skip the test when it is not installed; where CI installs it (WRAPPERLAB_REQUIRE_HF for the
    hf extra), a missing module fails instead of skipping."""
    import importlib

    if os.environ.get("WRAPPERLAB_REQUIRE_HF") and name in ("transformers", "peft"):
        return importlib.import_module(name)
    return pytest.importorskip(name)
