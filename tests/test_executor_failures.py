"""Failures at the edges of an experiment, met the way a user meets them (the CLI as a subprocess, real files):
an unreachable Ray cluster, Ctrl-C or SIGTERM in the middle of a grid, a corrupt store index."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import one_line_error, wl

from wrapperlab.experiments.store import Store
from wrapperlab.training import checkpoint as ck

SHAPE = {"task.window": 32, "model.d_model": 32, "model.n_layer": 1, "model.n_head": 2}
ENV = dict(os.environ, PYTHONHASHSEED="0", COLUMNS="200", RAY_USAGE_STATS_ENABLED="0")


def pretrain_spec(tmp: Path, steps: int, every: int) -> Path:
    spec = {"name": "edge", "defaults": {"batch_size": 8, "eval.n": 40, "threads": 1},
            "runs": {"pt": {"stage": "pretrain", "set": {**SHAPE, "steps": steps, "eval.every": every}}}}
    path = tmp / f"spec-{steps}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finished_store(tmp_path_factory) -> Path:
    """A store holding one finished tiny pretraining run (tests copy it before changing anything)."""
    tmp = tmp_path_factory.mktemp("finished")
    r = wl("run", str(pretrain_spec(tmp, 30, 15)), "--out", str(tmp / "store"), "--workers", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    return tmp / "store"


def rows(store: Path) -> dict[str, str]:
    return {r["run_id"]: r["status"] for r in Store(store, create=False).runs()}


# ----------------------------------------------------------------------------- unreachable Ray cluster
def test_an_unreachable_ray_address_fails_within_30_s_with_one_line_before_the_store_is_touched(
        tmp_path, finished_store):
    """Ray 2.60's ray.init retried 127.0.0.1:1 silently for 12 minutes. `run` and `reproduce` now exit 2 with one
    line naming the address, a fresh store is not even created, and an existing one is left as it was."""
    if not os.environ.get("WRAPPERLAB_REQUIRE_RAY"):
        pytest.importorskip("ray")
    spec = pretrain_spec(tmp_path, 30, 15)
    existing = tmp_path / "existing"
    shutil.copytree(finished_store, existing)
    before = rows(existing)
    ray = ["--executor", "ray", "--ray-address", "127.0.0.1:1", "--no-progress"]
    for args, out in ((["run", str(spec)], tmp_path / "fresh"), (["run", str(spec)], existing),
                      (["reproduce", "--preset", "quick"], tmp_path / "repro")):
        t0 = time.monotonic()
        r = wl(*args, "--out", str(out), *ray, timeout=120)
        wall = time.monotonic() - t0
        one_line_error(r, "executor ray", "127.0.0.1:1")
        assert wall < 30, f"{args[0]}: took {wall:.1f} s"
    assert not (tmp_path / "fresh").exists() and not (tmp_path / "repro").exists()
    assert rows(existing) == before and "running" not in before.values()


# ----------------------------------------------------------------------------- Ctrl-C and SIGTERM
def _group_alive(pgid: int) -> list[str]:
    """Processes of process group ``pgid`` that are still running (zombies waiting for init do not count)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
        if fields[0] != "Z" and int(fields[2]) == pgid:
            alive.append(f"{stat.parent.name}: {text[:80]}")
    return alive


def _wait_for_training(proc: subprocess.Popen, store: Path, timeout: float = 60) -> Path:
    """The run directory, once the store marks the run running and its first checkpoint is on disk."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        try:
            con = sqlite3.connect(store / "store.sqlite", timeout=5)
            try:
                found = con.execute("SELECT run_dir FROM runs WHERE status = 'running'").fetchall()
            finally:
                con.close()
        except sqlite3.Error:
            found = []
        if found and (Path(found[0][0]) / ck.SIDECAR).is_file():
            return Path(found[0][0])
        time.sleep(0.1)
    raise AssertionError("the run never started training")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process groups from /proc")
@pytest.mark.parametrize("sig, code, to_group", [(signal.SIGTERM, 143, False), (signal.SIGINT, 130, True)],
                         ids=["sigterm-to-the-main-process", "ctrl-c-twice-to-the-process-group"])
def test_a_signal_stops_a_pool_run_cleanly_and_the_same_command_resumes(tmp_path, sig, code, to_group):
    """`run --workers 2`: SIGTERM (to the main process, as `kill PID` does) or Ctrl-C pressed twice (SIGINT to the
    whole process group, as a terminal does) ends it within seconds with exit 128+signal and one line, no
    traceback; no process of its group survives; the run it held is `interrupted` in the store (not `partial`: the
    row says why it stopped); no temporary file is left; the same command then finishes the run from its last
    checkpoint."""
    steps = 800
    spec, store = pretrain_spec(tmp_path, steps, 40), tmp_path / "store"
    args = [sys.executable, "-m", "wrapperlab.cli", "run", str(spec), "--out", str(store), "--workers", "2",
            "--threads", "1", "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    try:
        run_dir = _wait_for_training(proc, store)
        t0 = time.monotonic()
        (os.killpg if to_group else os.kill)(proc.pid, sig)
        if to_group:  # the impatient second Ctrl-C, while the first one's cleanup runs
            time.sleep(0.3)
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:  # already gone: stopped in under 0.3 s
                pass
        out, err = proc.communicate(timeout=20)
        stop_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print(f"{signal.Signals(sig).name}: stopped in {stop_s:.2f} s")
    assert proc.returncode == code, err
    assert stop_s < 20
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err and "run the same command again to resume" in lines[-1], err
    assert signal.Signals(sig).name in lines[-1]
    deadline = time.monotonic() + 10
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_alive(proc.pid), _group_alive(proc.pid)
    assert list(rows(store).values()) == ["interrupted"]
    assert not [p for p in store.rglob("*") if ".tmp-" in p.name]
    side = ck.read_sidecar(run_dir)
    assert 0 < side["step"] < steps and side["status"] == "running"  # stopped mid-run, last checkpoint intact

    r = wl(*args[3:], "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["executed"] == 1
    assert ck.read_sidecar(run_dir)["step"] == steps and list(rows(store).values()) == ["done"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process groups from /proc")
def test_workers_end_themselves_when_the_main_process_is_killed_outright(tmp_path):
    """SIGKILL cannot be handled, so the main process cannot end its pool; its workers notice the lost parent and
    stop (found when a killed `reproduce` left two workers training for an hour)."""
    spec, store = pretrain_spec(tmp_path, 800, 40), tmp_path / "store"
    args = [sys.executable, "-m", "wrapperlab.cli", "run", str(spec), "--out", str(store), "--workers", "2",
            "--threads", "1", "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    try:
        _wait_for_training(proc, store)
        assert _group_alive(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_alive(proc.pid), _group_alive(proc.pid)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- corrupt index
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_index_names_the_rebuild_command_which_rebuilds_it_from_the_run_directories(
        tmp_path, finished_store, damage):
    store = tmp_path / "store"
    shutil.copytree(finished_store, store)
    db = store / "store.sqlite"
    for extra in store.glob("store.sqlite-*"):
        extra.unlink()
    bad = os.urandom(4096) if damage == "garbage" else db.read_bytes()[:1000]
    db.write_bytes(bad)

    r = wl("runs", "list", str(store))
    one_line_error(r, "is corrupt", f"wrapperlab runs list {store} --sync")
    one_line_error(wl("runs", "show", "x", "--store", str(store)), "runs list", "--sync")

    r = wl("runs", "list", str(store), "--sync", "--json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert [(x["stage"], x["status"]) for x in listed] == [("pretrain", "done")]
    assert Path(listed[0]["run_dir"]).parent == (store / "runs").resolve()
    aside = list(store.glob("store.sqlite.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == bad  # kept, not deleted
    r = wl("runs", "list", str(store), "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 1, r.stderr


def test_a_missing_index_is_named_and_rebuilt_by_sync(tmp_path, finished_store):
    store = tmp_path / "store"
    shutil.copytree(finished_store, store)
    for f in store.glob("store.sqlite*"):
        f.unlink()
    one_line_error(wl("runs", "list", str(store)), "no store.sqlite", "--sync")
    r = wl("runs", "list", str(store), "--sync", "--json")
    assert r.returncode == 0, r.stderr
    assert [x["status"] for x in json.loads(r.stdout)] == ["done"]
