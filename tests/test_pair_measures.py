"""The measures of a model pair, each on a constructed case whose answer is known: ΔW of a planted rank-1 change,
patching a block that alone carries a change, ablating a direction the base model never uses, and the area of a
relearning curve against a hand-computed trapezoid."""

import copy

import numpy as np
import pytest
import torch
from conftest import one_line_error, wl

from wrapperlab.analysis.capability import Capability, Record, WordTokenizer, curve_area
from wrapperlab.analysis.direction import DirectionSettings, ablated, direction
from wrapperlab.analysis.patching import PatchSettings, patched, patching
from wrapperlab.analysis.weight_diff import WeightDiffSettings, effective_rank, energy_rank, weight_diff

TOKENS = tuple("abcdefghijkl")


def _model(n_layer=3, d=16, seed=0):
    from wrapperlab.models.registry import get_family

    torch.manual_seed(seed)
    fam = get_family("gpt")
    return fam.build(fam.config(d_model=d, n_layer=n_layer, n_head=2), len(TOKENS), 16).eval()


def _greedy_cap(model, n=120, seed=0) -> Capability:
    """Records whose answer is ``model``'s own greedy next token: the model is right on every one by construction."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        prompt = [TOKENS[j] for j in rng.integers(0, len(TOKENS), 4 + i % 3)]
        with torch.no_grad():
            nxt = int(model(torch.tensor([[TOKENS.index(t) for t in prompt]]))[0, -1].argmax())
        records.append(Record(" ".join(prompt), TOKENS[nxt], line=i + 1))
    return Capability.build(records, WordTokenizer(TOKENS), len(TOKENS), 16, "greedy")


def _tokens(seed=1):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, len(TOKENS), (8, 7)))


# --------------------------------------------------------------------------------------------------- ΔW
def test_a_planted_rank_one_change_has_effective_rank_one_and_all_its_mass_in_the_planted_rows():
    base = _model()
    ft = copy.deepcopy(base)
    u = torch.zeros(64)
    u[[3, 7]] = torch.tensor([2.0, -1.0])
    v = torch.randn(16)
    with torch.no_grad():
        ft.blocks[1].mlp.fc.weight += torch.outer(u, v)
    res = weight_diff(base, ft, WeightDiffSettings(top_k=2))
    row = next(r for r in res.rows if r["param"] == "blocks.1.mlp.fc.weight")
    assert row["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    assert row["energy_rank"] == 1
    assert row["top_rows_share"] == pytest.approx(1.0)
    assert row["even_rows_share"] == pytest.approx(2 / 64)
    expect = float(torch.outer(u, v).norm() / base.blocks[1].mlp.fc.weight.detach().norm())
    assert row["rel_change"] == pytest.approx(expect, rel=1e-6)
    assert all(r["delta_norm"] == 0 for r in res.rows if r is not row)
    assert {b["block"]: b["share"] for b in res.tables["blocks"]} == {0: 0.0, 1: pytest.approx(1.0), 2: 0.0}
    s = res.tables["summary"][0]
    assert s["top_block"] == 1 and s["top_matrix"] == "blocks.1.mlp.fc.weight"


def test_effective_and_energy_rank_of_known_spectra():
    assert effective_rank(np.array([1.0, 1.0, 1.0, 1.0])) == pytest.approx(4.0)  # n equal values: n
    assert effective_rank(np.zeros(3)) == 0.0
    assert energy_rank(np.array([1.0, 1.0, 1.0, 1.0]), 0.9) == 4  # three hold 75 %
    assert energy_rank(np.array([3.0, 1.0, 0.0]), 0.9) == 1  # 9 / 10 of the energy
    # a random matrix: the entropy of its singular values, from numpy's SVD
    m = np.random.default_rng(0).normal(size=(6, 5))
    sv = np.linalg.svd(m, compute_uv=False)
    p = sv / sv.sum()
    assert effective_rank(sv) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))


def test_weight_diff_refuses_models_of_different_shapes():
    from wrapperlab.analysis.common import AnalysisError

    with pytest.raises(AnalysisError, match="shapes differ"):
        weight_diff(_model(d=16), _model(d=32))


# --------------------------------------------------------------------------------------------------- patching
def _changed_in_block(base, block: int):
    ft = copy.deepcopy(base)
    with torch.no_grad():
        ft.blocks[block].mlp.proj.weight.mul_(-4.0)
        ft.blocks[block].attn.proj.weight.mul_(3.0)
    return ft


def test_patching_the_block_that_carries_a_change_restores_the_base_model_exactly():
    base = _model()
    ft = _changed_in_block(base, 1)
    x = _tokens()
    with torch.no_grad():
        want_base, want_ft = base(x), ft(x)
        assert not torch.allclose(want_base, want_ft, atol=1e-3)
        torch.testing.assert_close(patched(base, ft, 1)(x), want_base, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(patched(base, ft, 0)(x), want_ft, rtol=1e-5, atol=1e-5)  # nothing differs there
        assert not torch.allclose(patched(base, ft, 2)(x), want_base, atol=1e-3)
        torch.testing.assert_close(patched(base, ft, 2, "resid")(x), want_base, rtol=1e-5, atol=1e-5)

    cap = _greedy_cap(base)
    res = patching(base, ft, cap, PatchSettings())
    s = res.tables["summary"][0]
    assert s["acc_base"] == 1.0 and s["acc_finetuned"] <= 0.9  # the change costs the capability
    rows = {r["block"]: r for r in res.rows}
    assert rows[1]["acc"] == 1.0 and rows[1]["restored"] == pytest.approx(1.0)
    assert rows[0]["acc"] == s["acc_finetuned"] and rows[0]["restored"] == pytest.approx(0.0)
    assert s["best_block"] == 1


# --------------------------------------------------------------------------------------------------- direction
def _unused_coordinate(model, k: int):
    """Zero every write to residual coordinate ``k``: the base model's residual is 0 there at every position."""
    with torch.no_grad():
        model.tok_emb.weight[:, k] = 0
        model.pos_emb.weight[:, k] = 0
        for b in model.blocks:
            for lin in (b.attn.proj, b.mlp.proj):
                lin.weight[k] = 0
                lin.bias[k] = 0
    return model


@pytest.mark.parametrize("mode", ["project", "subtract"])
def test_ablating_a_planted_direction_restores_the_base_model_exactly(mode):
    k = 5
    base = _unused_coordinate(_model(), k)
    ft = copy.deepcopy(base)
    with torch.no_grad():
        ft.blocks[0].mlp.proj.bias[k] = 6.0  # a shift along e_k after block 0, at every position
    cap = _greedy_cap(base)
    res = direction(base, ft, cap, DirectionSettings(mode=mode))
    rows = {r["boundary"]: r for r in res.rows}
    assert rows["B0"]["norm"] == 0.0  # the embeddings agree
    assert rows["B1"]["norm"] == pytest.approx(6.0, rel=1e-5)
    s = res.tables["summary"][0]
    assert s["acc_base"] == 1.0 and s["acc_finetuned"] <= 0.9
    assert rows["B1"]["acc"] == 1.0 and rows["B1"]["restored"] == pytest.approx(1.0)
    dirs = torch.zeros(4, 16)
    dirs[1, k] = 6.0
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(ablated(ft, dirs, 1, mode)(x), base(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------- relearning
def test_curve_area_is_the_trapezoid_over_the_steps_run_relative_to_the_base_accuracy():
    steps, accs = [0, 10, 20, 40], [0.2, 0.6, 0.8, 0.8]
    hand = (10 * (0.2 + 0.6) / 2 + 10 * (0.6 + 0.8) / 2 + 20 * 0.8) / 40 / 0.8
    assert curve_area(steps, accs, 0.8) == pytest.approx(hand)
    assert curve_area([0, 5, 100], [0.8, 0.8, 0.8], 0.8) == pytest.approx(1.0)  # at the base accuracy throughout
    assert curve_area([0], [0.5], 0.8) is None and curve_area([0, 5], [0.5, 0.5], 0.0) is None


# --------------------------------------------------------------------------------------------------- the CLI
def test_pair_measures_from_the_command_line_on_exported_models(tmp_path):
    """Two gpt runs' models written as Hugging Face directories, measured by the CLI as a user would."""
    pytest.importorskip("transformers")
    from wrapperlab.models.hf_export import word_level_tokenizer, write_hf

    base = _model(n_layer=2)
    ft = _changed_in_block(base, 1)
    files = word_level_tokenizer(TOKENS)
    write_hf(base, tmp_path / "base", files)
    write_hf(ft, tmp_path / "ft", files)
    cap = tmp_path / "cap.jsonl"
    import json

    cap.write_text("".join(json.dumps({"prompt": r.prompt, "answer": r.answer}) + "\n"
                           for r in _greedy_cap(base, 60).records))
    pair = ["--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"), "--capability", str(cap)]
    r = wl("analyze", "weights", *pair, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tables"]["summary"][0]["top_block"] == 1
    r = wl("analyze", "patching", *pair, "--json", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    rows = {x["block"]: x for x in json.loads(r.stdout)["rows"]}
    assert rows[1]["acc"] == 1.0
    assert (tmp_path / "o" / "patching.json").is_file()
    r = wl("analyze", "direction", *pair, "--set", "mode=subtract", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["meta"]["settings"]["mode"] == "subtract"
    one_line_error(wl("analyze", "direction", *pair, "--set", "mode=sideways"), "mode")
    one_line_error(wl("analyze", "patching", "--finetuned", str(tmp_path / "ft"), "--capability", str(cap)),
                   "--base")
