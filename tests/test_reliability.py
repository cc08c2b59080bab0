"""Reliability: kill -9 campaigns, atomic writes under a full disk, files that are data and never code,
concurrent writers of one store, hostile configs."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY, one_line_error, wl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from wrapperlab.experiments.store import Store
from wrapperlab.training import checkpoint as ck

ENV = dict(os.environ, PYTHONHASHSEED="0")


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "wrapperlab.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)


def kill_campaign(args: list[str], kills: int, rng: random.Random, lo: float, hi: float) -> int:
    """Start ``wrapperlab ARGS`` and SIGKILL its whole process group at a random instant, ``kills`` times (a
    start that finishes before its kill ends the campaign early); then run it once more to completion.
    Returns the number of kills delivered."""
    n = 0
    while n < kills:
        proc = _start(args)
        try:
            proc.wait(timeout=rng.uniform(lo, hi))
            break  # finished before the kill
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            n += 1
    r = wl(*args)
    assert r.returncode in (0,), r.stderr[-2000:]
    return n


def assert_same_run(a: Path, b: Path) -> None:
    """Final weights, optimizer state and metrics bit-identical; no temporary file left behind."""
    sa, sb = ck.read_sidecar(a), ck.read_sidecar(b)
    assert sa["status"] == sb["status"] == "done"
    assert sa["step"] == sb["step"] and sa["metrics"] == sb["metrics"]
    ta, tb = load_file(str(a / sa["checkpoint"]["file"])), load_file(str(b / sb["checkpoint"]["file"]))
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=f"{a.name}: {k}")
    assert not [p.name for p in a.iterdir() if ".tmp-" in p.name]
    assert len(list(a.glob("ckpt-*.safetensors"))) == 1


KILL_LOG: dict[str, int] = {}


@pytest.mark.slow
def test_kill_campaign_pretrain_finetune_and_grid_are_bit_identical(tmp_path):
    """At least 20 kill -9 at random instants across pretraining, fine-tuning and a grid run; every rerun finishes
    bit-identical to an uninterrupted run with the same seed, and no store row is left 'running'."""
    rng = random.Random(8)
    base = ["--preset", "cpu", *TINY, "eval.every=20", "--no-progress"]
    pt_args = ["pretrain", *base, "steps=1500"]
    assert wl(*pt_args, "--out", str(tmp_path / "pt-ref")).returncode == 0
    KILL_LOG["pretrain"] = kill_campaign([*pt_args, "--out", str(tmp_path / "pt")], 8, rng, 1.2, 3.0)
    assert_same_run(tmp_path / "pt", tmp_path / "pt-ref")

    child = ["--preset", "cpu", "batch_size=8", "eval.n=40", "threads=1", "eval.every=20", "--no-progress"]
    ft_args = ["finetune", *child, f"parent={tmp_path / 'pt-ref'}", "steps=1500", "c_train=1", "lr=M"]
    assert wl(*ft_args, "--out", str(tmp_path / "ft-ref")).returncode == 0
    KILL_LOG["finetune"] = kill_campaign([*ft_args, "--out", str(tmp_path / "ft")], 6, rng, 1.2, 3.0)
    assert_same_run(tmp_path / "ft", tmp_path / "ft-ref")

    spec = {"name": "kills", "defaults": {"batch_size": 8, "eval.n": 40},
            "runs": {"pt": {"stage": "pretrain", "set": {"task.window": 32, "model.d_model": 32, "model.n_layer": 1,
                                                         "model.n_head": 2, "steps": 300, "eval.every": 20}},
                     "ft": {"stage": "finetune", "parent": "pt", "set": {"steps": 300, "eval.every": 20},
                            "grid": {"lr": ["M", "S"], "c_train": [0, 1]}}},
            "analyses": [{"tool": "prune", "on": "ft", "settings": {"ks": [0, 1, 2], "n_grad": 64, "n_eval": 40}}]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    run = ["run", str(path), "--workers", "2", "--threads", "1", "--no-progress"]
    assert wl(*run, "--out", str(tmp_path / "grid-ref")).returncode == 0
    KILL_LOG["grid"] = kill_campaign([*run, "--out", str(tmp_path / "grid")], 6, rng, 1.5, 4.0)
    ref = {d.name: d for d in (tmp_path / "grid-ref" / "runs").iterdir()}
    got = {d.name: d for d in (tmp_path / "grid" / "runs").iterdir()}
    assert ref.keys() == got.keys() and len(ref) == 5
    for name in ref:
        assert_same_run(got[name], ref[name])
        for res in (ref[name] / "analysis").glob("*.json") if (ref[name] / "analysis").is_dir() else []:
            assert json.loads((got[name] / "analysis" / res.name).read_text())["rows"] == \
                json.loads(res.read_text())["rows"]
    rows = Store(tmp_path / "grid", create=False).runs()
    assert len(rows) == 5 and {r["status"] for r in rows} == {"done"}
    total = sum(KILL_LOG.values())
    print(f"kills delivered: {KILL_LOG} (total {total})")
    assert total >= 20, KILL_LOG


def test_a_run_left_running_by_a_dead_process_is_marked_interrupted(tmp_path):
    store = Store(tmp_path)
    code = ("import sys; from wrapperlab.experiments.store import Store\n"
            "Store(sys.argv[1]).set_status('r1', 'running', stage='pretrain')\n")
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)]).returncode == 0  # that process is gone
    store.set_status("r2", "running", stage="pretrain")  # this one is alive (us)
    assert store.reap_stale() == ["r1"]
    status = {r["run_id"]: r["status"] for r in store.runs()}
    assert status == {"r1": "interrupted", "r2": "running"}
    r = wl("runs", "list", str(tmp_path), "--json")
    assert {x["run_id"]: x["status"] for x in json.loads(r.stdout)}["r1"] == "interrupted"


# ----------------------------------------------------------------------------- full disk
def test_a_failed_write_keeps_the_last_checkpoint_and_the_run_resumes_identically(tmp_path, monkeypatch):
    import errno

    from wrapperlab import fileio
    from wrapperlab.training.config import build_config
    from wrapperlab.training.stage import Stage, resolve

    over = [*TINY, "steps=60", "eval.every=20"]
    ref_cfg, _ = resolve(build_config("pretrain", "cpu", None, over))
    Stage(ref_cfg, None, tmp_path / "ref").run(progress=False)

    real = fileio.atomic_write_bytes
    calls = {"n": 0}

    def full_disk(path, data):
        calls["n"] += 1
        if calls["n"] > 3:  # the first checkpoint (tensors, sidecar, metrics) fits; then the disk is full
            # write part of the temporary file the way a full disk does, then fail
            tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
            tmp.write_bytes(data[: len(data) // 3])
            tmp.unlink()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(ck, "atomic_write_bytes", full_disk)
    monkeypatch.setattr(ck, "atomic_write_text", lambda p, t: full_disk(p, t.encode()))
    cfg, _ = resolve(build_config("pretrain", "cpu", None, over))
    with pytest.raises(OSError):
        Stage(cfg, None, tmp_path / "run").run(progress=False)
    side = ck.read_sidecar(tmp_path / "run")
    assert side["step"] == 20 and side["status"] == "running"
    ck.load_tensors(tmp_path / "run", side)  # the surviving checkpoint verifies
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp-" in p.name]
    monkeypatch.undo()
    Stage(cfg, None, tmp_path / "run").run(progress=False)
    assert_same_run(tmp_path / "run", tmp_path / "ref")


def test_atomic_write_failure_leaves_the_old_file(tmp_path, monkeypatch):
    from wrapperlab import fileio

    target = tmp_path / "f.json"
    fileio.atomic_write_text(target, "old")

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", boom)
    with pytest.raises(OSError):
        fileio.atomic_write_text(target, "new" * 1000)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_temporary_files_of_a_killed_writer_are_swept_on_the_next_run(tmp_path):
    """SIGKILL mid-write leaves `.NAME.tmp-PID` (found by the kill campaign on a loaded machine): the next run of
    that directory removes it when PID is dead, and never touches a live writer's file or the targets."""
    from wrapperlab import fileio
    from wrapperlab.training.config import build_config
    from wrapperlab.training.stage import Stage, resolve

    victim = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    victim.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("kept")
    dead = run / f".metrics.jsonl.tmp-{victim.pid}"
    live = run / f".notes.txt.tmp-{os.getpid()}"
    dead.write_text("partial")
    live.write_text("being written")
    assert fileio.remove_stale_temps(run) == [dead]
    assert sorted(p.name for p in run.iterdir()) == sorted([live.name, "notes.txt"])
    cfg, _ = resolve(build_config("pretrain", "cpu", None, [*TINY, "steps=2", "eval.every=2"]))
    dead.write_text("partial")
    live.unlink()
    Stage(cfg, None, run).run(progress=False)
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]


# ----------------------------------------------------------------------------- files are data
class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['WL_EVIL_MARKER']}",))


def test_a_pickle_is_never_unpickled(tmp_path, pretrained):
    marker = tmp_path / "pwned"
    os.environ["WL_EVIL_MARKER"] = str(marker)
    try:
        payload = pickle.dumps({"model": _Evil()})
    finally:
        del os.environ["WL_EVIL_MARKER"]
    evil = tmp_path / "evil.pt"
    evil.write_bytes(payload)
    one_line_error(wl("evaluate", "--checkpoint", str(evil)), "never loaded")
    # the same bytes smuggled into a run directory, with a forged sidecar whose checksum matches them
    run = tmp_path / "run"
    run.mkdir()
    side = ck.read_sidecar(pretrained)
    side["checkpoint"] = {"file": "ckpt-00000001.safetensors", "sha256": __import__("hashlib").sha256(
        payload).hexdigest(), "bytes": len(payload)}
    (run / "ckpt-00000001.safetensors").write_bytes(payload)
    (run / ck.SIDECAR).write_text(json.dumps(side))
    one_line_error(wl("evaluate", str(run)), "unreadable safetensors")
    assert not marker.exists()


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.pop(next(k for k in t if k.startswith("model."))), "missing"),
    (lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}), "unexpected"),
    (lambda t: t.update({k: np.zeros((2, 2), np.float32) for k in [next(k for k in t if k.endswith("weight"))]}),
     "shape"),
    (lambda t: t.update({k: t[k].astype(np.float64) for k in [next(k for k in t if k.startswith("model."))]}),
     "dtype"),
])
def test_safetensors_with_wrong_names_shapes_or_dtypes_is_refused(tmp_path, pretrained, edit, needle):
    import hashlib

    from safetensors.numpy import save

    side = ck.read_sidecar(pretrained)
    tensors = dict(load_file(str(pretrained / side["checkpoint"]["file"])))
    edit(tensors)
    data = save(tensors)
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt-00000030.safetensors").write_bytes(data)
    side["checkpoint"] = {"file": "ckpt-00000030.safetensors", "sha256": hashlib.sha256(data).hexdigest(),
                          "bytes": len(data)}
    (run / ck.SIDECAR).write_text(json.dumps(side))
    one_line_error(wl("evaluate", str(run)), needle)


def test_truncated_and_bit_flipped_checkpoints_are_named(tmp_path, pretrained):
    import shutil

    for how in ("truncate", "flip"):
        run = tmp_path / how
        shutil.copytree(pretrained, run)
        f = run / ck.read_sidecar(run)["checkpoint"]["file"]
        data = bytearray(f.read_bytes())
        if how == "truncate":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))
        one_line_error(wl("evaluate", str(run)), "checksum mismatch", f.name)


# ----------------------------------------------------------------------------- concurrency
@pytest.mark.slow
def test_two_grids_sharing_a_store_run_concurrently_without_losing_or_corrupting_anything(tmp_path):
    """Two `wrapperlab run` processes (2 workers each) on one store with overlapping grids: shared runs are
    trained once at a time (the run lock), every planned run ends done, every row is there, and the results equal
    a store built sequentially."""
    def spec(lrs):
        return {"name": f"g{len(lrs)}", "defaults": {"batch_size": 8, "eval.n": 40},
                "runs": {"pt": {"stage": "pretrain", "set": {"task.window": 32, "model.d_model": 32,
                                                             "model.n_layer": 1, "model.n_head": 2, "steps": 100,
                                                             "eval.every": 20}},
                         "ft": {"stage": "finetune", "parent": "pt", "set": {"steps": 100, "eval.every": 20},
                                "grid": {"lr": lrs, "c_train": [0, 0.5, 1], "seed": [0, 1]}}}}
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump(spec(["L", "M"])))
    b.write_text(yaml.safe_dump(spec(["M", "S"])))
    procs = [_start(["run", str(p), "--out", str(tmp_path / "shared"), "--workers", "2", "--no-progress"])
             for p in (a, b)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    for p in (a, b):
        assert wl("run", str(p), "--out", str(tmp_path / "seq"), "--workers", "1", "--no-progress").returncode == 0
    rows = Store(tmp_path / "shared", create=False).runs()
    seq = {d.name: d for d in (tmp_path / "seq" / "runs").iterdir()}
    assert len(rows) == len(seq) == 1 + 3 * 3 * 2
    assert {r["status"] for r in rows} == {"done"}
    for r in rows:
        assert_same_run(Path(r["run_dir"]), seq[Path(r["run_dir"]).name])


# ----------------------------------------------------------------------------- hostile configs
KEYS = ["lr", "steps", "c_train", "c_test", "prior", "seed", "batch_size", "loss", "family", "operand", "window",
        "task.o2", "model.d_model", "model.n_head", "train.warmup_frac", "eval.every", "train.optimizer",
        "task.q", "nonsense", "train.nope", "model.n_layer"]
VALUES = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                   st.booleans(), st.none(), st.lists(st.integers(-3, 3), max_size=3))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(KEYS), value=VALUES, stage=st.sampled_from(["pretrain", "scratch"]))
def test_hostile_overrides_fail_as_config_errors_naming_the_field(key, value, stage):
    """Any value for any key either validates or raises ConfigError whose one-line message names the field —
    never another exception."""
    from wrapperlab.training.config import SHORTCUTS, ConfigError, build_config
    from wrapperlab.training.stage import resolve

    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip() \
        if not isinstance(value, str) else value
    try:
        cfg, _ = resolve(build_config(stage, "cpu", None, [*TINY, f"{key}={text}"]))
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg
        field = SHORTCUTS.get(key, key)
        assert field.split(".")[-1] in msg or key in msg or "override" in msg, (key, value, msg)


@pytest.mark.parametrize("override, field", [
    ("c_train=1.5", "c_train"), ("c_train=-0.1", "c_train"), ("lr=0", "train.lr"), ("lr=-1e-3", "train.lr"),
    ("window=100000", "window"), ("operand=z", "operand"), ("family=sorting", "family"),
    ("c_test=[0, 2]", "c_test"), ("steps=ten", "train.steps"), ("model.n_head=5", "n_head"),
])
def test_hostile_cli_input_exits_2_with_one_line(tmp_path, override, field):
    one_line_error(wl("pretrain", "--preset", "cpu", *TINY, override, "--out", str(tmp_path / "r")), field)
    assert not (tmp_path / "r").exists()


SPEC_PATHS = [("name",), ("runs", "pt", "stage"), ("runs", "pt", "preset"), ("runs", "pt", "set"),
              ("runs", "pt", "set", "steps"), ("runs", "pt", "set", "task.window"), ("runs", "ft", "parent"),
              ("runs", "ft", "grid"), ("runs", "ft", "grid", "lr"), ("runs", "ft", "grid", "c_train"),
              ("runs", "ft", "where"), ("runs", "ft", "bogus"), ("runs", "pt", "set", "model.n_head"),
              ("analyses",), ("defaults",), ("defaults", "batch_size"), ("runs",), ("runs", "ft")]
SPEC_VALUES = st.one_of(VALUES, st.dictionaries(st.sampled_from(["lr", "steps", "x", "c_train", "tool", "on"]),
                                                VALUES, max_size=2),
                        st.lists(st.sampled_from(["L", "M", "zz", "1e-3", "-1", "2"]), max_size=3))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(SPEC_PATHS), value=SPEC_VALUES)
def test_hostile_experiment_specs_fail_as_one_line_errors(tmp_path_factory, path, value):
    """Any value at any place of a valid spec either plans or fails as SpecError/ConfigError/AnalysisError with a
    one-line message — never another exception (the CLI turns those into exit 2 with that line)."""
    import copy

    from wrapperlab.analysis.common import AnalysisError
    from wrapperlab.experiments.plan import build_plan
    from wrapperlab.experiments.spec import SpecError, parse_spec
    from wrapperlab.training.config import ConfigError

    spec = copy.deepcopy({"name": "h", "defaults": {"batch_size": 8},
                          "runs": {"pt": {"stage": "pretrain", "set": {"task.window": 32, "model.d_model": 32,
                                                                       "model.n_layer": 1, "model.n_head": 2}},
                                   "ft": {"stage": "finetune", "parent": "pt", "grid": {"lr": ["M", "S"]}}},
                          "analyses": [{"tool": "prune", "on": "ft"}]})
    cur = spec
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = value
    try:
        build_plan(parse_spec(spec), tmp_path_factory.mktemp("store"))
    except (SpecError, ConfigError, AnalysisError) as e:
        assert "\n" not in str(e) and str(e).strip(), repr(e)
