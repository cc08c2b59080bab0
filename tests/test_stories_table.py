"""`wrapperlab stories table | probe | judge`, the story judge and the TinyStories claims, run as a user
runs them (subprocess, real files) at a tiny scale."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line_error, wl

from wrapperlab.tasks.stories import STORY_FEATURES, generate_records, load_shards
from wrapperlab.training.story_judge import JudgeError, load_judge, train_judge

TINY = ["pretrain_steps=30", "delete_steps=6", "recover_steps=6", "columns=[0,2,4,6]", "eval_n=2",
        "max_new_tokens=8", "probe_train=40", "probe_test=20", "probe_iters=20", "batch_size=8",
        "model.d_model=32", "model.n_layer=3", "model.n_head=2", "model.seq_len=64", "vocab_size=360"]
RUNS = ["pretrain", "control"] + [f"{s}-{k}-{e}" for s in ("delete", "recover") for e in "MS"
                                  for k in ("F", "F+R", "F+MM")] + ["recover-control"]


# ------------------------------------------------------------------------------------------------ the judge


def test_judge_learns_the_features_from_labels_and_shuffled_labels_stay_at_the_base_rate():
    """Labels come from the generator (independent of the judge; the exact checker agrees with them)."""
    rng = np.random.default_rng(0)
    train, held = generate_records(3000, rng), generate_records(600, rng)
    judge = train_judge(train, held)
    acc = judge.heldout["accuracy"]
    assert all(acc[f] >= 0.95 for f in STORY_FEATURES), acc
    truth = np.array([[f in r.features for f in STORY_FEATURES] for r in held])
    pred = np.array([[f in judge(r.story) for f in STORY_FEATURES] for r in held])
    assert np.allclose((pred == truth).mean(0), [acc[f] for f in STORY_FEATURES])  # reported = recomputed
    perm = rng.permutation(len(train))
    shuffled = [dataclasses.replace(train[i], features=train[perm[i]].features) for i in range(len(train))]
    blind = train_judge(shuffled, held)
    assert all(blind.heldout["accuracy"][f] <= blind.heldout["base_rate"][f] + 0.03 for f in STORY_FEATURES)


def test_judge_file_round_trips_and_bad_files_are_one_line(tmp_path):
    rng = np.random.default_rng(1)
    judge = train_judge(generate_records(400, rng), generate_records(100, rng), epochs=2)
    path = judge.save(tmp_path / "judge.json")
    back = load_judge(path)
    stories = [r.story for r in generate_records(50, rng)]
    assert np.allclose(back.logits(stories), judge.logits(stories), atol=1e-4)
    assert back.heldout == judge.heldout
    for text, needle in [("{not json", "cannot read"), ('{"format": "x"}', "not a story judge"),
                         (json.dumps({**json.loads(path.read_text()), "weight": [[1.0]]}), "malformed"),
                         (json.dumps({**json.loads(path.read_text()), "features": ["Plot", *STORY_FEATURES[1:]]}),
                          "unknown features")]:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(JudgeError, match=needle) as e:
            load_judge(bad)
        assert "\n" not in str(e.value)


def test_judge_command_trains_reports_and_saves(tmp_path):
    shards = tmp_path / "shards"
    assert wl("stories", "generate", "--out", str(shards), "--shards", "4", "--per-shard", "300").returncode == 0
    r = wl("stories", "judge", "--data", str(shards), "--out", str(tmp_path / "j.json"), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["n_train"] == 900 and res["n_heldout"] == 300  # shards 1-3 train, shard 0 held out
    assert res["accuracy"]["Twist"] >= 0.9
    test = load_shards(shards)[0]
    judge = load_judge(tmp_path / "j.json")
    twist = np.mean([("Twist" in judge(x.story)) == ("Twist" in x.features) for x in test])
    assert twist == pytest.approx(res["accuracy"]["Twist"])
    one_line_error(wl("stories", "judge", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "k.json")),
                   "none")
    assert not (tmp_path / "k.json").exists()


# ------------------------------------------------------------------------------------------ the whole protocol


@pytest.fixture(scope="module")
def protocol(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stories_table")
    shards = tmp / "shards"
    assert wl("stories", "generate", "--out", str(shards), "--shards", "6", "--per-shard", "200").returncode == 0
    out = tmp / "runs"
    r = wl("stories", "table", *TINY, "--data", str(shards), "--out", str(out), "--json", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads(r.stdout)


def _dir(out, name) -> Path:
    """A protocol run's directory by its table name (the summary maps them; the store names them by run id)."""
    return Path(json.loads((out / "stories_table.json").read_text())["runs"][name])


def _side(out, name):
    return json.loads((_dir(out, name) / "checkpoint.json").read_text())


def test_table_trains_the_protocol_and_reports_the_stored_metrics(protocol):
    out, res = protocol
    for name in RUNS:
        side = _side(out, name)
        assert side["status"] == "done", name
    # the chain: every deletion starts from pretrain, every reFT from its deletion (or the control)
    parents = {_side(out, f"delete-{k}-{e}")["parent_id"] for k in ("F", "F+R", "F+MM") for e in "MS"}
    assert parents == {_side(out, "pretrain")["run_id"]}
    assert _side(out, "recover-control")["parent_id"] == _side(out, "control")["run_id"]
    assert _side(out, "control")["config"]["task"]["dataset"] == "filter"
    assert [_side(out, f"delete-F-{e}")["config"]["train"]["lr"] for e in "MS"] == [1e-3, 1e-4]  # the cpu preset's grid
    assert res["columns"] == [0, 2, 4, 6] and res["paper_columns"] == [0, 30, 300, 3000]
    rows = {r["run"]: r for r in res["table1"]}
    assert set(rows) == {n for n in RUNS if n.startswith("recover")}
    for name, row in rows.items():
        metrics = {m["step"]: m for m in _side(out, name)["metrics"]}
        assert sorted(metrics) == [0, 2, 4, 6]  # evaluated exactly at the columns
        for c in (0, 2, 4, 6):
            assert row[f"rate@{c}"] == metrics[c]["score"] and row[f"loss@{c}"] == metrics[c]["heldout_loss"]
            assert row[f"rate@{c}"] * 2 in (0, 1, 2)  # a share of eval_n = 2 generations
    assert rows["recover-F-M"]["paper@30"] == 0.81 and rows["recover-control"]["paper@3000"] == 0.81
    assert rows["recover-F+R-S"]["before_reft_loss"] == _side(out, "delete-F+R-S")["metrics"][-1]["heldout_loss"]
    probes = {r["model"]: r for r in res["probes"]}
    assert set(probes) == {"pretrain", "control"} | {f"delete-{k}-{e}" for e in "MS" for k in ("F", "F+R", "F+MM")}
    (stored,) = [d for d in (json.loads(f.read_text()) for f in (_dir(out, "delete-F-M") / "analysis").glob(
        "feature_probe-*.json")) if d["meta"]["settings"]["pool"] == "last"]
    twist = [x for x in stored["rows"] if x["feature"] == "Twist"]
    assert [x["layer"] for x in twist] == ["B0", "B1"]  # after every block but the last
    assert probes["delete-F-M"]["B1"] == twist[1]["acc"]
    assert json.loads((out / "stories_table.json").read_text())["table1"] == res["table1"]
    # the same probes pooled over the whole story, stored beside the paper's
    by_pool = {json.loads(f.read_text())["meta"]["settings"]["pool"]: json.loads(f.read_text())
               for f in (_dir(out, "delete-F-M") / "analysis").glob("feature_probe-*.json")}
    assert set(by_pool) == {"last", "story"}
    story_twist = [x["acc"] for x in by_pool["story"]["rows"] if x["feature"] == "Twist"]
    assert {r["model"]: r for r in res["probes_story"]}["delete-F-M"]["B1"] == story_twist[1]
    # the final loss split by part, for pretrain and every reFT run, equals the stored analysis
    losses = {r["model"]: r for r in res["losses"]}
    assert set(losses) == {"pretrain"} | {n for n in RUNS if n.startswith("recover")}
    (loss_path,) = (_dir(out, "recover-control") / "analysis").glob("story_loss-*.json")
    stored = {(x["stories"], x["part"]): x for x in json.loads(loss_path.read_text())["rows"]}
    row = losses["recover-control"]
    assert row["feature sentence"] == stored[("with Twist", "feature sentence")]["loss"]
    assert row["without Twist"] == stored[("without Twist", "all")]["loss"]
    parts = [stored[("with Twist", k)] for k in ("instruction", "feature sentence", "rest of story")]
    assert sum(x["tokens"] for x in parts) == stored[("with Twist", "all")]["tokens"]
    assert row["all"] == pytest.approx(sum(x["loss"] * x["tokens"] for x in parts) / sum(x["tokens"] for x in parts))
    assert stored[("with Twist", "feature sentence")]["tokens"] > 0  # windows reach the Twist past the context


def test_claims_read_the_probe_of_the_papers_pooling_whatever_the_file_order(tmp_path):
    """Two feature_probe results on a run (pooled over the last 10 positions and over the story) and one written
    before pooling was a setting: the rule reads the last-10 one (or the old one), the story one only as context."""
    import os

    from wrapperlab.analysis.common import Result
    from wrapperlab.report.claims import Evidence, _twist_probe

    run = tmp_path / "r"
    (run / "analysis").mkdir(parents=True)
    from wrapperlab.training.checkpoint import FORMAT

    (run / "checkpoint.json").write_text(json.dumps({"format": FORMAT, "status": "done", "run_id": "x",
                                                    "stage": "finetune",
                                                    "config": {"task": {"kind": "story"}, "train": {}}}))

    def write(name, acc, settings, mtime):
        path = run / "analysis" / name
        Result("feature_probe", [{"feature": "Twist", "layer": "B0", "acc": acc}], {"settings": settings}).save(path)
        os.utime(path, (mtime, mtime))

    write("feature_probe-last.json", 0.6, {"last": 10, "pool": "last"}, 100)
    write("feature_probe-story.json", 0.9, {"last": 10, "pool": "story"}, 200)  # newest
    (rec,) = Evidence.from_dirs([run]).runs
    assert _twist_probe(rec) == 0.6 and _twist_probe(rec, pool="story") == 0.9
    write("feature_probe-last.json", 0.6, {"last": 10, "pool": "last"}, 300)  # now the newest
    (rec,) = Evidence.from_dirs([run]).runs
    assert _twist_probe(rec) == 0.6 and _twist_probe(rec, pool="story") == 0.9
    (run / "analysis" / "feature_probe-last.json").unlink()
    write("feature_probe-old.json", 0.7, {"last": 10}, 400)  # no pool key: the paper's pooling
    (rec,) = Evidence.from_dirs([run]).runs
    assert _twist_probe(rec) == 0.7 and _twist_probe(rec, pool="story") == 0.9


def test_table_rerun_reuses_every_run_and_prints_the_tables(protocol):
    out, res = protocol
    before = {n: (_dir(out, n) / "checkpoint.json").read_bytes() for n in RUNS}
    r = wl("stories", "table", *TINY, "--data", str(out.parent / "shards"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "0 to execute" in r.stderr  # nothing trained or probed again
    assert {n: (_dir(out, n) / "checkpoint.json").read_bytes() for n in RUNS} == before
    assert "Table 1 analog" in r.stdout and "Fig. 11a analog" in r.stdout
    assert "F+MM (η_S)" in r.stdout and "not in PT (control)" in r.stdout


def test_report_gains_the_tinystories_claims_computed_from_the_runs(protocol, tmp_path):
    out, _ = protocol

    def claims():
        r = wl("report", str(out), "--out", str(tmp_path / "rep"), "--json")
        assert r.returncode == 0, r.stderr
        return {c["id"]: c for c in json.loads(r.stdout)["claims"]}

    c = claims()
    assert c["tinystories"]["cases"] == 6 and c["tinystories-probe"]["cases"] == 6
    assert c["tinystories"]["status"] != "not measured" and c["tinystories-probe"]["status"] != "not measured"
    # the controls beside each case: the probe pooled over the whole story, the final loss split by part
    assert all("pooled over the whole story" in d["text"] for d in c["tinystories-probe"]["details"])
    assert all("loss on the Twist sentence" in d["text"] and "other parts: rest of the story" in d["text"]
               for d in c["tinystories"]["details"])
    side_path = _dir(out, "recover-control") / "checkpoint.json"
    (loss_path,) = (_dir(out, "recover-control") / "analysis").glob("story_loss-*.json")
    original, original_loss = side_path.read_text(), loss_path.read_text()

    def control_twist_loss(v):  # the control's stored loss on the Twist sentence
        d = json.loads(original_loss)
        for x in d["rows"]:
            if (x["stories"], x["part"]) == ("with Twist", "feature sentence"):
                x["loss"] = v
        loss_path.write_text(json.dumps(d))

    recs = [json.loads((_dir(out, f"recover-{k}-{e}") / "checkpoint.json").read_text()) for e in "MS"
            for k in ("F", "F+R", "F+MM")]
    revived = [any(m["score"] > 0 for m in s["metrics"] if m["step"] == 2) for s in recs]
    by_count = "reproduced" if all(revived) else "partial" if any(revived) else "not reproduced"
    try:
        side = json.loads(original)
        for m in side["metrics"]:  # a control that learns Twist at once
            m["score"] = 1.0
        side_path.write_text(json.dumps(side))
        assert claims()["tinystories"]["status"] == "not reproduced"
        for m in side["metrics"]:  # a control that never learns it and ends with the worst whole-text loss ...
            m["score"], m["heldout_loss"] = 0.0, 99.0
        side_path.write_text(json.dumps(side))
        control_twist_loss(99.0)  # ... and the worst loss on the Twist sentence
        assert claims()["tinystories"]["status"] == by_count
        control_twist_loss(0.0)  # the rule reads the Twist sentence, not the whole texts
        assert claims()["tinystories"]["status"] == "not reproduced"
        loss_path.unlink()  # no split stored: the whole texts' held-out loss decides
        got = claims()["tinystories"]
        assert got["status"] == by_count and "no loss split stored" in got["evidence"]
    finally:
        side_path.write_text(original)
        loss_path.write_text(original_loss)


def test_probe_command_writes_results_for_any_story_run(protocol):
    out, _ = protocol
    r = wl("stories", "probe", str(_dir(out, "recover-F-M")), "--n-train", "30", "--n-test", "10", "--iters", "10",
           "--json")
    assert r.returncode == 0, r.stderr
    (res,) = json.loads(r.stdout)["results"]
    assert {x["feature"] for x in res["rows"]} == set(STORY_FEATURES) and res["meta"]["n_test"] == 10
    assert (_dir(out, "recover-F-M") / "analysis" / "feature_probe.json").is_file()
    r = wl("stories", "probe", str(_dir(out, "recover-F-M")), "--n-train", "30", "--n-test", "10", "--iters", "10",
           "--pool", "story", "--json")
    assert r.returncode == 0, r.stderr
    (res,) = json.loads(r.stdout)["results"]
    assert res["meta"]["pooling"] == "mean over the story's positions" and res["meta"]["settings"]["pool"] == "story"
    assert (_dir(out, "recover-F-M") / "analysis" / "feature_probe-story.json").is_file()
    r = wl("stories", "probe", str(_dir(out, "recover-F-M")), "--pool", "middle")
    assert r.returncode == 2 and "--pool" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_table_bad_input_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "runs"
    one_line_error(wl("stories", "table", "pretrain_steps=0", "--out", str(out)), "pretrain_steps")
    one_line_error(wl("stories", "table", "columns=[0,50,20,100]", "--out", str(out)), "columns")
    one_line_error(wl("stories", "table", "flavour=1", "--out", str(out)), "flavour")
    one_line_error(wl("stories", "table", "eta_M=-1", "--out", str(out)), "eta_M")
    one_line_error(wl("stories", "table", "--preset", "paper", "--out", str(out)), "--data")
    one_line_error(wl("stories", "table", "--preset", "huge", "--out", str(out)), "huge")
    one_line_error(wl("stories", "table", "model.d_model=-4", "--out", str(out)), "d_model")
    one_line_error(wl("stories", "table", "--device", "tpu", "--out", str(out)), "device")
    if not torch.cuda.is_available():
        one_line_error(wl("stories", "table", "--device", "cuda", "--out", str(out)), "CUDA")
    (tmp_path / "j.json").write_text("{}")
    one_line_error(wl("stories", "table", "--judge", str(tmp_path / "j.json"), "--out", str(out)), "judge")
    assert not out.exists()
    one_line_error(wl("stories", "probe", str(tmp_path / "nothing")), "nothing")
    one_line_error(wl("stories", "probe", str(tmp_path), "--iters", "0"), "--iters")


def test_report_on_a_store_reads_the_story_runs_beside_it(protocol, tmp_path):
    """`reproduce --stories` puts the protocol in STORE/stories; the store's report counts those runs."""
    import shutil

    from wrapperlab.experiments.store import Store

    out, _ = protocol
    store = tmp_path / "store"
    Store(store)  # an empty store (no PCFG runs)
    shutil.copytree(out, store / "stories", symlinks=True)
    r = wl("report", str(store), "--out", str(tmp_path / "rep"), "--json")
    assert r.returncode == 0, r.stderr
    claims = {c["id"]: c for c in json.loads(r.stdout)["claims"]}
    assert claims["tinystories"]["cases"] == 6 and claims["wrapper"]["status"] == "not measured"
    one_line_error(wl("reproduce", "--preset", "paper", "--stories", "--out", str(tmp_path / "rp")), "--stories")


def test_the_protocol_takes_a_seed_axis_and_one_seed_keeps_its_run_ids(tmp_path):
    from wrapperlab.experiments import stories_table as ST
    from wrapperlab.experiments.plan import build_plan

    p = ST.preset("cpu")
    one = ST.protocol_spec(p, tmp_path / "shards", None, (0,))
    # the construction before seeds were an axis: every group named seed 0 itself
    old = one.model_copy(update={"seeds": [], "runs": {k: g.model_copy(update={"set": {**g.set, "seed": 0}})
                                                      for k, g in one.runs.items()}})
    ids = {tuple(sorted(n.run_id for n in build_plan(s, tmp_path / name).runs())) for name, s in
           (("one", one), ("old", old))}
    assert len(ids) == 1
    two = build_plan(ST.protocol_spec(p, tmp_path / "shards", None, (0, 3)), tmp_path / "two")
    runs = two.runs()
    assert len(runs) == 2 * len(ids.pop())
    for seed in (0, 3):
        named = ST.protocol_runs(p, two, seed)
        assert set(named) == set(RUNS)
        seeds = {two.nodes[n.key].side["config"]["train"]["seed"] for n in runs if Path(n.run_dir) in named.values()}
        assert seeds == {seed}
    assert len(two.analyses("feature_probe")) == 2 * 8 * 2  # both poolings
    assert len(two.analyses("story_loss")) == 2 * 8  # pretrain and the seven reFT runs
    one_line_error(wl("stories", "table", "--seeds", "1,x", "--out", str(tmp_path / "bad")), "--seeds")
    assert not (tmp_path / "bad").exists()
