"""Fine-tuning with pretraining data mixed in (paper App. E.1): each sample of a fine-tuning batch comes from the
pretraining distribution with probability ``train.pt_mix``; the ``pt-mix`` claim reads those runs alone."""

import collections
import json

import numpy as np
import pytest
from conftest import TINY, one_line_error, run_spec, stored_claim, wl

from wrapperlab.training import ConfigError, build_config, resolve
from wrapperlab.training import checkpoint as ck
from wrapperlab.training.stage import Stage


@pytest.fixture(scope="module")
def pt(tmp_path_factory):
    """A tiny five-family, low-prior pretraining run (operand a on 999 of 1,000 samples)."""
    out = tmp_path_factory.mktemp("ptmix") / "pt"
    r = wl("pretrain", "--preset", "cpu", *TINY, "steps=2", "eval.every=2", "--no-progress", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def _stage(pt, tmp_path, **values):
    cfg, parent = resolve(build_config("finetune", "cpu", values={"parent": str(pt), "c_train": 1, **values}))
    return Stage(cfg, parent, tmp_path / "ft")


def test_mixed_batches_hold_the_share_of_pretraining_samples_asked_for(pt, tmp_path):
    plain = _stage(pt, tmp_path)
    mixed = _stage(pt, tmp_path, **{"train.pt_mix": 0.5})
    assert "pt_mix" not in plain.cfg.identity()["train"]  # ordinary fine-tunes keep their run ids
    assert mixed.cfg.identity() != plain.cfg.identity()
    ft_rows = pt_rows = 0
    for step in range(40):
        b = mixed.sample_batch(step)
        assert len(b) == mixed.cfg.train.batch_size and b.tokens.shape[1] == plain.sample_batch(step).tokens.shape[1]
        # a fine-tuning sample asks for the count of b with the spurious edit; a pretraining sample has a family
        # from the five-family mix and an operand from the low prior (a), and is never edited
        is_ft = np.array([f == "count" and o == "b" for f, o in zip(b.family, b.operand)]) & b.spurious
        assert not b.spurious[~is_ft].any()
        ft_rows += int(is_ft.sum())
        pt_rows += int((~is_ft).sum())
        fams = collections.Counter(np.array(b.family)[~is_ft])
        assert set(fams) <= {"count", "count-composition", "index-of-occurrence", "index-of-composition",
                             "token-value"}
    share = pt_rows / (pt_rows + ft_rows)
    n = pt_rows + ft_rows
    assert abs(share - 0.5) < 4 * (0.25 / n) ** 0.5  # binomial: within 4 standard errors of the share asked for
    every = _stage(pt, tmp_path, **{"train.pt_mix": 1.0}).sample_batch(0)
    assert not every.spurious.any() and len(set(every.family)) > 1
    # the unmixed batch is exactly the one the stage drew before mixing existed
    assert np.array_equal(plain.sample_batch(3).tokens, plain.task.sample(
        plain.cfg.train.batch_size, np.random.default_rng([0, 3]), family="count", operand="b", c=1.0).tokens)


def test_mixed_samples_follow_the_parents_own_pretraining_data(tmp_path):
    """A parent pretrained on the count family alone (quick's shortcut) gets count samples mixed in, not the
    five-family mix its task config still names."""
    counting = tmp_path / "pt-count"
    r = wl("pretrain", "--preset", "cpu", *TINY, "family=count", "steps=2", "eval.every=2", "--no-progress",
           "--out", str(counting))
    assert r.returncode == 0, r.stderr
    b = _stage(counting, tmp_path, **{"train.pt_mix": 1.0}).sample_batch(0)
    assert set(b.family) == {"count"} and not b.spurious.any()
    assert set(b.operand) <= {"a", "b", "c"} and "a" in set(b.operand)


def test_pt_mix_runs_and_is_refused_where_undefined(pt, tmp_path):
    out = tmp_path / "mix"
    r = wl("finetune", "--preset", "cpu", f"parent={pt}", "train.pt_mix=0.1", "steps=2", "eval.every=2",
           "eval.n=40", "threads=1", "--no-progress", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert ck.read_sidecar(out)["config"]["train"]["pt_mix"] == 0.1
    for stage, preset, extra, needle in (("pretrain", "cpu", (), "not a pretrain stage"),
                                         ("finetune", "tracr-cpu", ("task.program=counter",), "tracr task"),
                                         ("finetune", "cpu", (f"parent={pt}", "train.pt_mix=2"), "pt_mix")):
        args = (*extra, "train.pt_mix=0.5") if "train.pt_mix=2" not in extra else extra
        r = wl(stage, "--preset", preset, *args, "--no-progress", "--out", str(tmp_path / "refused"))
        one_line_error(r, needle)
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ConfigError, match="pt_mix"):
        resolve(build_config("reft", "cpu", values={"parent": str(out), "train.pt_mix": 0.5}))
    with pytest.raises(ConfigError, match="one appendix protocol"):
        resolve(build_config("finetune", "cpu", values={"parent": str(pt), "operand": "a", "train.pt_mix": 0.5,
                                                        "train.answer_operand": "b"}))


def _run(mix, post_a, post_b, prior="low", seed=0):
    from test_report import pcfg_run

    r = pcfg_run("M", 1.0, post_a=post_a, post_b1=post_b, prior=prior)
    r.side["config"]["train"]["pt_mix"] = mix
    r.side["config"]["train"]["seed"] = seed
    return r


def test_pt_mix_claim_follows_its_rule_and_no_other_claim_reads_mixed_runs():
    from wrapperlab.report.claims import (
        NOT_MEASURED,
        NOT_REPRODUCED,
        PARTIAL,
        REPRODUCED,
        Evidence,
        claim_pt_mix,
        claim_spurious,
    )

    def status(*runs):
        return claim_pt_mix(Evidence(list(runs)))["status"]

    # Fig. 19: with more pretraining data mixed in, O_PT falls less; Fig. 18: the FT task is learned alike
    assert status(_run(0.001, 0.05, 1.0), _run(0.1, 0.40, 1.0), _run(0.5, 0.90, 0.97)) == REPRODUCED
    assert status(_run(0.001, 0.05, 1.0), _run(0.1, 0.40, 1.0), _run(0.5, 0.30, 0.97)) == PARTIAL  # 0.30 < 0.40-0.06
    assert status(_run(0.001, 0.05, 1.0), _run(0.1, 0.04, 1.0), _run(0.5, 0.90, 0.97)) == REPRODUCED  # 0.04 ok
    assert status(_run(0.001, 0.90, 1.0), _run(0.5, 0.05, 0.5)) == NOT_REPRODUCED  # both rules fail
    # the high prior is judged on the FT gains only (its captions state nothing about O_PT)
    c = claim_pt_mix(Evidence([_run(0.001, 0.9, 1.0, "high"), _run(0.5, 0.1, 0.95, "high")]))
    assert c["status"] == REPRODUCED and c["cases"] == 1
    assert status(_run(0.5, 0.9, 1.0)) == NOT_MEASURED  # one mix alone compares nothing
    plain = _run(0.0, 0.05, 1.0)
    plain.side["config"]["train"].pop("pt_mix")
    assert status(plain, _run(0.5, 0.9, 1.0)) == NOT_MEASURED  # an ordinary fine-tune is not a mix
    assert claim_spurious(Evidence([_run(0.5, 0.9, 1.0)]))["status"] == NOT_MEASURED


def test_the_pt_mix_claim_is_computed_from_stored_runs(tmp_path):
    """A tiny E.1 grid really runs; editing a stored metric moves the claim."""
    spec = {"name": "ptmix", "runs": {
        "pt": {"stage": "pretrain", "set": {"task.window": 32, "model.d_model": 32, "model.n_layer": 1,
                                            "model.n_head": 2, "family": "count", "lr": 0.003, "steps": 40,
                                            "batch_size": 32, "eval.n": 100, "eval.every": 40, "threads": 1}},
        "mix": {"stage": "finetune", "parent": "pt", "grid": {"train.pt_mix": [0.5, 0.001]},
                "set": {"lr": "M", "c_train": 1, "steps": 4, "eval.every": 4, "eval.n": 100, "batch_size": 16,
                        "threads": 1}}}}
    store = run_spec(spec, tmp_path, workers=1)

    def claim(name):
        return stored_claim(store, tmp_path / name, "pt-mix")

    assert claim("r0")["status"] != "not measured"
    sides = {ck.read_sidecar(d)["config"]["train"]["pt_mix"]: d for d in store.glob("runs/finetune-*")}
    assert set(sides) == {0.5, 0.001}

    def set_final(run_dir, operand, c_test, acc):
        path = run_dir / "checkpoint.json"
        side = json.loads(path.read_text())
        last = max(m["step"] for m in side["metrics"])
        for m in side["metrics"]:
            if m["step"] == last and m["operand"] == operand and m["c_test"] == c_test and m["family"] == "count":
                m["acc"] = acc
        path.write_text(json.dumps(side))

    for mixed_a, expected in ((0.9, "reproduced"), (0.0, "partial")):
        set_final(sides[0.001], "a", 0.0, 0.1)
        set_final(sides[0.5], "a", 0.0, mixed_a)
        for d in sides.values():
            set_final(d, "b", 1.0, 0.99)
        assert claim(f"r{mixed_a}")["status"] == expected
