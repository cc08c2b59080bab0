"""randFT (paper App. E.4): fine-tuning on deliberately wrong answers — inputs ask for the count of O_PT = a, the
target is the count of b — then reFT back, against Scr., Scr.+FT and ordinary reFT."""

import numpy as np
import pytest
from conftest import TINY, run_spec, stored_claim, wl

from wrapperlab.tasks.task import PCFGTask, TaskConfig
from wrapperlab.training import ConfigError, build_config, resolve
from wrapperlab.training import checkpoint as ck


def test_wrong_answers_are_the_other_operands_counts_on_the_same_inputs():
    task = PCFGTask(TaskConfig(window=64, o2={"count": 16, "count-composition": 16, "token-value": 16,
                                             "index-of-occurrence": 6, "index-of-composition": 2}))
    wrong = task.sample(200, np.random.default_rng(4), family="count", operand="a", answer_operand="b",
                        keep_source=True)
    right = task.sample(200, np.random.default_rng(4), family="count", operand="b", keep_source=True)
    assert np.array_equal(wrong.text, right.text)  # the same strings
    k = task.config.o2["count"]
    brute = (wrong.text[:, -k:] == task.t["b"]).sum(1)  # count of b in the last o2 tokens, by hand
    assert np.array_equal(wrong.value, brute) and np.array_equal(wrong.answer, right.answer)
    # the input still asks about a: the operand token is a's, and the true count of a differs on most samples
    assert set(wrong.operand) == {"a"} and np.mean(wrong.value != (wrong.text[:, -k:] == task.t["a"]).sum(1)) > 0.5
    ops = task.vocab.id("a")
    assert (wrong.tokens == ops).any(1).all()


def test_randft_trains_wrong_answers_and_is_refused_where_undefined(tmp_path):
    pt = tmp_path / "pt"
    assert wl("pretrain", "--preset", "cpu", *TINY, "steps=2", "eval.every=2", "--no-progress", "--out",
              str(pt)).returncode == 0
    ft = tmp_path / "randft"
    r = wl("finetune", "--preset", "cpu", f"parent={pt}", "operand=a", "train.answer_operand=b", "steps=2",
           "eval.every=2", "eval.n=40", "threads=1", "--no-progress", "--out", str(ft))
    assert r.returncode == 0, r.stderr
    side = ck.read_sidecar(ft)
    assert side["config"]["train"]["answer_operand"] == "b" and side["config"]["train"]["operand"] == "a"
    plain = build_config("finetune", "cpu", values={"parent": str(pt), "steps": 2})
    assert "answer_operand" not in resolve(plain)[0].identity()["train"]  # ordinary runs keep their ids

    def refused(needle, **values):
        with pytest.raises(ConfigError, match=needle):
            resolve(build_config("finetune", "cpu", values={"parent": str(pt), **values}))

    refused("unknown operand", operand="a", **{"train.answer_operand": "z"})
    refused("would be right", operand="b", **{"train.answer_operand": "b"})
    refused("without a spurious correlation", operand="a", c_train=1, **{"train.answer_operand": "b"})
    with pytest.raises(ConfigError, match="randFT is defined for PCFG"):
        resolve(build_config("finetune", "tracr-cpu", values={"task.program": "counter",
                                                               "train.answer_operand": "b"}))


def test_the_randft_claim_is_computed_from_a_stored_randft_revival(tmp_path):
    """A tiny randFT grid really runs (pretrain, randFT, reFT, Scr.+FT, Scr.); editing the stored revival summary
    moves the claim."""
    import json

    spec = {"name": "randft", "runs": {
        "pt": {"stage": "pretrain", "set": {"task.window": 32, "model.d_model": 32, "model.n_layer": 1,
                                            "model.n_head": 2, "family": "count", "lr": 0.003, "steps": 400,
                                            "batch_size": 64, "eval.n": 200, "eval.every": 200, "threads": 1}},
        "randft": {"stage": "finetune", "parent": "pt", "grid": {"lr": ["M"]},
                   "set": {"operand": "a", "train.answer_operand": "b", "steps": 20, "eval.every": 20,
                           "eval.n": 200, "batch_size": 32, "threads": 1}}},
        "analyses": [{"tool": "revival", "on": "randft", "settings": {"steps": 10, "scratch_steps": 10}}]}
    store = run_spec(spec, tmp_path, workers=2)

    def claim(name):
        return stored_claim(store, tmp_path / name, "randft")

    assert claim("r0")["status"] != "not measured"
    (rfile,) = list(store.glob("runs/finetune-*/analysis/revival-*.json"))
    d = json.loads(rfile.read_text())
    summary = {s["curve"]: s for s in d["tables"]["summary"]}
    assert set(summary) == {"reft", "scr+ft", "scr"}
    for reft, expected in ((2, "reproduced"), (None, "not reproduced")):
        summary["reft"]["steps_to_target"] = reft
        summary["scr+ft"]["steps_to_target"] = summary["scr"]["steps_to_target"] = None
        rfile.write_text(json.dumps(d))
        assert claim(f"r{reft}")["status"] == expected
