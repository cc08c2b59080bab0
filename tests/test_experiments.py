"""Experiments as data: spec -> plan -> executors -> store, and the CLI commands around them."""

import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import one_line_error, wl

from wrapperlab.experiments.plan import build_plan
from wrapperlab.experiments.spec import SpecError, load_spec, parse_spec
from wrapperlab.experiments.store import Store
from wrapperlab.tasks.priors import resolve_prior
from wrapperlab.training import checkpoint as ck

SHAPE = {"task.window": 32, "model.d_model": 32, "model.n_layer": 1, "model.n_head": 2}


def tiny_spec(**extra) -> dict:
    spec = {
        "name": "tiny",
        "defaults": {"batch_size": 8, "eval.n": 40, "threads": 1},
        "runs": {
            "pt": {"stage": "pretrain", "set": {**SHAPE, "steps": 30, "eval.every": 15}},
            "ft": {"stage": "finetune", "parent": "pt", "set": {"steps": 20, "eval.every": 10},
                   "grid": {"lr": ["M", "S"], "c_train": [0, 1]}},
            "reft": {"stage": "reft", "parent": "ft", "where": {"lr": "M"}, "set": {"steps": 10, "eval.every": 5,
                                                                                     "lr": "S"}},
        },
    }
    spec.update(extra)
    return spec


def write(tmp: Path, spec: dict, name: str = "spec.yaml") -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


# ----------------------------------------------------------------------------- spec and plan
def test_grid_expands_to_the_cartesian_product_below_every_matching_parent(tmp_path):
    spec = parse_spec(tiny_spec(runs={
        "pt": {"stage": "pretrain", "set": SHAPE, "grid": {"seed": [0, 1]}},
        "ft": {"stage": "finetune", "parent": "pt", "grid": {"lr": ["L", "M", "S"], "c_train": [0, 0.5, 1]}},
        "reft": {"stage": "reft", "parent": "ft", "where": {"c_train": [0.5, 1], "lr": "L"}, "grid": {"lr": ["S"]}},
    }))
    plan = build_plan(spec, tmp_path)
    assert len(plan.runs("pt")) == 2
    assert len(plan.runs("ft")) == 2 * 3 * 3
    assert len(plan.runs("reft")) == 2 * 1 * 2  # seeds x (lr=L) x (c in {0.5, 1})
    # every (seed, lr, c_train) combination appears exactly once, with its parent's seed
    pts = sorted((n.point["train.seed"], n.point["train.lr"], n.point["train.c_train"]) for n in plan.runs("ft"))
    assert pts == sorted(itertools.product([0, 1], ["L", "M", "S"], [0, 0.5, 1]))
    for n in plan.runs("reft"):
        parent = plan.nodes[n.deps[0]]
        assert parent.group == "ft" and parent.point["train.lr"] == "L" and parent.point["train.c_train"] in (0.5, 1)
    # nothing was written: planning is pure
    assert not (tmp_path / "runs").exists()


def test_shared_pretraining_is_one_node_and_ids_do_not_depend_on_the_parent_path(tmp_path):
    base = tiny_spec()
    base["runs"]["pt2"] = dict(base["runs"]["pt"])  # the same config under another name
    base["runs"]["ft2"] = {"stage": "finetune", "parent": "pt2", "set": {"steps": 20, "eval.every": 10},
                           "grid": {"lr": ["M"], "c_train": [0]}}
    plan = build_plan(parse_spec(base), tmp_path / "a")
    assert len({n.run_id for n in plan.runs() if n.side["stage"] == "pretrain"}) == 1
    same = [n for n in plan.runs() if n.point.get("train.lr") == "M" and n.point.get("train.c_train") == 0
            and n.group in ("ft", "ft2")]
    assert len(same) == 1  # ft2's only run is ft's (M, 0) run: one node
    other = build_plan(parse_spec(tiny_spec()), tmp_path / "b")  # another store root: same ids
    assert {n.run_id for n in other.runs()} <= {n.run_id for n in plan.runs()}


@pytest.mark.parametrize("mutate, needle", [
    (lambda s: s["runs"]["ft"].update(parent="nope"), "runs.ft.parent"),
    (lambda s: s["runs"]["pt"].update(stage="finetune", parent="reft"), "loop"),
    (lambda s: s["runs"]["ft"].update(stage="train"), "runs.ft.stage"),
    (lambda s: s["runs"]["ft"]["grid"].update(c_train=[0, 2]), "c_train"),
    (lambda s: s["runs"]["ft"]["grid"].update(lr=["XL"]), "train.lr"),
    (lambda s: s["runs"]["pt"].update(preset="gpu"), "runs.pt.preset"),
    (lambda s: s["runs"]["reft"].update(where={"lr": "L"}), "runs.reft.where"),
    (lambda s: s.update(analyses=[{"tool": "prune", "on": "ft", "settings": {"kk": 1}}]), "analyses.0.settings"),
    (lambda s: s.update(analyses=[{"tool": "revival", "on": "pt"}]), "analyses.0.on"),
    (lambda s: s.update(analyses=[{"tool": "cluster", "on": "ft"}]), "analyses.0.tool"),
    (lambda s: s.update(extra=1), "extra"),
])
def test_bad_specs_fail_before_anything_runs_with_one_line(tmp_path, mutate, needle):
    spec = tiny_spec()
    mutate(spec)
    r = wl("run", str(write(tmp_path, spec)), "--out", str(tmp_path / "store"), "--no-progress")
    one_line_error(r, needle)
    assert not (tmp_path / "store" / "runs").exists() or not any((tmp_path / "store" / "runs").iterdir())


def test_yaml_on_key_is_read_as_the_group_name(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(tiny_spec()) + "analyses:\n  - {tool: prune, on: ft}\n")
    assert load_spec(p).analyses[0].on == "ft"
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------- running, reuse, resume
def test_run_executes_the_grid_then_reuses_everything(tmp_path):
    spec = write(tmp_path, tiny_spec())
    store = tmp_path / "store"
    r = wl("run", str(spec), "--out", str(store), "--workers", "2", "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    n_runs = 1 + 4 + 2  # pt, 2x2 ft, reft below the two lr=M runs
    assert (first["planned"], first["executed"], first["reused"], first["failed"]) == (n_runs, n_runs, 0, 0)
    # the store indexes every run directory, and every run directory is a finished run of the planned id
    rows = Store(store, create=False).runs()
    assert len(rows) == n_runs and {r["status"] for r in rows} == {"done"}
    for row in rows:
        side = ck.read_sidecar(row["run_dir"])
        assert side["run_id"] == row["run_id"] and Path(row["run_dir"]).name.endswith(row["run_id"])
    again = json.loads(wl("run", str(spec), "--out", str(store), "--json", "--no-progress").stdout)
    assert (again["executed"], again["reused"]) == (0, n_runs)
    # a grid that adds one run executes only that run
    bigger = tiny_spec()
    bigger["runs"]["ft"]["grid"]["c_train"] = [0, 0.5, 1]
    r = wl("run", str(write(tmp_path, bigger, "bigger.yaml")), "--out", str(store), "--json", "--no-progress")
    res = json.loads(r.stdout)
    # new: ft (M, 0.5) and (S, 0.5), and the reft below (M, 0.5); the 7 earlier runs are reused
    assert (res["planned"], res["executed"], res["reused"]) == (10, 3, n_runs)


def test_killed_grid_resumes_without_redoing_finished_runs(tmp_path):
    spec = tiny_spec()
    spec["runs"]["ft"]["set"] = {"steps": 300, "eval.every": 50}
    path = write(tmp_path, spec)
    store = tmp_path / "store"
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.Popen([sys.executable, "-m", "wrapperlab.cli", "run", str(path), "--out", str(store),
                             "--workers", "1", "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)

    def finished() -> int:
        return sum(1 for d in (store / "runs").glob("*") if (d / ck.SIDECAR).is_file()
                   and ck.read_sidecar(d).get("status") == "done") if (store / "runs").is_dir() else 0

    t0 = time.time()
    while finished() < 2 and time.time() - t0 < 120:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = finished()
    assert 2 <= done_at_kill < 7, done_at_kill
    r = wl("run", str(path), "--out", str(store), "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["reused"] == done_at_kill
    assert res["executed"] == 7 - done_at_kill  # only what was missing ran the second time
    assert finished() == 7


def test_a_failed_node_skips_its_dependants_and_the_rest_completes(tmp_path):
    # matrix names are only known once the model exists: this prune fails when it runs
    spec = tiny_spec(analyses=[
        {"tool": "prune", "on": "ft", "where": {"lr": "S", "c_train": 1}, "settings": {"matrices": ["nope"]}},
        {"tool": "verdict", "on": "ft", "where": {"lr": "S", "c_train": 1}},
        {"tool": "prune", "on": "ft", "where": {"lr": "M", "c_train": 1}, "settings": {"ks": [0, 1], "n_grad": 32,
                                                                                      "n_eval": 20}}])
    path = write(tmp_path, spec)
    r = wl("run", str(path), "--out", str(tmp_path / "store"), "--json", "--no-progress")
    assert r.returncode == 1, r.stderr
    res = json.loads(r.stdout)
    assert (res["planned"], res["failed"], res["skipped"]) == (10, 1, 1)
    assert res["executed"] == 8  # 7 runs + the good prune
    (why,) = res["failures"].values()
    assert "matrices" in why and "nope" in why
    again = json.loads(wl("run", str(path), "--out", str(tmp_path / "store"), "--json", "--no-progress").stdout)
    assert (again["reused"], again["executed"], again["failed"]) == (8, 0, 1)


@pytest.mark.parametrize("analysis, needle", [
    ({"tool": "prune", "on": "ft", "settings": {"ks": [-1, 2]}}, "ks"),
    ({"tool": "revival", "on": "ft", "where": {"lr": "S"}, "settings": {"lr": 1.0}}, "smaller"),
    ({"tool": "attention_signature", "on": "ft", "settings": {"n": 0}}, "n"),
])
def test_bad_analysis_settings_fail_at_planning(tmp_path, analysis, needle):
    spec = tiny_spec(analyses=[analysis])
    one_line_error(wl("run", str(write(tmp_path, spec)), "--out", str(tmp_path / "s"), "--no-progress"),
                   "analyses.0", needle)


def test_store_filters_by_any_config_field(tmp_path):
    store = tmp_path / "store"
    assert wl("run", str(write(tmp_path, tiny_spec())), "--out", str(store), "--no-progress").returncode == 0
    sides = [ck.read_sidecar(d) for d in (store / "runs").iterdir()]

    def brute(pred):
        return sorted(s["run_id"] for s in sides if pred(s))

    cases = [(["stage=finetune"], lambda s: s["stage"] == "finetune"),
             (["lr=0.0002"], lambda s: s["config"]["train"]["lr"] == 2e-4),
             (["stage=finetune", "c_train=1"],
              lambda s: s["stage"] == "finetune" and s["config"]["train"]["c_train"] == 1),
             (["train.steps=10"], lambda s: s["config"]["train"]["steps"] == 10),
             (["task.window=32"], lambda s: True)]
    for where, pred in cases:
        args = [x for w in where for x in ("--where", w)]
        r = wl("runs", "list", str(store), *args, "--json")
        assert r.returncode == 0, r.stderr
        assert sorted(x["run_id"] for x in json.loads(r.stdout)) == brute(pred), where
    rid = brute(lambda s: s["stage"] == "reft")[0]
    r = wl("runs", "show", rid[:6], "--store", str(store), "--json")
    assert json.loads(r.stdout)["run_id"] == rid
    one_line_error(wl("runs", "show", "zzzz", "--store", str(store)), "no run")
    one_line_error(wl("runs", "list", str(tmp_path / "nostore")), "not a wrapperlab store")
    one_line_error(wl("runs", "list", str(store), "--where", "lr"), "--where")


def test_store_keeps_every_row_under_concurrent_writers(tmp_path):
    code = ("import sys; from wrapperlab.experiments.store import Store\n"
            "s = Store(sys.argv[1]); w = sys.argv[2]\n"
            "for i in range(40): s.set_status(f'{w}-{i}', 'queued', stage='finetune', label=w)\n"
            "for i in range(40): s.set_status(f'{w}-{i}', 'done')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), f"w{k}"]) for k in range(6)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    rows = Store(tmp_path, create=False).runs()
    assert sorted(r["run_id"] for r in rows) == sorted(f"w{k}-{i}" for k in range(6) for i in range(40))
    assert {r["status"] for r in rows} == {"done"}
    mode = sqlite3.connect(tmp_path / "store.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


# ----------------------------------------------------------------------------- Ray
def _ray_required() -> bool:
    return bool(os.environ.get("WRAPPERLAB_REQUIRE_RAY"))


@pytest.mark.slow
def test_ray_executor_gives_the_local_executors_results(tmp_path):
    """A local Ray instance (started and stopped here) runs the same spec as the local pool; every run's final
    weights and metrics and every analysis result are identical (same seeds, same thread count)."""
    if not _ray_required():
        pytest.importorskip("ray")
    import socket

    import numpy as np
    from safetensors.numpy import load_file

    spec = tiny_spec(analyses=[{"tool": "prune", "on": "ft", "where": {"c_train": 1},
                                "settings": {"ks": [0, 1, 2], "n_grad": 64, "n_eval": 40}}])
    path = write(tmp_path, spec)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    start = subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                            "--disable-usage-stats"], capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        r = wl("run", str(path), "--out", str(tmp_path / "ray"), "--executor", "ray", "--ray-address",
               f"127.0.0.1:{port}", "--workers", "2", "--threads", "1", "--json", "--no-progress")
        assert r.returncode == 0, r.stderr[-3000:]
        via_ray = json.loads(r.stdout)
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)
    r = wl("run", str(path), "--out", str(tmp_path / "local"), "--workers", "2", "--threads", "1", "--json",
           "--no-progress")
    assert r.returncode == 0, r.stderr
    local = json.loads(r.stdout)
    assert via_ray["executed"] == local["executed"] == via_ray["planned"] and via_ray["failed"] == 0
    ray_runs = {d.name: d for d in (tmp_path / "ray" / "runs").iterdir()}
    local_runs = {d.name: d for d in (tmp_path / "local" / "runs").iterdir()}
    assert ray_runs.keys() == local_runs.keys() and len(ray_runs) == 7
    for name, d in ray_runs.items():
        a, b = ck.read_sidecar(d), ck.read_sidecar(local_runs[name])
        assert a["metrics"] == b["metrics"], name
        ta = load_file(str(d / a["checkpoint"]["file"]))
        tb = load_file(str(local_runs[name] / b["checkpoint"]["file"]))
        assert ta.keys() == tb.keys()
        for k in ta:
            if k.startswith("model."):
                np.testing.assert_array_equal(ta[k], tb[k], err_msg=f"{name} {k}")
        for res in (d / "analysis").glob("*.json") if (d / "analysis").is_dir() else []:
            assert json.loads(res.read_text())["rows"] == \
                json.loads((local_runs[name] / "analysis" / res.name).read_text())["rows"]


# ----------------------------------------------------------------------------- reproduce
@pytest.mark.parametrize("preset", ["quick", "full", "paper"])
def test_reproduce_presets_are_valid_specs_whose_every_config_resolves(tmp_path, preset):
    r = wl("reproduce", "--preset", preset, "--show-spec")
    assert r.returncode == 0, r.stderr
    spec = parse_spec(yaml.safe_load(r.stdout))
    plan = build_plan(spec, tmp_path)  # resolves every run's config (parents included) without training
    groups = {n.group for n in plan.runs()}
    assert {"pt", "counter", "maxid"} <= groups
    tools = {n.group for n in plan.analyses()}
    assert tools == {"probe", "prune", "revival", "verdict", "attention_signature"}
    if preset != "quick":  # the appendix protocols and the Tracr revival are part of the whole grid
        mix = plan.runs("ft_mix")
        assert {n.side["config"]["train"]["pt_mix"] for n in mix} == {0.5, 0.1, 0.001}
        assert {n.side["config"]["task"]["prior"] for n in mix} == {"low", "high"}
        randft = plan.runs("ft_randft")
        assert randft and {(n.side["config"]["train"]["operand"], n.side["config"]["train"]["answer_operand"])
                           for n in randft} == {("a", "b")}
        assert {a.run_id for a in plan.analyses("revival")} >= {n.run_id for n in randft + [
            c for c in plan.runs("counter") if c.point["train.lr"] == "M"]}
    if preset == "paper":
        assert {n.side["config"]["preset"] for n in plan.runs()} == {"paper", "tracr-paper"}
        assert {n.side["config"]["train"]["steps"] for n in plan.runs("pt")} == {200_000, 50_000}


def test_reproduce_rejects_an_unknown_preset():
    one_line_error(wl("reproduce", "--preset", "huge"), "--preset", "quick")


def test_reproduce_prior_adds_the_high_prior_pair_to_quick_and_keeps_quicks_runs(tmp_path):
    """--prior: quick's runs keep their ids, and a high-prior model is fine-tuned at the same η and C_Tr as the
    low-prior ones, with a verdict each (what the prior claim reads); the other presets refuse it."""
    plain = build_plan(parse_spec(yaml.safe_load(wl("reproduce", "--show-spec").stdout)), tmp_path / "a")
    r = wl("reproduce", "--prior", "--show-spec")
    assert r.returncode == 0, r.stderr
    plan = build_plan(parse_spec(yaml.safe_load(r.stdout)), tmp_path / "b")
    assert {n.run_id for n in plain.runs()} < {n.run_id for n in plan.runs()}
    cfg = {n.run_id: n.side["config"] for n in plan.runs()}
    high = plan.runs("ft_high") + plan.runs("ft_high_s")
    low = [n for n in plan.runs() if n.group in ("ft", "ft_spurious", "ft_low_s")]
    (pt_high,) = plan.runs("pt_high")
    assert resolve_prior(pt_high.side["config"]["task"]["prior"]) == resolve_prior("high")
    assert high and all(n.side["config"]["parent"].endswith(pt_high.run_id) for n in high)
    pair = {(cfg[n.run_id]["train"]["lr"], cfg[n.run_id]["train"]["c_train"]) for n in high}
    assert pair <= {(cfg[n.run_id]["train"]["lr"], cfg[n.run_id]["train"]["c_train"]) for n in low}
    assert {a.run_id for a in plan.analyses("verdict")} >= {n.run_id for n in high}
    for preset in ("full", "paper"):
        one_line_error(wl("reproduce", "--preset", preset, "--prior"), "--prior", "already")


@pytest.mark.slow
def test_reproduce_quick_end_to_end(tmp_path):
    """The whole quick preset as a user runs it (~15 min on 2 cores): every node runs, the report is written, and
    every claim that quick measures gets a computed status (whether it reproduces is a result, not asserted)."""
    r = wl("reproduce", "--out", str(tmp_path / "rq"), "--json", "--no-progress", timeout=3000)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["failed"] == 0 and res["executed"] == res["planned"]
    assert Path(res["report"]).is_file()
    status = {c["id"]: c["status"] for c in res["claims"]}
    for cid in ("wrapper", "prune", "probe", "revival", "spurious", "tracr-attention", "tracr-maxid"):
        assert status[cid] != "not measured", (cid, res["claims"])
    assert status["prior"] == status["tinystories"] == status["tinystories-probe"] == "not measured"


@pytest.mark.slow
def test_the_tracr_and_stories_grids_run_on_ray(tmp_path):
    """The Table 3 grid and the TinyStories protocol are ordinary specs: a local Ray instance runs them, and the
    stores they fill are ordinary stores."""
    if not _ray_required():
        pytest.importorskip("ray")
    pytest.importorskip("sentencepiece")
    r = wl("tracr", "table", "--programs", "max-identifier", "--lrs", "VS", "--c-train", "1", "steps=20",
           "train.warmup_steps=4", "eval.every=10", "eval.n=50", "--executor", "ray", "--workers", "1",
           "--out", str(tmp_path / "tracr"), "--json", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)["rows"]
    assert [(x["c_test"], x["status"]) for x in rows] == [(1.0, "done"), (0.0, "done")]
    assert "sort_intact" in rows[0]  # the attention signature node ran too
    listed = json.loads(wl("runs", "list", str(tmp_path / "tracr"), "--json").stdout)
    assert [x["status"] for x in listed] == ["done"]
    shards = tmp_path / "shards"
    assert wl("stories", "generate", "--out", str(shards), "--shards", "4", "--per-shard", "120").returncode == 0
    r = wl("stories", "table", "pretrain_steps=4", "delete_steps=2", "recover_steps=3", "columns=[0,1,2,3]",
           "eval_n=1", "max_new_tokens=4", "probe_train=20", "probe_test=10", "probe_iters=5", "batch_size=4",
           "model.d_model=16", "model.n_layer=2", "model.n_head=2", "model.seq_len=32", "vocab_size=360",
           "--data", str(shards), "--out", str(tmp_path / "stories"), "--executor", "ray", "--workers", "2",
           "--json", timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert len(res["table1"]) == 7 and len(res["probes"]) == 8
    assert all(Path(d).parent == tmp_path / "stories" / "runs" for d in res["runs"].values())
