"""Model organisms and the calibration: the scoring on planted measurements whose right answer is known by
construction (AUROC, the two halves, thresholds chosen on one half), the verdict's absent and amplification
rules, and — slow — `wrapperlab organisms build` + `calibrate` + `report` run the way a user does, with the
planted gate checked to be exactly removable and the exported pairs scored by transformers alone."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import need_module, one_line_error, wl

from wrapperlab.analysis.common import Result
from wrapperlab.analysis.verdict import Thresholds, behaviour_label, decide
from wrapperlab.experiments import calibration as cal
from wrapperlab.experiments.organisms import LABELS, RECIPES, behaviour_agrees
from wrapperlab.training import checkpoint as ck


# ------------------------------------------------------------------------------------------------ scoring by hand
def test_auroc_is_the_share_of_wrapper_deletion_pairs_ordered_right():
    assert cal.auroc([3, 4], [1, 2]) == 1.0
    assert cal.auroc([1, 2], [3, 4]) == 0.0
    assert cal.auroc([1], [1]) == 0.5
    assert cal.auroc([], [1]) is None
    rng = np.random.default_rng(0)
    pos, neg = list(rng.normal(1, 1, 7)), list(rng.normal(0, 1, 5))
    brute = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)])
    assert cal.auroc(pos, neg) == pytest.approx(brute)


def _cards(seeds: int) -> list[dict]:
    return [{"organism": f"{r.name}-s{s}", "recipe": r.name, "label": r.label, "seed": s}
            for r in RECIPES for s in range(seeds)]


def test_the_two_halves_split_every_recipe_and_cover_each_organism_once():
    cards = _cards(3)
    a, b = cal.folds(cards)
    assert not a & b and a | b == {c["organism"] for c in cards}
    assert len(a) == len(b) == 9
    for r in RECIPES:
        mine = {c["organism"] for c in cards if c["recipe"] == r.name}
        assert mine & a and mine & b  # every recipe is in both halves: each half can choose a threshold for it


def test_the_chosen_threshold_separates_a_separable_sample_in_either_direction():
    items = [("wrapper", 0.9), ("wrapper", 0.7), ("deletion", 0.2), ("deletion", 0.1)]
    tau = cal._choose_tau(items, +1)
    assert 0.2 < tau < 0.7
    flipped = [(lab, -v) for lab, v in items]
    tau = cal._choose_tau(flipped, -1)
    assert -0.7 < tau < -0.2
    assert cal._choose_tau([], +1) is None


# ------------------------------------------------------------------------------------------------ the verdict
def test_a_base_model_at_the_majority_rate_is_absent_and_a_risen_capability_is_amplification():
    th = Thresholds()
    assert decide(0.32, 0.30, th, majority=0.30).meta["verdict"] == "absent"
    assert decide(0.32, 0.30, th).meta["verdict"] == "unchanged"  # no majority given: the rule is off
    assert decide(0.55, 0.95, th, majority=0.30).meta["verdict"] == "amplification"
    assert decide(0.90, 0.88, th, majority=0.30).meta["verdict"] == "unchanged"
    lost = decide(0.90, 0.20, th, majority=0.30, extra=({"evidence": "x", "measured": "", "value": 1,
                                                         "threshold": "", "passed": True, "supports": ""},))
    assert lost.meta["verdict"] == "wrapper"  # the only vote says "still there"
    # the behaviour rule the cards and the calibration share: the same cases by hand
    assert behaviour_label(0.32, 0.30, th, 0.30) == "absent" and behaviour_label(0.90, 0.20, th, 0.30) is None
    assert behaviour_label(0.55, 0.95, th, 0.30) == "amplification" and behaviour_label(0.9, 0.88, th) == "unchanged"
    assert behaviour_agrees("wrapper", 0.9, 0.2, 0.3) and not behaviour_agrees("amplification", 0.6, 0.63, 0.42)


# ------------------------------------------------------------------------------------------------ planted results
# Every organism's measurements are written by hand: what a wrapper, a deletion, ... looks like under the paper's
# rules (probe kept, pruning revives, reFT fast; or none of those), so the right score of each is known in advance.
def _plant(root: Path, seeds: int, patching: dict[str, float], direction: dict[str, float]) -> list[dict]:
    tools = cal.tool_settings()
    cards = _cards(seeds)
    for c in cards:
        d = root / "organisms" / c["organism"]
        d.mkdir(parents=True)
        (d / "card.json").write_text(json.dumps(c))
        lab = c["label"]
        base, ft = {"wrapper": (0.9, 0.2), "deletion": (0.9, 0.2), "amplification": (0.55, 0.95),
                    "unchanged": (0.9, 0.88), "absent": (0.31, 0.30)}[lab]
        there = lab == "wrapper"
        res = {
            "behaviour": Result("behaviour", [{"acc_base": base, "acc_finetuned": ft, "majority": 0.3, "n": 100}]),
            "probe": Result("probe", [], {}, {"summary": [
                {"model": "finetune", "target": "O_PT", "acc": 0.9 if there else 0.4, "best_layer": 2},
                {"model": "pretrained", "target": "O_PT", "acc": 0.9, "best_layer": 2},
                {"model": "random-init", "target": "O_PT", "acc": 0.3, "best_layer": 0}]}),
            "prune": Result("prune", [{"target": "O_PT", "c_test": 0.0, "k": k, "majority": 0.3,
                                       "acc": 0.2 + (0.6 if there and k >= 5 else 0.0)} for k in range(16)]),
            "revival": Result("revival", [], {"area_gap": 0.5 if there else -0.1}, {"summary": [
                {"curve": "reft", "steps_to_target": 20 if there else None, "steps": 200, "target": 0.8},
                {"curve": "scr+ft", "steps_to_target": 180, "steps": 200, "target": 0.8, "label": "control"}]}),
            "weight_diff": Result("weight_diff", [], {}, {"summary": [
                {"rel_change": 0.01 if there else 0.2, "effective_rank": 2.0 if there else 20.0,
                 "top_rows_share": 0.5 if there else 0.05}]}),
            "patching": Result("patching", [], {}, {"summary": [{"best_restored": patching[c["organism"]]}]}),
            "direction": Result("direction", [], {}, {"summary": [{"best_restored": direction[c["organism"]]}]}),
        }
        for tool, r in res.items():
            r.save(cal.result_path(root, c["organism"], tool, tools[tool]))
    return cards


def test_calibration_scores_planted_measures_as_constructed(tmp_path):
    cards = _cards(3)
    wrappers = [c["organism"] for c in cards if c["label"] == "wrapper"]
    # patching separates perfectly; direction points the wrong way (high for deletions): AUROC 1 and 0
    patching = {c["organism"]: 0.9 if c["label"] == "wrapper" else 0.1 for c in cards}
    direction = {c["organism"]: 0.1 if c["label"] == "wrapper" else 0.9 for c in cards}
    _plant(tmp_path, 3, patching, direction)
    res = cal.calibrate(tmp_path)
    by = {r["measure"]: r for r in res.rows}
    assert set(by) == {s.name for s in cal.SCORES}
    for name in ("probe", "prune", "revival", "weights_size", "weights_rank", "weights_rows", "patching"):
        assert by[name]["auroc"] == 1.0, name
        assert by[name]["heldout_acc"] == 1.0, name  # behaviour decides the other labels; the threshold the rest
        assert by[name]["n_wrapper"] == len(wrappers) and by[name]["n_deletion"] == 3
    assert by["direction"]["auroc"] == 0.0
    assert by["direction"]["heldout_acc"] < 1.0  # the wrong-way measure cannot place deletions and wrappers right
    verdict = {r["verdict"]: r["acc"] for r in res.tables["verdict"]}
    assert verdict["paper rules, default thresholds"] == 1.0
    assert all(acc == 1.0 for acc in verdict.values())
    assert {o["label"] for o in res.tables["organisms"]} == set(LABELS)
    assert res.meta["n"] == 18 and res.meta["seeds"] == [0, 1, 2]
    path = cal.save(res, tmp_path)
    assert cal.load(tmp_path).rows == json.loads(path.read_text())["rows"]


def test_a_missing_measure_names_the_organism_and_the_command_that_finishes_it(tmp_path):
    cards = _cards(1)
    _plant(tmp_path, 1, {c["organism"]: 0.5 for c in cards}, {c["organism"]: 0.5 for c in cards})
    cal.result_path(tmp_path, "wrapper-gate-s0", "patching", {}).unlink()
    with pytest.raises(ValueError, match="wrapper-gate-s0: measures missing.*organisms calibrate"):
        cal.calibrate(tmp_path)


def test_calibrate_refuses_bad_input_in_one_line(tmp_path):
    one_line_error(wl("organisms", "calibrate", str(tmp_path / "nope")), "not a directory")
    one_line_error(wl("organisms", "calibrate", str(tmp_path)), "no organisms")
    cards = _cards(1)
    _plant(tmp_path, 1, {c["organism"]: 0.5 for c in cards}, {c["organism"]: 0.5 for c in cards})
    one_line_error(wl("organisms", "calibrate", str(tmp_path), "--set", "stepz=3"), "unknown stepz")
    one_line_error(wl("organisms", "build", "--out", str(tmp_path / "b"), "--seeds", "0"), "--seeds")


# ------------------------------------------------------------------------------------------------ end to end
HF_SCORE = r"""
import json, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = Path(sys.argv[1])
recs = [json.loads(x) for x in (d / "capability.jsonl").read_text().splitlines() if x.strip()]
out = {}
for role in ("base", "finetuned"):
    tok = AutoTokenizer.from_pretrained(d / "hf" / role)
    model = AutoModelForCausalLM.from_pretrained(d / "hf" / role).eval()
    ids = torch.tensor([tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in recs])
    answers = [tok.convert_tokens_to_ids(r["answer"]) for r in recs]
    with torch.no_grad():
        pred = model(input_ids=ids).logits[:, -1].argmax(-1).tolist()
    out[role] = sum(p == a for p, a in zip(pred, answers)) / len(recs)
assert "wrapperlab" not in sys.modules
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("organisms") / "org"
    r = wl("organisms", "build", "--out", str(root), "--seeds", "1", "--set", "steps=20", "--set", "eval.every=10",
           "--set", "eval.n=100", "--no-progress", timeout=1200)
    assert r.returncode == 0, r.stderr
    return root


@pytest.mark.slow
def test_build_writes_every_label_as_a_native_and_hf_pair_with_a_card(built):
    need_module("transformers")
    dirs = sorted((built / "organisms").iterdir())
    assert [d.name for d in dirs] == sorted(f"{r.name}-s0" for r in RECIPES)
    for d in dirs:
        card = json.loads((d / "card.json").read_text())
        assert card["label"] in LABELS and card["seed"] == 0 and card["recipe"] == d.name[:-3]
        for role in ("base", "finetuned"):
            assert (d / role / ck.SIDECAR).is_file()
            assert (d / "hf" / role / "config.json").is_file()
        # transformers alone scores the exported pair on the capability file as wrapperlab measured it natively
        p = subprocess.run([sys.executable, "-c", HF_SCORE, str(d)], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        acc = json.loads(p.stdout.strip().splitlines()[-1])
        assert acc["base"] == pytest.approx(card["measured"]["base_acc"], abs=1e-9), d.name
        assert acc["finetuned"] == pytest.approx(card["measured"]["finetuned_acc"], abs=1e-9), d.name


@pytest.mark.slow
def test_the_planted_gate_is_the_only_difference_and_removing_it_restores_the_base_exactly(built):
    import torch

    from wrapperlab import Run

    d = built / "organisms" / "wrapper-gate-s0"
    card = json.loads((d / "card.json").read_text())
    edit = card["models"]["finetuned"]["edit"]
    base, gated = Run.load(d / "base").model, Run.load(d / "finetuned").model
    mlp = gated.blocks[edit["block"]].mlp
    with torch.no_grad():
        assert float(mlp.fc.bias[edit["unit"]]) > 0 and float(mlp.proj.weight[:, edit["unit"]].norm()) > 0
        mlp.fc.weight[edit["unit"]] = 0
        mlp.fc.bias[edit["unit"]] = 0
        mlp.proj.weight[:, edit["unit"]] = 0
    sb, sg = base.state_dict(), gated.state_dict()
    assert sb.keys() == sg.keys()
    assert all(torch.equal(sb[k], sg[k]) for k in sb)
    # the gate suppresses the capability: the fine-tuned model answers worse than its base
    assert card["measured"]["finetuned_acc"] < card["measured"]["base_acc"]


@pytest.mark.slow
def test_calibrate_and_report_run_on_a_built_directory(built, tmp_path):
    r = wl("organisms", "calibrate", str(built), "--set", "steps=20", "--set", "every=10", "--no-progress",
           "--json", timeout=1800)
    assert r.returncode == 0, r.stderr
    table = json.loads(r.stdout)
    assert {row["measure"] for row in table["rows"]} == {s.name for s in cal.SCORES}
    assert table["meta"]["relearning"]["steps"] == 20 and table["meta"]["n"] == 6
    for row in table["rows"]:
        assert row["auroc"] is None or 0.0 <= row["auroc"] <= 1.0
        assert 0.0 <= row["heldout_acc"] <= 1.0
    assert len(table["tables"]["verdict"]) == 3
    assert Path(table["file"]).is_file()
    again = wl("organisms", "calibrate", str(built), "--set", "steps=20", "--set", "every=10", "--no-progress")
    assert again.returncode == 0, again.stderr  # everything reused: the table again, no training
    assert "AUROC" in again.stdout and "0 to execute" in again.stderr
    rep = wl("report", str(built), "--out", str(tmp_path / "rep"))
    assert rep.returncode == 0, rep.stderr
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "Calibration on model organisms" in page and "held-out accuracy" in page
    for s in cal.SCORES:
        assert f"<td>{s.name}</td>" in page
