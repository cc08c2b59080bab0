"""The minGPT-style Transformer and its hook points.

Expected values come from `reference_forward` below: a from-scratch forward pass in plain torch ops that reads
the model's parameters but none of its code (no module is called), or from explicit formulas.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wrapperlab.models import HookPoint, ModelConfig, Transformer

TINY = {"vocab_size": 20, "seq_len": 16, "d_model": 32, "n_layer": 2, "n_head": 4}
F64 = {"atol": 1e-10, "rtol": 1e-10}

# The options for other model families (module docstring), alone and all together.
VARIANTS = {
    "default": {},
    "non_causal": {"causal": False},
    "relu": {"act": "relu"},
    "no_norm": {"norm": "none"},
    "d_head": {"d_head": 12},  # 4 heads x 12 = 48 != d_model 32
    "attn_scale": {"attn_scale": 0.37},
    "tracr_like": {"norm": "none", "act": "relu", "causal": False, "d_head": 5, "attn_scale": 0.5,
                   "bias": False, "d_mlp": 24},
}


def expected_hook_names(n_layer: int) -> set[str]:
    """The hook names listed in the module docstring."""
    per_block = ["hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern",
                 "attn.hook_z", "hook_attn_out", "hook_resid_mid", "mlp.hook_pre", "mlp.hook_post",
                 "hook_mlp_out", "hook_resid_post"]
    names = {"hook_embed", "hook_pos_embed", "ln_final.hook_normalized"}
    return names | {f"blocks.{l}.{n}" for l in range(n_layer) for n in per_block}


def make_model(dtype=torch.float64, seed=0, randomize=True, **overrides) -> Transformer:
    """A tiny model. `randomize` replaces the GPT-2 init (zero biases, unit LayerNorms) by random values, so
    that a forward pass that ignored a bias or a LayerNorm affine would be caught."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**TINY, **overrides})).to(dtype)
    if randomize:
        with torch.no_grad():
            for name, p in model.named_parameters():
                is_ln_weight = ".ln" in f".{name}" and name.endswith("weight")
                p.copy_((1.0 if is_ln_weight else 0.0) + 0.2 * torch.randn_like(p))
    return model.eval()


def make_tokens(b=3, t=16, seed=1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (b, t), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- the reference


def _linear(x, lin):
    y = x @ lin.weight.T
    return y if lin.bias is None else y + lin.bias


def _layer_norm(x, ln, enabled):
    if not enabled:
        return x
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias


def reference_forward(model: Transformer, tokens: torch.Tensor, edits=None):
    """Pre-LN GPT forward pass written out by hand. Returns (logits, activations by hook name); `edits` maps a
    hook name to a function applied to that activation (an ablation done by hand)."""
    cfg, edits = model.cfg, edits or {}
    b, t = tokens.shape
    h = cfg.n_head
    dh = cfg.d_head if cfg.d_head is not None else cfg.d_model // cfg.n_head
    scale = cfg.attn_scale if cfg.attn_scale is not None else 1 / math.sqrt(dh)
    ln = cfg.norm == "layernorm"
    if cfg.act == "gelu":
        act = lambda u: 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))  # exact (erf) GELU
    else:
        act = lambda u: u.clamp(min=0)
    future = torch.ones(t, t, dtype=torch.bool).triu(1)  # key j > query i
    acts = {}

    def at(name, x):
        x = edits.get(name, lambda u: u)(x)
        acts[name] = x
        return x

    x = at("hook_embed", model.tok_emb.weight[tokens]) + at("hook_pos_embed", model.pos_emb.weight[:t])
    for l, blk in enumerate(model.blocks):
        p = f"blocks.{l}."
        x = at(p + "hook_resid_pre", x)
        qkv = _linear(_layer_norm(x, blk.ln1, ln), blk.attn.qkv).split(h * dh, dim=-1)
        q, k, v = (at(p + f"attn.hook_{n}", z.reshape(b, t, h, dh).transpose(1, 2))  # (b, head, pos, dh)
                   for n, z in zip("qkv", qkv))
        scores = (q @ k.transpose(-1, -2)) * scale
        if cfg.causal:
            scores = scores.masked_fill(future, -math.inf)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))  # softmax over keys, written out
        pattern = at(p + "attn.hook_pattern", weights / weights.sum(-1, keepdim=True))
        z = at(p + "attn.hook_z", pattern @ v)
        attn_out = at(p + "hook_attn_out", _linear(z.transpose(1, 2).reshape(b, t, h * dh), blk.attn.proj))
        x = at(p + "hook_resid_mid", x + attn_out)
        pre = at(p + "mlp.hook_pre", _linear(_layer_norm(x, blk.ln2, ln), blk.mlp.fc))
        post = at(p + "mlp.hook_post", act(pre))
        x = at(p + "hook_resid_post", x + at(p + "hook_mlp_out", _linear(post, blk.mlp.proj)))
    final = at("ln_final.hook_normalized", _layer_norm(x, model.ln_final.norm, ln))
    return final @ model.head.weight.T, acts


def noop(x, hook):
    return None


def no_hooks_attached(model: Transformer) -> bool:
    return all(not hp.fns for hp in model.modules() if isinstance(hp, HookPoint))


# ------------------------------------------------------------------------------------------------ 1. forward


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_reference(variant):
    model = make_model(**VARIANTS[variant])
    for t in (16, 7):  # full context and a shorter sequence
        tokens = make_tokens(t=t)
        with torch.no_grad():
            logits = model(tokens)
            expected, _ = reference_forward(model, tokens)
        assert logits.shape == (3, t, TINY["vocab_size"])
        torch.testing.assert_close(logits, expected, **F64)


def test_attention_matches_torch_multihead_attention():
    """A second, independent witness for one attention layer: torch's nn.MultiheadAttention, same weights."""
    model = make_model()
    attn, d = model.blocks[0].attn, TINY["d_model"]
    mha = nn.MultiheadAttention(d, TINY["n_head"], batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
        x = torch.randn(2, 10, d, dtype=torch.float64)
        mask = torch.ones(10, 10, dtype=torch.bool).triu(1)
        expected, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
        torch.testing.assert_close(attn(x), expected, **F64)


# ---------------------------------------------------------------------------------------------- 2. causality


@pytest.mark.parametrize("path", ["fast", "explicit"])
@pytest.mark.parametrize("causal", [True, False])
def test_causality(causal, path):
    model = make_model(causal=causal)
    hooks = [] if path == "fast" else [(lambda n: n.endswith("hook_pattern"), noop)]
    tokens = make_tokens()
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        a, b = model.run_with_hooks(tokens, hooks), model.run_with_hooks(changed, hooks)
    assert (a[:, 9:] - b[:, 9:]).abs().amax() > 1e-6  # the changed position itself always moves
    early_change = (a[:, :9] - b[:, :9]).abs().amax()
    if causal:
        assert early_change < 1e-12
    else:
        assert early_change > 1e-6


# --------------------------------------------------------------------------------------------- 3. positions=


def test_positions_fast_path_equals_slicing():
    model = make_model()
    tokens = make_tokens()
    with torch.no_grad():
        full = model(tokens)
        last = model(tokens, positions=-1)
        idx = torch.tensor([0, 5, 15])
        some = model(tokens, positions=idx)
    assert last.shape == (3, TINY["vocab_size"])
    torch.testing.assert_close(last, full[:, -1], **F64)
    assert some.shape == (3, 3, TINY["vocab_size"])
    torch.testing.assert_close(some, full[:, idx], **F64)


# ---------------------------------------------------------------------------------------- 4. hooks and cache


def test_hook_names_are_the_documented_ones():
    model = make_model(n_layer=3)
    assert set(model.hook_dict) == expected_hook_names(3)
    for name, hp in model.hook_dict.items():
        assert isinstance(hp, HookPoint) and hp.name == name
        assert model.get_submodule(name) is hp  # the name is the module path, as in TransformerLens


@pytest.mark.parametrize("variant", ["default", "tracr_like"])
def test_run_with_cache_matches_reference(variant):
    model = make_model(**VARIANTS[variant])
    cfg, tokens = model.cfg, make_tokens()
    with torch.no_grad():
        plain = model(tokens)
    logits, cache = model.run_with_cache(tokens)
    expected_logits, expected = reference_forward(model, tokens)

    torch.testing.assert_close(logits, plain, **F64)
    torch.testing.assert_close(logits, expected_logits, **F64)
    assert set(cache) == expected_hook_names(cfg.n_layer)
    for name in expected:
        torch.testing.assert_close(
            cache[name], expected[name], **F64, msg=lambda m, name=name: f"{name}: {m}"
        )
        assert not cache[name].requires_grad  # detach=True by default
    assert no_hooks_attached(model)


def test_cache_shapes():
    model = make_model(d_head=12, d_mlp=40)
    (b, t), d, h = (3, 11), TINY["d_model"], TINY["n_head"]
    _, cache = model.run_with_cache(make_tokens(b, t))
    assert cache["hook_embed"].shape == (b, t, d)
    assert cache["hook_pos_embed"].shape[-2:] == (t, d)
    assert cache["ln_final.hook_normalized"].shape == (b, t, d)
    for l in range(TINY["n_layer"]):
        p = f"blocks.{l}."
        for n in ["hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"]:
            assert cache[p + n].shape == (b, t, d), n
        for n in ["attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z"]:
            assert cache[p + n].shape == (b, h, t, 12), n  # (batch, head, pos, d_head), as documented
        assert cache[p + "attn.hook_pattern"].shape == (b, h, t, t)  # (batch, head, query, key)
        assert cache[p + "mlp.hook_pre"].shape == cache[p + "mlp.hook_post"].shape == (b, t, 40)


@pytest.mark.parametrize("causal", [True, False])
def test_pattern_is_a_distribution_and_causal(causal):
    model = make_model(causal=causal)
    _, cache = model.run_with_cache(make_tokens(), names_filter=lambda n: n.endswith("hook_pattern"))
    above = torch.ones(16, 16, dtype=torch.bool).triu(1)
    for l in range(TINY["n_layer"]):
        pattern = cache[f"blocks.{l}.attn.hook_pattern"]
        assert (pattern >= 0).all()
        torch.testing.assert_close(
            pattern.sum(-1), torch.ones(pattern.shape[:-1], dtype=pattern.dtype), **F64
        )
        if causal:
            assert (pattern[..., above] == 0).all()
        else:
            assert (pattern[..., above] > 0).all()


def test_resid_post_feeds_next_resid_pre():
    model = make_model(n_layer=3)
    _, cache = model.run_with_cache(make_tokens())
    torch.testing.assert_close(
        cache["blocks.0.hook_resid_pre"], cache["hook_embed"] + cache["hook_pos_embed"], **F64
    )
    for l in range(2):
        torch.testing.assert_close(
            cache[f"blocks.{l}.hook_resid_post"], cache[f"blocks.{l + 1}.hook_resid_pre"], **F64
        )


@pytest.mark.parametrize(
    "names_filter, expected",
    [
        ("blocks.1.hook_resid_post", {"blocks.1.hook_resid_post"}),
        (["hook_embed", "blocks.0.mlp.hook_post"], {"hook_embed", "blocks.0.mlp.hook_post"}),
        (
            lambda n: n.endswith("attn.hook_pattern"),
            {"blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"},
        ),
        (lambda n: False, set()),
    ],
)
def test_names_filter_restricts_the_cache(names_filter, expected):
    model = make_model()
    tokens = make_tokens()
    logits, cache = model.run_with_cache(tokens, names_filter=names_filter)
    assert set(cache) == expected
    with torch.no_grad():
        torch.testing.assert_close(logits, model(tokens), **F64)
    assert no_hooks_attached(model)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x: m.run_with_cache(x, names_filter="blocks.7.hook_resid_pre"),
        lambda m, x: m.run_with_cache(x, names_filter=["hook_embed", "not_a_hook"]),
        lambda m, x: m.run_with_hooks(x, [("hook_embed", noop), ("blocks.0.attn.hook_patern", noop)]),
    ],
)
def test_unknown_hook_name_raises_key_error_and_leaves_no_hook(call):
    model = make_model()
    with pytest.raises(KeyError):
        call(model, make_tokens())
    assert no_hooks_attached(model)


# ----------------------------------------------------------------------------------------- 5. run_with_hooks


def zero(x, hook):
    return torch.zeros_like(x)


@pytest.mark.parametrize(
    "hook_name",
    ["blocks.0.attn.hook_pattern", "blocks.1.mlp.hook_post", "blocks.0.hook_resid_mid", "hook_pos_embed"],
)
def test_ablation_hook_matches_ablation_by_hand(hook_name):
    model = make_model()
    tokens = make_tokens()
    with torch.no_grad():
        plain = model(tokens)
        ablated = model.run_with_hooks(tokens, [(hook_name, zero)])
        expected, _ = reference_forward(model, tokens, edits={hook_name: torch.zeros_like})
        after = model(tokens)
    assert (ablated - plain).abs().amax() > 1e-3  # the edit had an effect ...
    torch.testing.assert_close(ablated, expected, **F64)  # ... and exactly the intended one
    torch.testing.assert_close(after, plain, rtol=0, atol=0)  # and was removed afterwards
    assert no_hooks_attached(model)


def test_hooks_compose_in_order_and_none_keeps_the_activation():
    model = make_model()
    tokens = make_tokens()
    seen = []
    hooks = [
        ("blocks.0.hook_resid_mid", lambda x, hook: x * 2),
        ("blocks.0.hook_resid_mid", lambda x, hook: seen.append(x.clone())),  # returns None: pass-through
        ("blocks.0.hook_resid_mid", lambda x, hook: x + 1),
    ]
    with torch.no_grad():
        out = model.run_with_hooks(tokens, hooks)
        expected, _ = reference_forward(model, tokens, edits={"blocks.0.hook_resid_mid": lambda x: x * 2 + 1})
    _, ref_unedited = reference_forward(model, tokens)
    torch.testing.assert_close(seen[0], 2 * ref_unedited["blocks.0.hook_resid_mid"], **F64)
    torch.testing.assert_close(out, expected, **F64)


def test_hooks_removed_when_hooked_forward_raises():
    model = make_model()
    tokens = make_tokens()
    with torch.no_grad():
        plain = model(tokens)

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(tokens, [("blocks.0.hook_resid_pre", zero), ("blocks.1.mlp.hook_post", boom)])
    assert no_hooks_attached(model)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), plain, rtol=0, atol=0)


# --------------------------------------------------------------------------------------- 6. fast vs explicit


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Counts calls to torch's fused attention."""
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


def _logits_and_grads(model, tokens, hooks):
    model.zero_grad(set_to_none=True)
    logits = model.run_with_hooks(tokens, hooks)
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", ["default", "non_causal", "tracr_like"])
def test_fast_path_equals_explicit_path(variant, sdpa_calls):
    model = make_model(dtype=torch.float32, **VARIANTS[variant])
    tokens = make_tokens()

    fast, fast_grads = _logits_and_grads(model, tokens, [])
    assert len(sdpa_calls) == TINY["n_layer"]  # no hooks: every layer uses SDPA

    sdpa_calls.clear()
    explicit, explicit_grads = _logits_and_grads(
        model, tokens, [(lambda n: n.endswith("hook_pattern"), noop)]
    )
    assert len(sdpa_calls) == 0  # a hook on the pattern forces the explicit path in every layer

    sdpa_calls.clear()
    model.run_with_hooks(tokens, [("blocks.0.attn.hook_pattern", noop)])
    assert len(sdpa_calls) == TINY["n_layer"] - 1  # ... and only in the hooked layer

    torch.testing.assert_close(explicit, fast, atol=1e-5, rtol=1e-5)
    for name, g in fast_grads.items():
        torch.testing.assert_close(
            explicit_grads[name], g, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_unhooked_hook_points_are_skipped(monkeypatch):
    """Fast path: with nothing attached, no HookPoint runs at all."""
    model = make_model()
    ran = []
    monkeypatch.setattr(HookPoint, "forward", lambda self, x: ran.append(self.name) or x)
    with torch.no_grad():
        model(make_tokens())
    assert ran == []
    with torch.no_grad():
        model.run_with_hooks(make_tokens(), [("blocks.1.mlp.hook_post", noop)])
    assert ran == ["blocks.1.mlp.hook_post"]


# ----------------------------------------------------------------------------------------------- 7. backward


def test_backward_through_hooked_forward():
    model = make_model(dtype=torch.float32, randomize=False)  # the real init: zero biases, unit LayerNorms
    tokens = make_tokens()
    hooks = [
        (lambda n: n.endswith("hook_pattern"), lambda x, hook: x * 1.0),
        ("blocks.1.mlp.hook_post", lambda x, hook: x + 0.0),
    ]
    _, grads = _logits_and_grads(model, tokens, hooks)
    assert set(grads) == {n for n, _ in model.named_parameters()}
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
        assert g.abs().sum() > 0, name


def test_cache_without_detach_keeps_the_graph():
    model = make_model(dtype=torch.float32)
    tokens = make_tokens()
    logits, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_mid", detach=False)
    resid = cache["blocks.0.hook_resid_mid"]
    assert resid.requires_grad
    (grad,) = torch.autograd.grad(logits[:, 3].sum(), resid)
    assert grad[:, 3].abs().sum() > 0
    assert (grad[:, 4:] == 0).all()  # causal: position 3 reads nothing from later positions


# --------------------------------------------------------------------------------------------- 8. validation


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=30, n_head=4)
    assert ModelConfig(d_model=30, n_head=4, d_head=8).d_head == 8  # an explicit d_head lifts the constraint
    with pytest.raises(ValueError):
        Transformer(ModelConfig(**{**TINY, "vocab_size": 0}))
    with pytest.raises(ValueError):
        Transformer(ModelConfig(**{**TINY, "seq_len": 0}))


def test_sequence_longer_than_context_raises():
    model = make_model()
    with torch.no_grad():
        model(make_tokens(t=16))  # exactly the context is fine
        with pytest.raises(ValueError, match="exceeds"):
            model(make_tokens(t=17))


# ---------------------------------------------------------------------------------------- 9. plain nn.Module


def test_state_dict_has_stable_names_and_round_trips():
    model = make_model()
    sd = model.state_dict()
    for key in ["tok_emb.weight", "pos_emb.weight", "blocks.0.ln1.weight", "blocks.0.attn.qkv.weight",
                "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.1.mlp.fc.weight",
                "blocks.1.mlp.proj.bias", "blocks.1.ln2.bias", "ln_final.norm.weight", "head.weight"]:
        assert key in sd, key
    assert "head.bias" not in sd
    assert not any("hook" in k for k in sd)  # hook points hold no state

    fresh = make_model(seed=123)
    fresh.load_state_dict(sd)  # strict: same keys, same shapes
    tokens = make_tokens()
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), model(tokens), rtol=0, atol=0)


def expected_n_params(vocab_size, seq_len, d_model, n_layer, n_head, d_head=None, d_mlp=None, bias=True,
                      norm="layernorm"):
    V, S, d, L = vocab_size, seq_len, d_model, n_layer
    inner, m = n_head * (d_head or d // n_head), d_mlp or 4 * d
    ln = 2 * d if norm == "layernorm" else 0  # weight + bias
    attn = d * 3 * inner + inner * d + (3 * inner + d if bias else 0)  # fused qkv + output projection
    mlp = d * m + m * d + (m + d if bias else 0)
    return V * d + S * d + L * (2 * ln + attn + mlp) + ln + d * V  # embeddings, blocks, final LN, untied head


PAPER_MODEL = {"vocab_size": 300, "seq_len": 259, "d_model": 192, "n_layer": 6, "n_head": 6}


@pytest.mark.parametrize("kw", [PAPER_MODEL, {**TINY, **VARIANTS["tracr_like"]}])
def test_parameter_count_matches_formula(kw):
    model = Transformer(ModelConfig(**kw))
    keys = ["vocab_size", "seq_len", "d_model", "n_layer", "n_head", "d_head", "d_mlp", "bias", "norm"]
    expected = expected_n_params(**{k: kw[k] for k in keys if k in kw})
    assert model.n_params() == sum(p.numel() for p in model.parameters()) == expected
    if kw == PAPER_MODEL:
        assert expected == 2_834_496  # 12 d^2 + 13 d per block plus embeddings and head: the paper's "≈3M"
