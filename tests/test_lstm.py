"""The LSTM family: its forward pass against a hand-written recurrence, its hooks, and its components."""

import pytest
import torch
import torch.nn.functional as F

from wrapperlab.models.lstm import LSTMConfig, LSTMModel
from wrapperlab.models.registry import ComponentError, components, get_family, require


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = LSTMConfig(vocab_size=11, seq_len=16, d_model=8, n_layer=2, **kw)
    return LSTMModel(cfg).double().eval()


def _by_hand(model: LSTMModel, tokens: torch.Tensor) -> torch.Tensor:
    """The LSTM equations written out (i, f, g, o gate order, as PyTorch documents), one time step at a time."""
    x = model.tok_emb.weight[tokens]
    for block in model.blocks:
        ln = F.layer_norm(x, (x.shape[-1],), block.ln.weight, block.ln.bias, block.ln.eps)
        w_ih, w_hh = block.lstm.weight_ih_l0, block.lstm.weight_hh_l0
        b = block.lstm.bias_ih_l0 + block.lstm.bias_hh_l0
        d = w_hh.shape[1]
        h = torch.zeros(x.shape[0], d, dtype=x.dtype)
        c = torch.zeros_like(h)
        outs = []
        for t in range(x.shape[1]):
            gates = ln[:, t] @ w_ih.T + h @ w_hh.T + b
            i, f, g, o = gates[:, :d].sigmoid(), gates[:, d:2 * d].sigmoid(), gates[:, 2 * d:3 * d].tanh(), \
                gates[:, 3 * d:].sigmoid()
            c = f * c + i * g
            h = o * c.tanh()
            outs.append(h)
        x = x + torch.stack(outs, 1)
    x = F.layer_norm(x, (x.shape[-1],), model.ln_final.norm.weight, model.ln_final.norm.bias, model.ln_final.norm.eps)
    return x @ model.head.weight.T


def test_forward_matches_the_lstm_equations():
    model = _model()
    tokens = torch.randint(0, 11, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), _by_hand(model, tokens), rtol=1e-10, atol=1e-10)


def test_causal_and_positions_fast_path():
    model = _model()
    a = torch.randint(0, 11, (2, 10), generator=torch.Generator().manual_seed(2))
    b = a.clone()
    b[:, 7:] = (b[:, 7:] + 1) % 11  # later tokens must not change earlier outputs
    with torch.no_grad():
        la, lb = model(a), model(b)
        torch.testing.assert_close(la[:, :7], lb[:, :7])
        assert not torch.allclose(la[:, 7:], lb[:, 7:])
        torch.testing.assert_close(model(a, positions=-1), la[:, -1])


def test_hooks_read_and_edit_the_stream():
    model = _model()
    tokens = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(3))
    logits, cache = model.run_with_cache(tokens)
    for i in range(2):
        torch.testing.assert_close(cache[f"blocks.{i}.hook_resid_post"],
                                   cache[f"blocks.{i}.hook_resid_pre"] + cache[f"blocks.{i}.hook_lstm_out"])
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], cache["blocks.0.hook_resid_post"])
    zeroed = model.run_with_hooks(tokens, [("blocks.1.hook_lstm_out", lambda x, hook: torch.zeros_like(x))])
    with torch.no_grad():
        expect = model.head(model.ln_final(cache["blocks.1.hook_resid_pre"]))
    torch.testing.assert_close(zeroed, expect)
    assert not torch.allclose(zeroed, logits)


def test_components_and_family_registry():
    model = _model()
    comp = components(model)
    assert comp.family == "lstm" and comp.n_layer == 2 and comp.causal
    assert [h for _, h in comp.residual] == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post",
                                             "blocks.1.hook_resid_post"]
    params = dict(model.named_parameters())
    for m in comp.matrices:  # every prunable matrix and bias exists, rows = 4 gates x d_model
        assert params[m.param].shape[0] == 4 * 8 and params[m.bias].shape == (4 * 8,)
    assert comp.matrix_names == ["lstm.ih", "lstm.hh"]
    with pytest.raises(ComponentError, match="^lstm has no attention pattern$"):
        require(model, "attention")
    built = get_family("lstm").build(LSTMConfig(d_model=4, n_layer=1), 7, 5)
    assert built.head.out_features == 7 and built.cfg.seq_len == 5


def test_lstm_runs_through_the_stages_and_the_analyses(tmp_path):
    """A user picks the family with model.family=lstm; the preset's transformer-only keys (n_head) are dropped;
    probes and pruning work on it; attention is one line naming what is missing."""
    import json

    from conftest import one_line_error, wl

    pt, ft = tmp_path / "pt", tmp_path / "ft"
    common = ["task.window=32", "model.d_model=16", "batch_size=8", "eval.n=40", "threads=1", "--no-progress"]
    r = wl("pretrain", "--preset", "cpu", "model.family=lstm", "model.n_layer=2", "family=count", "steps=20",
           "eval.every=10", *common, "--out", str(pt))
    assert r.returncode == 0, r.stderr
    side = json.loads((pt / "checkpoint.json").read_text())
    assert side["config"]["model"] == {"family": "lstm", "vocab_size": 0, "d_vocab_out": None, "seq_len": 0,
                                       "d_model": 16, "n_layer": 2}
    r = wl("finetune", "--preset", "cpu", f"parent={pt}", "steps=10", "eval.every=5", "c_train=1", "eval.n=40",
           "threads=1", "--no-progress", "--out", str(ft))
    assert r.returncode == 0, r.stderr
    r = wl("analyze", "probe", str(ft), "--n-train", "100", "--n-test", "50", "--iters", "10", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert {x["model"] for x in res["rows"]} == {"finetune", "pretrained", "random-init"}
    assert {x["layer"] for x in res["rows"]} == {"B0", "B1", "B2"}
    r = wl("analyze", "prune", str(ft), "--k-max", "2", "--n-grad", "32", "--n-eval", "40", "--json")
    assert r.returncode == 0, r.stderr
    units = json.loads(r.stdout)["tables"]["units"]
    assert {u["matrix"] for u in units} <= {"lstm.ih", "lstm.hh"} and units[0]["kind"] == "row"
    one_line_error(wl("analyze", "attention", str(ft)), "lstm has no attention pattern")
    one_line_error(wl("analyze", "prune", str(ft), "--matrices", "attn.qkv"), "lstm.ih, lstm.hh")


def test_the_lstm_wrapper_example_spec_plans(tmp_path):
    """examples/lstm-wrapper.yaml (the experiment docs/extending.md reports) stays a valid spec of LSTM runs."""
    import json
    from pathlib import Path

    from conftest import wl

    spec = Path(__file__).resolve().parents[1] / "examples" / "lstm-wrapper.yaml"
    r = wl("run", str(spec), "--out", str(tmp_path / "s"), "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    nodes = json.loads(r.stdout)["nodes"]
    assert sum(n["kind"] == "run" for n in nodes) == 8 and {"verdict", "revival", "probe", "prune"} <= {
        n["key"].split("-")[0] for n in nodes if n["kind"] == "analysis"}
    assert not (tmp_path / "s").exists()  # a dry run writes nothing
