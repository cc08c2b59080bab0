"""`wrapperlab analyze ...` run as a user runs it: subprocesses, real run directories, files on disk."""

import json

import pytest
from conftest import one_line_error, wl

from wrapperlab.training import checkpoint as ck

LABELS = {"wrapper", "deletion", "amplification", "unchanged", "undetermined"}


@pytest.fixture(scope="module")
def finetuned(pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "ft"
    r = wl("finetune", "--preset", "cpu", f"parent={pretrained}", "c_train=1", "steps=20", "eval.every=10",
           "batch_size=8", "eval.n=40", "threads=1", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    return out


def test_probe_prune_attention_verdict_write_tables_and_figures(finetuned, tmp_path):
    od = tmp_path / "an"
    r = wl("analyze", "probe", str(finetuned), "--out", str(od), "--n-train", "200", "--n-test", "100",
           "--iters", "30", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert {x["model"] for x in res["rows"]} == {"finetune", "pretrained", "random-init"}
    assert {x["layer"] for x in res["rows"]} == {"B0", "B1"}  # embedding + the one block
    assert (od / "probe.png").stat().st_size > 0 and json.loads((od / "probe.json").read_text())["tool"] == "probe"

    r = wl("analyze", "prune", str(finetuned), "--out", str(od), "--k-max", "3", "--n-grad", "64", "--n-eval", "50",
           "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert sorted({x["k"] for x in res["rows"]}) == [0, 1, 2, 3]
    assert {(x["target"], x["c_test"]) for x in res["rows"]} == {("O_PT", 0), ("O_PT", 1), ("O_FT", 0), ("O_FT", 1)}
    assert len(res["tables"]["units"]) >= 3 and (od / "prune.png").stat().st_size > 0

    r = wl("analyze", "attention", str(finetuned), "--out", str(od), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    masses = {}
    for x in res["rows"]:
        masses[(x["layer"], x["head"])] = masses.get((x["layer"], x["head"]), 0) + x["mass"]
    assert all(abs(m - 1) < 1e-4 for m in masses.values()) and len(masses) == 2  # each row of a softmax sums to 1
    # the one example drawn is named with its family, operand and answer (the figure's title)
    assert res["meta"]["family"] == "count" and res["meta"]["operand"] == "a" and res["meta"]["answer"].isdigit()
    page = (od / "attention.html").read_text()
    assert "<canvas" in page and "src=" not in page and "http" not in page  # self-contained, no CDN
    assert (od / "attention.png").stat().st_size > 0

    r = wl("analyze", "verdict", str(finetuned), "--out", str(od), "--no-revival", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["meta"]["verdict"] in LABELS and "reusing" in r.stderr
    assert {x["evidence"] for x in res["rows"]} == {"behaviour", "probe", "prune"}
    assert all("threshold" in x and x["threshold"] for x in res["rows"])
    r = wl("analyze", "verdict", str(finetuned), "--out", str(od), "--no-revival")
    assert r.returncode == 0 and "verdict:" in r.stdout


def test_revival_trains_reft_and_baselines_with_one_recipe(finetuned, tmp_path):
    od = tmp_path / "an"
    r = wl("analyze", "revival", str(finetuned), "--out", str(od), "--steps", "20", "--scratch-steps", "20",
           "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    summ = {x["curve"]: x for x in res["tables"]["summary"]}
    assert set(summ) == {"reft", "scr+ft", "scr"}
    ft_lr = ck.read_sidecar(finetuned)["config"]["train"]["lr"]
    cfgs = {c: ck.read_sidecar(summ[c]["run"])["config"] for c in summ}
    assert cfgs["reft"]["train"]["lr"] < ft_lr  # the paper's rule
    for c in ("scr+ft", "scr"):  # the same recipe as reFT
        for key in ("lr", "steps", "batch_size", "warmup_frac", "min_lr_frac", "optimizer", "operand"):
            assert cfgs[c]["train"][key] == cfgs["reft"]["train"][key], (c, key)
    assert cfgs["scr"]["parent"] is None
    assert ck.read_sidecar(cfgs["scr+ft"]["parent"])["config"]["train"]["operand"] == "b"
    steps = sorted(x["step"] for x in res["rows"] if x["curve"] == "reft")
    assert steps == sorted(set(range(0, 21, 2)) | {1, 5})  # every 20 // 10 steps, plus log-spaced 1, 2, 5, 10, 20
    for c, s in summ.items():  # steps_to_target recomputed from the curve
        pts = sorted((x for x in res["rows"] if x["curve"] == c), key=lambda x: x["step"])
        hit = next((x["step"] for x in pts if x["acc"] >= s["target"]), None)
        assert s["steps_to_target"] == hit
    # a second call reuses the finished runs
    r2 = wl("analyze", "revival", str(finetuned), "--out", str(od), "--steps", "20", "--scratch-steps", "20", "--json")
    assert r2.returncode == 0 and json.loads(r2.stdout)["tables"] == res["tables"]
    assert (od / "revival.png").stat().st_size > 0


def test_analyze_bad_input_gets_one_line(finetuned, pretrained, tmp_path):
    one_line_error(wl("analyze", "probe", str(tmp_path / "missing")), "run", "missing")
    one_line_error(wl("analyze", "prune", str(finetuned), "--unit", "head", "--out", str(tmp_path)), "unit")
    one_line_error(wl("analyze", "prune", str(finetuned), "--matrices", "nope", "--out", str(tmp_path)), "matrices")
    one_line_error(wl("analyze", "verdict", str(pretrained), "--out", str(tmp_path)), "finetune")
    one_line_error(wl("analyze", "verdict", str(finetuned), "--set", "bogus=1", "--out", str(tmp_path)), "--set")
    one_line_error(wl("analyze", "verdict", str(finetuned), "--set", "prune_gain=2", "--out", str(tmp_path)),
                   "prune_gain")
    one_line_error(wl("analyze", "revival", str(pretrained), "--out", str(tmp_path)), "finetune")
    one_line_error(wl("analyze", "revival", str(finetuned), "--lr", "XL", "--out", str(tmp_path)), "lr")
    one_line_error(wl("analyze", "revival", str(finetuned), "--lr", "1", "--out", str(tmp_path)), "lr")
    one_line_error(wl("analyze", "attention", str(finetuned), "--layers", "5", "--out", str(tmp_path)), "layers")
    one_line_error(wl("analyze", "probe", str(finetuned), "--iters", "0", "--out", str(tmp_path)), "iters")
    (tmp_path / "bad.json").write_text("{not json")
    bad = tmp_path / "badout"
    bad.mkdir()
    (bad / "probe.json").write_text("{not json")
    one_line_error(wl("analyze", "verdict", str(finetuned), "--out", str(bad), "--no-revival"), "probe.json")
    assert not list(tmp_path.glob("**/verdict.json"))  # nothing written on failure
