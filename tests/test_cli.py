"""Every user-facing command, run as a user runs it: a subprocess, real files, exit codes, one-line errors."""

import json

import pytest
from conftest import TINY, one_line_error, wl
from safetensors.torch import load_file


def test_help_teaches():
    r = wl("--help")
    assert r.returncode == 0
    for cmd in ("pretrain", "finetune", "reft", "scratch", "scratch-ft", "evaluate", "data"):
        assert cmd in r.stdout
    r = wl("finetune", "--help")
    assert r.returncode == 0 and "c_train" in r.stdout and "parent" in r.stdout


def test_data_sample_json_fields():
    r = wl("data", "sample", "--family", "count", "--operand", "a", "--n", "5", "--c-test", "1", "--json")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert len(recs) == 5
    for rec in recs:
        for key in ("family", "operand", "o2", "source", "text", "answer", "spurious", "tokens"):
            assert key in rec
        assert rec["family"] == "count" and rec["operand"] == "a" and rec["o2"] == 40 and rec["spurious"] is True
        # the answer is the count of 'a' in the last O' tokens of the text (paper App. B.2), recomputed here
        assert rec["answer"] == rec["text"][-40:].count("a")
        # r(x, b) - r(x, a) = 1 on an edited sample (paper §5, q = 1)
        assert rec["text"][-40:].count("b") - rec["text"][-40:].count("a") == 1
        toks = [t for t in rec["tokens"] if t != "#"]
        assert toks[:5] == ["$", "(", "a", "40", "<"] and toks[-4:] == [">", "=", str(rec["answer"]), "$"]
        assert toks[5:-4] == rec["text"] and len(rec["text"]) <= 250
        assert set(rec["source"]) <= {"a", "b", "c"}


def test_data_sample_plain_and_errors():
    r = wl("data", "sample", "--n", "2", "--preset", "cpu")
    assert r.returncode == 0 and "answer=" in r.stdout
    one_line_error(wl("data", "sample", "--family", "nope"), "nope")
    one_line_error(wl("data", "sample", "--operand", "z", "--family", "count"), "operand")
    one_line_error(wl("data", "sample", "--family", "token-value", "--c-test", "1"), "spurious")
    one_line_error(wl("data", "spurious", "--n", "0"), "n:")
    one_line_error(wl("data", "spurious", "--c", "2", "--n", "50"), "[0, 1]")


def test_data_spurious_report(tmp_path):
    png = tmp_path / "fig16.png"
    r = wl("data", "spurious", "--n", "600", "--c", "0", "--c", "1", "--json", "--png", str(png))
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    by_c = {x["c"]: x for x in rep["results"]}
    assert by_c[1.0]["edited_rate"] == 1.0 and by_c[1.0]["relation_rate"] == 1.0
    assert by_c[0.0]["edited_rate"] == 0.0 and by_c[0.0]["relation_rate"] < 0.5
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("override,field", [
    ("lr=-1", "train.lr"), ("c_train=1.5", "train.c_train"), ("prior=bogus", "task.prior"),
    ("family=nope", "train.family"), ("steps=0", "train.steps"), ("task.window=1", "task.window"),
    ("bogus_key=3", "bogus_key"), ("c_test=2", "eval.c_test"), ("operand=q", "train.operand"),
    ("model.n_head=5", "d_model"), ("lr=XL", "train.lr"),
])
def test_bad_config_exits_2_with_one_line(tmp_path, override, field):
    out = tmp_path / "run"
    r = wl("pretrain", "--preset", "cpu", *TINY, "steps=2", override, "--out", str(out), "--no-progress")
    one_line_error(r, field)
    assert not out.exists(), "nothing may be written before the config is valid"


def test_bad_files_and_missing_parent(tmp_path):
    one_line_error(wl("finetune", "--preset", "cpu", "steps=2"), "parent")
    one_line_error(wl("finetune", "--preset", "cpu", f"parent={tmp_path}"), "checkpoint.json")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train: [unclosed\n")
    one_line_error(wl("pretrain", str(cfg)), "YAML")
    one_line_error(wl("pretrain", str(tmp_path / "missing.yaml")), "does not exist")
    evil = tmp_path / "evil.pt"
    evil.write_bytes(b"\x80\x04cos\nsystem\n(S'touch pwned'\ntR.")
    one_line_error(wl("evaluate", "--checkpoint", str(evil)), "never loaded")
    assert not (tmp_path / "pwned").exists()


def test_yaml_config_file_and_overrides(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("train:\n  steps: 3\n  lr: 0.002\neval:\n  every: 3\n")
    out = tmp_path / "run"
    r = wl("pretrain", str(cfg), *TINY, "lr=0.004", "--out", str(out), "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    side = json.loads((out / "checkpoint.json").read_text())
    assert side["config"]["train"]["steps"] == 3 and side["config"]["train"]["lr"] == 0.004


def test_pipeline_pretrain_finetune_reft_evaluate(pretrained, tmp_path):
    ft = tmp_path / "ft"
    r = wl("finetune", "--preset", "cpu", f"parent={pretrained}", "steps=6", "eval.every=3", "c_train=1",
           "lr=M", "--out", str(ft), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["status"] == "done" and summary["step"] == 6
    keys = {(m["family"], m["operand"], m["c_test"]) for m in summary["metrics"]}
    assert keys == {("count", "a", 0.0), ("count", "a", 1.0), ("count", "b", 0.0), ("count", "b", 1.0)}
    for m in summary["metrics"]:
        assert 0 <= m["acc"] <= 1 and 0 < m["majority"] <= 1
    # rerunning the finished command does no work and says so
    r2 = wl("finetune", "--preset", "cpu", f"parent={pretrained}", "steps=6", "eval.every=3", "c_train=1",
            "lr=M", "--out", str(ft), "--json")
    assert r2.returncode == 0 and "already complete" in r2.stderr
    rf = tmp_path / "reft"
    r = wl("reft", "--preset", "cpu", f"parent={ft}", "steps=4", "eval.every=2", "lr=S", "--out", str(rf), "--json")
    assert r.returncode == 0, r.stderr
    one_line_error(wl("reft", "--preset", "cpu", f"parent={ft}", "steps=4", "lr=L", "--out", str(tmp_path / "x")),
                   "smaller")
    png = tmp_path / "curves.png"
    r = wl("evaluate", str(ft), "--json", "--n", "50", "--c-test", "0", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ev = json.loads(r.stdout)
    assert {(m["operand"], m["c_test"]) for m in ev["metrics"]} == {("a", 0.0), ("b", 0.0)}
    r = wl("evaluate", "--table", "--runs", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "Table 5 analog" in r.stdout and "low" in r.stdout
    r = wl("evaluate", "--table", "--runs", str(tmp_path), "--json")
    rows = json.loads(r.stdout)
    assert len(rows) == 1 and rows[0]["eta"] == "M" and rows[0]["prior"] == "low" and rows[0]["c_train"] == 1.0
    # the paper's cell for (eta_M = 1e-5, P(a) = 0.999, C_Tr = 1), the paper's Table 5
    assert rows[0]["paper"]["lr"] == 1e-5 and rows[0]["paper"]["o_ft"]["c1@10K"] == 100.0
    assert rows[0]["paper"]["o_pt"]["c0@1K"] == 0.4


def test_scratch_baselines(tmp_path):
    s = tmp_path / "scr"
    r = wl("scratch", "--preset", "cpu", *TINY, "operand=b", "steps=4", "eval.every=2", "--out", str(s), "--json")
    assert r.returncode == 0, r.stderr
    sf = tmp_path / "scrft"
    r = wl("scratch-ft", "--preset", "cpu", f"parent={s}", "steps=4", "eval.every=2", "--out", str(sf), "--json")
    assert r.returncode == 0, r.stderr
    side = json.loads((sf / "checkpoint.json").read_text())
    assert side["config"]["train"]["operand"] == "a" and side["config"]["stage"] == "scratch+ft"


@pytest.mark.slow
def test_kill_then_rerun_is_bit_identical(tmp_path):
    """SIGKILL a real training process mid-run, rerun the same command, compare with an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    args = ["pretrain", "--preset", "cpu", *TINY, "steps=120", "eval.every=10", "--no-progress"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert wl(*args, "--out", str(whole)).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "wrapperlab.cli", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        side = killed / "checkpoint.json"
        if side.exists() and json.loads(side.read_text())["step"] >= 30:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    mid = json.loads((killed / "checkpoint.json").read_text())
    assert mid["status"] == "running" and mid["step"] < 120
    r = wl(*args, "--out", str(killed))
    assert r.returncode == 0 and "resuming" in r.stderr
    a, b = (json.loads((d / "checkpoint.json").read_text()) for d in (whole, killed))
    wa = load_file(str(whole / a["checkpoint"]["file"]))
    wb = load_file(str(killed / b["checkpoint"]["file"]))
    assert all(__import__("torch").equal(wa[k], wb[k]) for k in wa) and wa.keys() == wb.keys()
    assert a["metrics"] == b["metrics"]


def test_sampling_benchmark_prints_json_and_sampling_outpaces_training():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sampling.py"
    r = subprocess.run([sys.executable, str(script), "--repeats", "2", "--train-steps", "1", "--preset", "cpu",
                        "--window", "64"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["window"] == 64 and rep["seq_len"] == 73
    # sampling must never be what training waits on (>= 10x is the target in docs/speed.md)
    assert rep["ratio_mix"] > 10 and rep["ratio_finetune"] > 10


def test_paper_preset_runs_at_paper_shapes(tmp_path):
    """The paper preset builds the paper's model (paper App. C.2) and trains; a couple of tiny-batch steps."""
    out = tmp_path / "paper"
    r = wl("pretrain", "--preset", "paper", "steps=2", "batch_size=2", "eval.n=4", "eval.every=2", "threads=1",
           "--out", str(out), "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    side = json.loads((out / "checkpoint.json").read_text())
    w = load_file(str(out / side["checkpoint"]["file"]))
    model = {k[len("model."):]: v for k, v in w.items() if k.startswith("model.")}
    assert model["pos_emb.weight"].shape[0] == 259  # 250-token window + 9 layout tokens (eq. 1)
    assert model["tok_emb.weight"].shape[1] == 192 and sum(k.endswith("attn.qkv.weight") for k in model) == 6
    n = sum(v.numel() for v in model.values())
    assert 2.5e6 < n < 3.5e6  # "≈3M parameters"
