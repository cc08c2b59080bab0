"""Tracr port, tasks and CLI. Tests marked ``needs_tracr`` compare against tracr's own JAX model and run
whenever the extra is installed (CI installs it); the rest use the shipped compiled models and need no JAX."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line_error, wl

from wrapperlab.analysis.attention import attention, mass_on
from wrapperlab.models import tracr as T
from wrapperlab.tasks.tracr_tasks import TracrTask, TracrTaskConfig
from wrapperlab.training.config import ConfigError, build_config
from wrapperlab.training.evaluation import predict
from wrapperlab.training.stage import resolve

try:
    import tracr  # noqa: F401
    HAVE_TRACR = True
except ImportError:
    HAVE_TRACR = False
needs_tracr = pytest.mark.skipif(not HAVE_TRACR, reason="needs the tracr extra (pip install 'wrapperlab[tracr]')")


# ----------------------------------------------------------------------------- port vs tracr
@needs_tracr
@pytest.mark.parametrize("name", list(T.PROGRAMS))
def test_port_matches_tracr_on_1000_random_inputs(name):
    r = T.check_port(name, n=1000, seed=1)
    assert r.ok, r.mismatches[:3]
    assert r.positions >= 1000
    if not r.categorical:
        assert r.max_abs_diff <= 1e-5


@needs_tracr
def test_registry_covers_every_tracr_lib_program():
    import inspect

    from tracr.compiler import lib

    public = {n for n, f in inspect.getmembers(lib, inspect.isfunction) if f.__module__ == lib.__name__}
    covered = {n.removeprefix("make_") for n in public}
    assert covered <= set(T.PROGRAMS) | {"frac_prevs_causal"}, covered - set(T.PROGRAMS)


@needs_tracr
@pytest.mark.parametrize("name", T.SHIPPED)
def test_shipped_models_equal_a_fresh_compile(name):
    fresh, _ = T.compile_and_convert(name)
    assert T.diff_compiled(fresh, T.load(name)) == []


# ----------------------------------------------------------------------------- shipped models, no JAX
def _letters(task: TracrTask, tokens: np.ndarray) -> list[list[str]]:
    return [task.vocab.decode(row[1:]) for row in tokens]


def test_shipped_counter_counts_a_exactly():
    task = TracrTask(TracrTaskConfig(program="counter"))
    b = task.sample(500, np.random.default_rng(0), operand="a")
    truth = [Counter(x)["a"] for x in _letters(task, b.tokens)]  # brute force on the decoded strings
    assert [int(task.output_names[a]) for a in b.answer] == truth
    pred = predict(T.load(task.config.program).build(), task, b.tokens)
    assert (pred == b.answer).all()


def test_shipped_max_identifier_reads_the_fifth_largest():
    task = TracrTask(TracrTaskConfig(program="max-identifier"))
    b = task.sample(500, np.random.default_rng(0), operand="5")
    for x, a in zip(_letters(task, b.tokens), b.answer):
        assert len(set(x)) == 10
        assert task.output_names[a] == sorted(x)[4]  # "largest" = alphabetically first
    assert (predict(T.load(task.config.program).build(), task, b.tokens) == b.answer).all()


@pytest.mark.parametrize("program,o_pt,o_ft", [("counter", "a", "b"), ("max-identifier", "5", "6")])
def test_spurious_samples_satisfy_the_relation(program, o_pt, o_ft):
    task = TracrTask(TracrTaskConfig(program=program))
    b = task.sample(2000, np.random.default_rng(3), operand=o_ft, c=0.5)
    assert 0.45 < b.spurious.mean() < 0.55
    for x, s in zip(_letters(task, b.tokens), b.spurious):
        if program == "counter":
            diff = x.count("b") - x.count("a")
        else:
            srt = sorted(x)
            diff = ord(srt[5]) - ord(srt[4])
        if s:
            assert diff == 1
    ids, ok = task.spurious_answer(b)
    assert ok.all() and (ids[b.spurious] == b.answer[b.spurious]).all()


def test_balance_keeps_the_function():
    cm = T.load("counter")
    x = torch.from_numpy(TracrTask().sample(64, np.random.default_rng(0)).tokens)
    ref = cm.build()(x)
    got = T.balance(cm.build())(x)
    assert torch.allclose(ref, got, atol=1e-3 * ref.abs().max().item())
    assert (ref.argmax(-1) == got.argmax(-1)).all()


def test_counter_block1_head_attends_to_a_at_the_readout():
    """paper App. G, Fig. 40: compiled Counter's block-1 head: the second token (RASP index 1) attends to the a's."""
    task = TracrTask(TracrTaskConfig(program="counter"))
    b = task.sample(200, np.random.default_rng(0), operand="a")
    res = attention(T.load(task.config.program).build(), b.tokens, vocab=task.vocab, query=task.readout, layers=[1])
    k = np.array([Counter(x)["a"] for x in _letters(task, b.tokens)])
    # SelectorWidth: the query attends to BOS and to each selected key equally, so the mass on the a's is k/(k+1)
    assert mass_on(res, 1, 0, "a") == pytest.approx(np.mean(k / (k + 1)), abs=1e-3)
    assert mass_on(res, 1, 0, "BOS") == pytest.approx(np.mean(1 / (k + 1)), abs=1e-3)
    assert mass_on(res, 1, 0, "b") < 1e-3


def test_tampered_compiled_file_is_refused(tmp_path):
    path = T.save(T.load("max-identifier"), tmp_path)
    st = path.with_suffix(".safetensors")
    data = bytearray(st.read_bytes())
    data[-5] ^= 0xFF
    st.write_bytes(bytes(data))
    with pytest.raises(T.TracrError, match="checksum"):
        T.load(path)


def test_tracr_config_rules():
    cfg, _ = resolve(build_config("finetune", "tracr-cpu", overrides=["task.program=max-identifier", "lr=VS"]))
    assert cfg.train.lr == 1e-4 and cfg.train.optimizer == "sgd" and cfg.model.d_model == 79
    with pytest.raises(ConfigError, match="no pretrain stage"):
        resolve(build_config("pretrain", "tracr-cpu"))
    with pytest.raises(ConfigError, match="model.d_model"):
        resolve(build_config("finetune", "tracr-cpu", overrides=["model.d_model=64"]))
    with pytest.raises(ConfigError, match="o_ft"):
        resolve(build_config("finetune", "tracr-cpu", overrides=["task.o_ft=z"]))


# ----------------------------------------------------------------------------- CLI
@needs_tracr
def test_cli_check_and_compile(tmp_path):
    r = wl("tracr", "check", "--program", "length", "--n", "50", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] and doc["results"][0]["mismatches"] == 0
    r = wl("tracr", "compile", "--program", "hist", "--out", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    assert T.load(tmp_path / "hist.json").meta.program == "hist"
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    one_line_error(wl("tracr", "compile", "--program", "hist", "--out", str(blocker)), "out")
    assert blocker.read_text() == "x"


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path):
    one_line_error(wl("tracr", "check", "--program", "nope"), "unknown program")
    one_line_error(wl("tracr", "table", "--lrs", "XL", "--out", str(tmp_path / "t")), "lrs")
    one_line_error(wl("tracr", "table", "--c-train", "2", "--out", str(tmp_path / "t")), "c_train")
    one_line_error(wl("tracr", "finetune", "task.q=0", "--out", str(tmp_path / "f")), "task.q")
    assert not (tmp_path / "t").exists() and not (tmp_path / "f").exists()


def test_cli_finetune_and_table_reuse(tmp_path):
    out = tmp_path / "ft"
    r = wl("tracr", "finetune", "--program", "max-identifier", "lr=VS", "c_train=1", "steps=40",
           "train.warmup_steps=8", "eval.every=20", "eval.n=200", "--out", str(out), "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["status"] == "done" and doc["step"] == 40
    assert {m["operand"] for m in doc["metrics"]} == {"5", "6"}
    grid = tmp_path / "grid"
    args = ("tracr", "table", "--programs", "max-identifier", "--lrs", "VS", "--c-train", "1", "--out", str(grid),
            "--workers", "1", "--json")
    r1 = wl(*args)
    assert r1.returncode == 0, r1.stderr
    rows = json.loads(r1.stdout)["rows"]
    assert [(r["c_test"], r["paper_oft"]) for r in rows] == [(1.0, 90.2), (0.0, 88.6)]  # paper Table 3
    r2 = wl(*args)
    assert "0 to execute" in r2.stderr and json.loads(r2.stdout)["rows"] == rows
    assert Path(rows[0]["run_dir"]).is_dir()


def test_attention_signature_of_a_barely_trained_counter_is_the_compiled_heads(tmp_path):
    """Two steps at η_VS leave the compiled head: the signature's masses are SelectorWidth's k/(k+1) on the a's,
    1/(k+1) on BOS and none on b, on the signature's own inputs."""
    from wrapperlab.analysis.attention import attention_signature

    out = tmp_path / "c"
    r = wl("tracr", "finetune", "lr=VS", "steps=2", "train.warmup_steps=1", "eval.every=2", "eval.n=50",
           "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    sig = attention_signature(out, n=100, seed=3)
    task = TracrTask(TracrTaskConfig(program="counter"))
    b = task.sample(100, np.random.default_rng(3), operand="a")
    k = np.array([Counter(x)["a"] for x in _letters(task, b.tokens)])
    (row,) = sig.rows
    assert row["attn_a"] == pytest.approx(np.mean(k / (k + 1)), abs=0.01)
    assert row["attn_bos"] == pytest.approx(np.mean(1 / (k + 1)), abs=0.01)
    assert row["attn_b"] < 0.01
