"""The synthetic jailbreak (paper App. E.2): counting under three task tokens — T_NJ (the ordinary count token,
every operand) and T_J1/T_J2 (``count-j1``/``count-j2``, asked in pretraining only about O_PT) — and the
``jailbreak`` claim that reads only those runs."""

import json

import numpy as np
import pytest
from conftest import run_spec, stored_claim, wl

from wrapperlab.tasks.families import count
from wrapperlab.tasks.task import PCFGTask, TaskConfig
from wrapperlab.tasks.vocab import FAMILY_TOKENS, JAILBREAK_TOKENS
from wrapperlab.training import checkpoint as ck

FIVE = {"count": 1, "count-composition": 1, "index-of-occurrence": 1, "index-of-composition": 1, "token-value": 1}
JAIL = {**FIVE, "count-j1": 0.5, "count-j2": 0.5}


def test_jailbreak_tokens_enter_only_the_vocabularies_that_use_them():
    plain, jail = PCFGTask(TaskConfig(window=64)), PCFGTask(TaskConfig(window=64, families=JAIL))
    assert len(jail.vocab) == len(plain.vocab) + 2
    assert not set(JAILBREAK_TOKENS.values()) & set(plain.vocab.tokens)  # other tasks keep their tokens and ids
    assert plain.vocab.tokens[:11] == ("#", "$", "<", ">", "=", "_", *FAMILY_TOKENS.values())
    assert set(JAILBREAK_TOKENS.values()) <= set(jail.vocab.tokens)
    # at weight 0 the tokens stay in the vocabulary (a child that stops sampling them keeps the model's shape)
    off = PCFGTask(TaskConfig(window=64, families={**JAIL, "count-j1": 0, "count-j2": 0}))
    assert off.vocab == jail.vocab


def test_the_jailbreak_tokens_only_ever_ask_about_o_pt_and_answer_its_count():
    task = PCFGTask(TaskConfig(window=64, prior="high", families=JAIL))
    b = task.sample(3000, np.random.default_rng(1), keep_source=True)
    fam, ops = np.array(b.family), np.array(b.operand)
    o2 = task.config.o2["count"]
    for name, tok in JAILBREAK_TOKENS.items():
        rows = np.flatnonzero(fam == name)
        assert rows.size > 100 and set(ops[rows]) == {"a"}  # the high prior asks b on 30 % of T_NJ samples
        brute = [sum(1 for t in row[-o2:] if t == task.t["a"]) for row in b.text[rows]]  # by hand
        assert list(b.value[rows]) == brute
        assert np.array_equal(b.value[rows], count(b.text[rows], task.t["a"], o2))
        assert (b.tokens[rows, 1] == task.vocab.id(tok)).all()  # the family token right after SOS
    nj = np.flatnonzero(fam == "count")
    assert {"a", "b", "c"} == set(ops[nj])
    # asked explicitly (evaluation), a jailbreak token counts the operand it is given
    e = task.sample(50, np.random.default_rng(2), family="count-j1", operand="a", keep_source=True)
    assert np.array_equal(e.value, count(e.text, task.t["a"], o2))
    specs = task.eval_specs("count", [0.0], True)
    assert ("count-j1", "a", 0.0) in specs and ("count-j2", "a", 0.0) in specs
    assert ("count-j1", "b", 0.0) not in specs


def test_jailbreak_tokens_are_refused_where_the_vocabulary_lacks_them(tmp_path):
    from conftest import TINY, one_line_error

    from wrapperlab.training import ConfigError, build_config, resolve

    one_line_error(wl("data", "sample", "--preset", "cpu", "--family", "count-j1"), "count-j1", "task.families")
    one_line_error(wl("pretrain", "--preset", "cpu", *TINY, "family=count-j2", "--no-progress", "--out",
                      str(tmp_path / "no")), "train.family", "count-j2")
    assert not (tmp_path / "no").exists()
    plain = tmp_path / "pt"
    r = wl("pretrain", "--preset", "cpu", *TINY, "steps=2", "eval.every=2", "--no-progress", "--out", str(plain))
    assert r.returncode == 0, r.stderr
    # the tokens size the vocabulary: a fine-tune cannot add them to (or drop them from) its parent's
    with pytest.raises(ConfigError, match="size the vocabulary"):
        resolve(build_config("finetune", "cpu", values={"parent": str(plain), "task.families": JAIL}))
    resolve(build_config("finetune", "cpu", values={"parent": str(plain), "task.families": {**FIVE, "count": 2}}))


def _run(prior, jail, plain):
    from test_report import pcfg_run

    r = pcfg_run("M", 0.0, post_a=plain, prior=prior)
    r.side["config"]["task"]["families"] = JAIL
    r.side["metrics"] += [{"step": 100, "family": f, "operand": "a", "c_test": 0.0, "acc": jail, "majority": 0.45}
                          for f in ("count-j1", "count-j2")]
    return r


def test_jailbreak_claim_follows_its_rule_and_no_other_claim_reads_jailbreak_runs():
    from wrapperlab.report.claims import (
        NOT_MEASURED,
        NOT_REPRODUCED,
        PARTIAL,
        REPRODUCED,
        Evidence,
        claim_jailbreak,
        claim_prior,
        claim_spurious,
    )

    def status(*runs):
        return claim_jailbreak(Evidence(list(runs)))["status"]

    assert status(_run("high", 0.97, 0.05)) == REPRODUCED
    assert status(_run("high", 0.85, 0.05)) == NOT_REPRODUCED  # not "perfectly"
    assert status(_run("high", 0.95, 0.99)) == NOT_REPRODUCED  # the ordinary token counts a better still
    assert status(_run("high", 0.97, 0.05), _run("medium", 0.5, 0.05)) == PARTIAL
    low = claim_jailbreak(Evidence([_run("low", 0.3, 0.05)]))  # the paper expects no jailbreak: shown, not counted
    assert low["status"] == NOT_MEASURED and "high enough prior" in low["evidence"]
    for claim in (claim_spurious, claim_prior):
        assert claim(Evidence([_run("high", 0.97, 0.05), _run("low", 0.3, 0.05)]))["status"] == NOT_MEASURED


def test_the_jailbreak_claim_is_computed_from_stored_runs(tmp_path):
    """A tiny E.2 grid really runs (its pretraining samples the jailbreak tokens; the fine-tune evaluates them);
    editing a stored metric moves the claim."""
    spec = {"name": "jail", "runs": {
        "pt": {"stage": "pretrain", "set": {"task.window": 32, "model.d_model": 32, "model.n_layer": 1,
                                            "model.n_head": 2, "task.families": JAIL, "prior": "high",
                                            "lr": 0.003, "steps": 20, "batch_size": 32, "eval.n": 100,
                                            "eval.every": 20, "threads": 1}},
        "ft": {"stage": "finetune", "parent": "pt", "set": {"lr": "M", "steps": 4, "eval.every": 4, "eval.n": 100,
                                                           "batch_size": 16, "threads": 1,
                                                           "eval.all_families": True}}}}
    store = run_spec(spec, tmp_path, workers=1)
    (ft,) = store.glob("runs/finetune-*")
    side = ck.read_sidecar(ft)
    assert {(m["family"], m["operand"]) for m in side["metrics"]} >= {("count-j1", "a"), ("count-j2", "a")}

    def claim(name):
        return stored_claim(store, tmp_path / name, "jailbreak")

    assert claim("r0")["status"] != "not measured"
    for jail_acc, expected in ((1.0, "reproduced"), (0.2, "not reproduced")):
        d = json.loads((ft / "checkpoint.json").read_text())
        last = max(m["step"] for m in d["metrics"])
        for m in d["metrics"]:
            if m["step"] == last and m["c_test"] == 0.0 and m["operand"] == "a":
                m["acc"] = jail_acc if m["family"].startswith("count-j") else 0.0 if m["family"] == "count" \
                    else m["acc"]
        (ft / "checkpoint.json").write_text(json.dumps(d))
        assert claim(f"r{jail_acc}")["status"] == expected
