"""`wrapperlab stories generate | inspect` as a user runs them (subprocess, real files)."""

import json

from conftest import one_line_error, wl

from wrapperlab.tasks.stories import detect_features, load_shards


def test_generate_writes_shards_the_loader_reads_and_the_checker_agrees(tmp_path):
    out = tmp_path / "shards"
    r = wl("stories", "generate", "--out", str(out), "--shards", "4", "--per-shard", "50", "--seed", "3", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    shards = load_shards(out)
    assert [p.split("/")[-1] for p in res["shards"]] == ["data00.json", "data01.json", "data02.json", "data03.json"]
    assert [len(s) for s in shards] == [50] * 4 and res["stories"] == 200
    recs = [x for s in shards for x in s]
    assert all(detect_features(x.story) == set(x.features) for x in recs)
    assert res["feature_counts"]["Twist"] == sum("Twist" in x.features for x in recs)
    again = tmp_path / "again"
    assert wl("stories", "generate", "--out", str(again), "--shards", "4", "--per-shard", "50", "--seed", "3",
              "--json").returncode == 0
    assert [p.read_bytes() for p in sorted(again.iterdir())] == [p.read_bytes() for p in sorted(out.iterdir())]


def test_inspect_reports_splits_and_deletion_datasets(tmp_path):
    out = tmp_path / "shards"
    assert wl("stories", "generate", "--out", str(out), "--shards", "6", "--per-shard", "40").returncode == 0
    r = wl("stories", "inspect", str(out), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["splits"] == {"test": [0], "pretrain": [1, 2, 3, 4], "finetune": [5]}
    ft = load_shards(out)[5]
    rows = {d["dataset"]: d for d in res["datasets"]}
    key = "with Twist in the instruction"
    n_twist = sum("Twist" in x.features for x in ft)
    n_fore_only = sum("Foreshadowing" in x.features and "Twist" not in x.features for x in ft)
    assert rows["all (fine-tuning split)"]["stories"] == 40 and rows["all (fine-tuning split)"][key] == n_twist
    assert rows["F"]["stories"] == 40 - n_twist and rows["F"][key] == 0
    assert rows["F+R"]["stories"] == 40 - n_twist and rows["F+R"][key] == 40 - n_twist
    assert rows["F+MM"][key] == n_fore_only
    assert rows["recovery (Twist stories)"]["stories"] == n_twist


def test_stories_cli_bad_input_is_one_line(tmp_path):
    out = tmp_path / "shards"
    assert wl("stories", "generate", "--out", str(out), "--shards", "3", "--per-shard", "5").returncode == 0
    one_line_error(wl("stories", "generate", "--out", str(out), "--shards", "2", "--per-shard", "5"),
                   "other shards")
    one_line_error(wl("stories", "generate", "--out", str(tmp_path / "x"), "--per-shard", "0"), "--per-shard")
    one_line_error(wl("stories", "generate", "--out", str(tmp_path / "x"), "--feature-rate", "2"), "--feature-rate")
    one_line_error(wl("stories", "inspect", str(out), "--feature", "Plot"), "unknown features")
    one_line_error(wl("stories", "inspect", str(tmp_path / "missing")), "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "data00.json").write_text("{not json")
    one_line_error(wl("stories", "inspect", str(tmp_path / "bad")), "data00.json")


def test_pretrain_delete_recover_commands_chain_and_resume(tmp_path):
    data = tmp_path / "shards"
    assert wl("stories", "generate", "--out", str(data), "--shards", "6", "--per-shard", "60").returncode == 0
    tiny = ["vocab_size=400", "model.d_model=32", "model.n_layer=1", "model.n_head=2", "model.seq_len=64",
            "batch_size=8", "eval_n=2", "max_new_tokens=10", "threads=1"]
    pt = tmp_path / "pt"
    r = wl("stories", "pretrain", *tiny, "steps=20", "eval_every=10", "lr=5e-3", "--data", str(data), "--out",
           str(pt), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["status"] == "done" and [m["step"] for m in res["metrics"]] == [0, 10, 20]
    again = wl("stories", "pretrain", *tiny, "steps=20", "eval_every=10", "lr=5e-3", "--data", str(data), "--out",
               str(pt), "--json")
    assert json.loads(again.stdout)["metrics"] == res["metrics"]  # already complete: nothing retrained
    r = wl("stories", "delete", "steps=10", "eval_every=5", "batch_size=8", "eval_n=2", "max_new_tokens=10",
           "threads=1", "--parent", str(pt), "--kind", "F+MM", "--out", str(tmp_path / "del"), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["status"] == "done" and d["metrics"][0]["heldout_loss"] == res["metrics"][-1]["heldout_loss"]
    r = wl("stories", "recover", "steps=5", "eval_every=5", "batch_size=8", "eval_n=2", "max_new_tokens=10",
           "threads=1", "--parent", str(tmp_path / "del"), "--out", str(tmp_path / "rec"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "done"
    one_line_error(wl("stories", "delete", "--parent", str(pt), "--kind", "F+X", "--out", str(tmp_path / "x")),
                   "dataset")
    one_line_error(wl("stories", "pretrain", "steps", "--data", str(data), "--out", str(tmp_path / "y")),
                   "key=value")
    one_line_error(wl("stories", "recover", "--parent", str(tmp_path / "nope"), "--out", str(tmp_path / "z")),
                   "nope")
