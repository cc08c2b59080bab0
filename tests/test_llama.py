"""The llama2.c-style decoder (paper App. F.1) and its hook points.

Expected values come from `reference_forward` below — a from-scratch forward pass in plain torch ops that reads the
model's state dict but none of its code, with RoPE in the complex-number form of Meta's / llama2.c's
`precompute_freqs_cis` + `apply_rotary_emb` — or from explicit formulas and the paper's numbers.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from wrapperlab.models.llama import (
    LlamaConfig,
    LlamaTransformer,
    apply_rope,
    config_from_llama2c,
    convert_llama2c_state_dict,
    generate,
    rope_tables,
)

TINY = {"vocab_size": 24, "seq_len": 16, "d_model": 32, "n_layer": 2, "n_head": 4}
VARIANTS = {
    "default": {},
    "gqa": {"n_kv_heads": 2},  # 4 query heads share 2 key/value heads
    "hidden_dim": {"hidden_dim": 40, "norm_eps": 1e-3, "rope_theta": 500.0},
}
F64 = {"atol": 1e-10, "rtol": 1e-10}  # fp64 model vs fp64 reference


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and OpenMP threads stall badly when other jobs hold the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def expected_hook_names(n_layer: int) -> set[str]:
    """The names listed in the module docstring (Transformer's, without hook_pos_embed)."""
    per_block = ["hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern",
                 "attn.hook_z", "hook_attn_out", "hook_resid_mid", "mlp.hook_pre", "mlp.hook_post",
                 "hook_mlp_out", "hook_resid_post"]
    return {"hook_embed", "ln_final.hook_normalized"} | {f"blocks.{l}.{n}" for l in range(n_layer) for n in per_block}


def make_model(dtype=torch.float64, seed=0, randomize=True, **overrides) -> LlamaTransformer:
    """A tiny model; `randomize` replaces the init by larger random values (norm weights around 1)."""
    torch.manual_seed(seed)
    model = LlamaTransformer(LlamaConfig(**{**TINY, **overrides})).to(dtype)
    if randomize:
        with torch.no_grad():
            for name, p in model.named_parameters():
                is_norm = name.endswith(("ln1.weight", "ln2.weight", "norm.weight"))
                p.copy_((1.0 if is_norm else 0.0) + (0.2 if is_norm else 0.3) * torch.randn_like(p))
    return model.eval()


def make_tokens(b=3, t=16, seed=1, vocab=TINY["vocab_size"]) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- the reference


def ref_rmsnorm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def ref_freqs_cis(head_dim, t, theta):
    """Meta's precompute_freqs_cis: e^{i * pos * theta^(-2j/head_dim)}, complex128 (t, head_dim/2)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(t, dtype=torch.float64), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def ref_rope(x, freqs_cis):
    """Meta's apply_rotary_emb on x (b, t, heads, head_dim): adjacent pairs as complex numbers, times freqs_cis."""
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(-2)


def reference_forward(model: LlamaTransformer, tokens: torch.Tensor):
    """llama2.c's forward written out by hand from the state dict. Returns (logits, activations by hook name)."""
    cfg, sd = model.cfg, model.state_dict()
    b, t = tokens.shape
    h, d = cfg.n_head, cfg.d_model
    dh = d // h
    kv = cfg.n_kv_heads or h
    eps = cfg.norm_eps
    fc = ref_freqs_cis(dh, t, cfg.rope_theta)
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    acts = {}
    emb = sd["tok_emb.weight"]
    x = acts["hook_embed"] = emb[tokens]
    for l in range(cfg.n_layer):
        p = f"blocks.{l}."
        W = lambda n, p=p: sd[p + n + ".weight"]
        acts[p + "hook_resid_pre"] = x
        a = ref_rmsnorm(x, W("ln1"), eps)
        q = ref_rope((a @ W("attn.wq").T).view(b, t, h, dh), fc)
        k = ref_rope((a @ W("attn.wk").T).view(b, t, kv, dh), fc)
        v = (a @ W("attn.wv").T).view(b, t, kv, dh)
        k, v = k.repeat_interleave(h // kv, dim=2), v.repeat_interleave(h // kv, dim=2)  # query head i: kv i//rep
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
        scores = scores.masked_fill(future, -math.inf)
        e = torch.exp(scores - scores.amax(-1, keepdim=True))
        pattern = e / e.sum(-1, keepdim=True)
        z = torch.einsum("bhqk,bkhd->bhqd", pattern, v)
        acts.update({p + "attn.hook_q": q.transpose(1, 2), p + "attn.hook_k": k.transpose(1, 2),
                     p + "attn.hook_v": v.transpose(1, 2), p + "attn.hook_pattern": pattern, p + "attn.hook_z": z})
        attn_out = acts[p + "hook_attn_out"] = z.transpose(1, 2).reshape(b, t, d) @ W("attn.wo").T
        x = acts[p + "hook_resid_mid"] = x + attn_out
        m = ref_rmsnorm(x, W("ln2"), eps)
        gate = acts[p + "mlp.hook_pre"] = m @ W("mlp.w1").T
        post = acts[p + "mlp.hook_post"] = gate * torch.sigmoid(gate) * (m @ W("mlp.w3").T)
        mlp_out = acts[p + "hook_mlp_out"] = post @ W("mlp.w2").T
        x = acts[p + "hook_resid_post"] = x + mlp_out
    final = acts["ln_final.hook_normalized"] = ref_rmsnorm(x, sd["ln_final.norm.weight"], eps)
    return final @ emb.T, acts  # tied head


def noop(x, hook):
    return None


# ------------------------------------------------------------------------------------------------ 1. forward


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_reference(variant):
    model = make_model(**VARIANTS[variant])
    for t in (16, 7):
        tokens = make_tokens(t=t)
        with torch.no_grad():
            logits = model(tokens)
            expected, _ = reference_forward(model, tokens)
        assert logits.shape == (3, t, TINY["vocab_size"])
        torch.testing.assert_close(logits, expected, **F64)


def test_fp32_model_matches_reference():
    model = make_model(dtype=torch.float32)
    tokens = make_tokens()
    with torch.no_grad():
        logits = model(tokens)
        expected, _ = reference_forward(model.double(), tokens)
    torch.testing.assert_close(logits.double(), expected, atol=1e-5, rtol=1e-5)


def test_every_hook_activation_matches_reference():
    """Also pins the documented meanings: hook_q/hook_k after RoPE, hook_pre = w1 x, hook_post = silu(w1 x) * w3 x."""
    model = make_model(n_kv_heads=2)
    tokens = make_tokens(t=11)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        _, expected = reference_forward(model, tokens)
    assert set(cache) == set(expected) == expected_hook_names(2)
    for name, act in expected.items():
        torch.testing.assert_close(cache[name], act, **F64, msg=name)


# --------------------------------------------------------------------------------------------------- 2. RoPE


def test_rope_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    dh, n = 16, 64
    cos, sin = rope_tables(dh, n)
    cos, sin = cos.double(), sin.double()
    q, k = torch.randn(2, dh, generator=g, dtype=torch.float64)

    def score(m, n_):  # q at position m, k at position n_
        return (apply_rope(q, cos[m], sin[m]) @ apply_rope(k, cos[n_], sin[n_])).item()

    for m, n_, s in [(5, 2, 10), (3, 3, 40), (0, 7, 17), (20, 1, 43)]:
        assert score(m, n_) == pytest.approx(score(m + s, n_ + s), abs=1e-6)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # but it does depend on the offset
    torch.testing.assert_close(apply_rope(q, cos[0], sin[0]), q)  # position 0: identity
    x = torch.randn(n, dh, generator=g, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))  # a rotation
    fc = ref_freqs_cis(dh, n, 10000.0)  # the same rotation as the complex form
    torch.testing.assert_close(apply_rope(x, cos, sin), ref_rope(x[None, :, None], fc)[0, :, 0], atol=1e-6, rtol=0)


def test_model_attention_is_shift_invariant():
    """In the model: layer-0 q and k depend only on their own token and position, so the q.k scores among the
    same six tokens are unchanged when a prefix shifts them to positions 5..10."""
    model = make_model(n_layer=1)
    tokens = make_tokens(b=1, t=6)
    shifted = torch.cat([make_tokens(b=1, t=5, seed=9), tokens], dim=1)  # the same 6 tokens at positions 5..10
    names = ["blocks.0.attn.hook_q", "blocks.0.attn.hook_k"]
    with torch.no_grad():
        _, a = model.run_with_cache(tokens, names_filter=names)
        _, b = model.run_with_cache(shifted, names_filter=names)
    sa = a[names[0]] @ a[names[1]].transpose(-1, -2)
    sb = (b[names[0]] @ b[names[1]].transpose(-1, -2))[..., 5:, 5:]
    torch.testing.assert_close(sa, sb, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- 3. causality


@pytest.mark.parametrize("path", ["fast", "explicit"])
def test_causality(path):
    model = make_model()
    hooks = [] if path == "fast" else [(lambda n: n.endswith("hook_pattern"), noop)]
    tokens = make_tokens()
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        a, b = model.run_with_hooks(tokens, hooks), model.run_with_hooks(changed, hooks)
    assert (a[:, 9:] - b[:, 9:]).abs().amax() > 1e-6
    assert (a[:, :9] - b[:, :9]).abs().amax() < 1e-12


# ---------------------------------------------------------------------------------- 4. tied head, parameters


def test_head_is_tied_to_the_embedding():
    model = make_model(dtype=torch.float32, randomize=False)
    assert model.head.weight is model.tok_emb.weight
    assert model.head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    assert (model.head.in_features, model.head.out_features) == (32, 24)
    assert [k for k in model.state_dict() if "emb" in k or "head" in k] == ["tok_emb.weight"]
    shapes = [p.shape for p in model.parameters()]
    by_hand = 24 * 32 + 32 + 2 * (4 * 32 * 32 + 3 * 32 * model.cfg.mlp_dim + 2 * 32)
    assert model.n_params() == sum(math.prod(s) for s in shapes) == by_hand
    twin = copy.deepcopy(model)  # the tie survives a copy
    assert twin.head.weight is twin.tok_emb.weight and twin.head.weight is not model.tok_emb.weight
    model(make_tokens(t=5)).sum().backward()  # both uses feed one gradient
    assert model.tok_emb.weight.grad is not None and model.head.weight.grad is model.tok_emb.weight.grad


def test_paper_model_size_and_hidden_dim():
    cfg = LlamaConfig(vocab_size=8192, seq_len=1024, d_model=768, n_layer=12, n_head=12)
    assert cfg == LlamaConfig()  # the defaults are the paper's model
    assert cfg.mlp_dim == 2048  # llama2.c's rule: int(2*4*768/3) = 2048, a multiple of 64
    with torch.device("meta"):
        model = LlamaTransformer(cfg)
    n = model.n_params()
    assert abs(n - 91.2e6) / 91.2e6 < 0.01  # paper: 91M; from the shapes: 12 x 7.08M + 6.29M = 91.2M
    assert n == 12 * (4 * 768**2 + 3 * 768 * 2048 + 2 * 768) + 8192 * 768 + 768
    # llama2.c's published TinyStories models (multiple_of = 32): stories15M d=288 -> 768, stories42M d=512 -> 1376
    assert LlamaConfig(d_model=288, n_head=6, multiple_of=32).mlp_dim == 768
    assert LlamaConfig(d_model=512, n_head=8, multiple_of=32).mlp_dim == 1376
    assert LlamaConfig(d_model=512, n_head=8, hidden_dim=1000).mlp_dim == 1000


def test_rope_tables_survive_casts_and_meta_builds():
    exact = ref_freqs_cis(8, 16, 10000.0)
    with torch.device("meta"):
        model = LlamaTransformer(LlamaConfig(**TINY))
    assert model.rope_cos.is_meta
    model.to_empty(device="cpu")  # the usual "build on meta, then load weights" route: tables are rebuilt
    torch.testing.assert_close(model.rope_cos, exact.real.float())
    model.double()
    torch.testing.assert_close(model.rope_sin, exact.imag, atol=1e-15, rtol=0)
    model.to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.float32 and model.tok_emb.weight.dtype == torch.bfloat16
    assert "rope_cos" not in model.state_dict()
    with torch.device("meta"):  # the other route: load real tensors into a meta model with assign=True
        lazy = LlamaTransformer(LlamaConfig(**TINY))
    real = make_model(dtype=torch.float32)
    lazy.load_state_dict(real.state_dict(), assign=True)
    tokens = make_tokens()
    with torch.no_grad():
        torch.testing.assert_close(lazy(tokens), real(tokens), atol=0, rtol=0)


def test_init_follows_llama2c():
    torch.manual_seed(0)
    model = LlamaTransformer(LlamaConfig(vocab_size=512, seq_len=8, d_model=128, n_layer=8, n_head=4))
    small = 0.02 / math.sqrt(2 * 8)
    for name, p in model.named_parameters():
        if name.endswith(("ln1.weight", "ln2.weight", "norm.weight")):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            std = small if name.endswith(("w3.weight", "wo.weight")) else 0.02
            assert p.std().item() == pytest.approx(std, rel=0.1), name


# ------------------------------------------------------------------------------------------------- 5. hooks


def test_hook_names_and_shapes():
    model = make_model(n_layer=3)
    assert set(model.hook_dict) == expected_hook_names(3)
    for name, hp in model.hook_dict.items():
        assert hp.name == name
    b, t, d, h, f = 2, 9, 32, 4, model.cfg.mlp_dim
    with torch.no_grad():
        logits, cache = model.run_with_cache(make_tokens(b=b, t=t))
    assert set(cache) == expected_hook_names(3)
    for name, act in cache.items():
        if ".attn.hook_pattern" in name:
            shape = (b, h, t, t)
        elif ".attn." in name:
            shape = (b, h, t, 8)
        elif ".mlp." in name:
            shape = (b, t, f)
        else:
            shape = (b, t, d)
        assert act.shape == shape, name
    torch.testing.assert_close(model.residual(make_tokens(b=b, t=t)), cache["blocks.2.hook_resid_post"], **F64)
    _, only = model.run_with_cache(make_tokens(b=b, t=t), names_filter=lambda n: n.endswith("hook_pattern"))
    assert set(only) == {f"blocks.{l}.attn.hook_pattern" for l in range(3)}
    assert all(not hp.fns for hp in model.hook_dict.values())  # hooks are removed afterwards


def test_ablation_hook_changes_output_and_matches_by_hand():
    model = make_model()
    tokens = make_tokens()
    with torch.no_grad():
        clean = model(tokens)
        ablated = model.run_with_hooks(tokens, [("blocks.0.hook_attn_out", lambda x, hook: torch.zeros_like(x))])
        # by hand: the attention output of block 0 removed, so block 0's resid_mid = its resid_pre
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_pre")
        x = cache["blocks.0.hook_resid_pre"]
        blk = model.blocks[0]
        x = x + blk.mlp(blk.ln2(x))
        for b in model.blocks[1:]:
            x = b(x, model.rope_cos[:16], model.rope_sin[:16])
        by_hand = model.head(model.ln_final(x))
    assert (clean - ablated).abs().amax() > 1e-3
    torch.testing.assert_close(ablated, by_hand, **F64)
    with pytest.raises(KeyError):
        model.run_with_hooks(tokens, [("blocks.0.hook_pos_embed", noop)])


@pytest.mark.parametrize("variant", ["default", "gqa"])
def test_explicit_attention_equals_fused(variant):
    model = make_model(dtype=torch.float32, **VARIANTS[variant])
    tokens = make_tokens()
    with torch.no_grad():
        fused = model(tokens)
        explicit, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)
    for pat in cache.values():
        torch.testing.assert_close(pat.sum(-1), torch.ones(pat.shape[:-1]), atol=1e-6, rtol=0)
        future = torch.ones(16, 16, dtype=torch.bool).triu(1)
        assert (pat[..., future] == 0).all() and (pat[..., ~future] > 0).all()


# ------------------------------------------------------------------------------------------- 6. positions=


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
    torch.testing.assert_close(some, full[:, idx], **F64)
    with pytest.raises(ValueError, match="exceeds"):
        model(make_tokens(t=17))


# ---------------------------------------------------------------------------------------------- 7. generate


def test_greedy_generation_is_argmax_by_hand():
    model = make_model(dtype=torch.float32)
    prompt = make_tokens(b=2, t=4)
    out = generate(model, prompt, 6, temperature=0)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], prompt)
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert torch.equal(generate(model, prompt, 6, temperature=0), out)
    assert torch.equal(generate(model, prompt, 6, temperature=1.0, top_k=1), out)  # top-1 sampling is greedy
    one = generate(model, prompt[1], 6, temperature=0)  # a 1-D prompt gives a 1-D result
    assert torch.equal(one, out[1])


def test_seeded_sampling_is_reproducible_and_matches_by_hand():
    model = make_model(dtype=torch.float32)
    prompt = make_tokens(b=2, t=3)
    a = generate(model, prompt, 8, temperature=0.7, generator=torch.Generator().manual_seed(5))
    b = generate(model, prompt, 8, temperature=0.7, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    g, seq = torch.Generator().manual_seed(5), prompt.clone()
    with torch.no_grad():
        for _ in range(8):
            probs = torch.softmax(model(seq)[:, -1] / 0.7, dim=-1)
            seq = torch.cat([seq, torch.multinomial(probs, 1, generator=g)], dim=1)
    assert torch.equal(a, seq)
    c = generate(model, prompt, 8, temperature=5.0, top_k=3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # every top-k draw is among the 3 most likely tokens of its step
        for i in range(3, 11):
            top3 = model(c[:, :i])[:, -1].topk(3).indices
            assert all(c[r, i] in top3[r] for r in range(2))


def test_generation_crops_the_context():
    model = make_model(dtype=torch.float32)
    prompt = make_tokens(b=1, t=20)  # longer than seq_len = 16
    out = generate(model, prompt, 5, temperature=0)
    assert out.shape == (1, 25) and torch.equal(out[:, :20], prompt)
    with torch.no_grad():
        assert out[0, 20] == model(prompt[:, -16:])[0, -1].argmax()
        assert out[0, 24] == model(out[:, 8:24])[0, -1].argmax()
    with pytest.raises(ValueError):
        generate(model, prompt, 2, temperature=-1)


# ------------------------------------------------------------------------------------- 8. config validation


@pytest.mark.parametrize("fields, needle", [
    ({"d_model": 30, "n_head": 4}, "d_model"),
    ({"d_model": 12, "n_head": 4}, "head_dim"),  # head_dim 3 is odd: RoPE needs pairs
    ({"n_head": 4, "n_kv_heads": 3}, "n_kv_heads"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"seq_len": -1}, "seq_len"),
    ({"norm_eps": 0.0}, "norm_eps"),
    ({"hidden_dim": 0}, "hidden_dim"),
    ({"dropout": 0.1}, "dropout"),  # unknown fields are refused
])
def test_config_validation_names_the_field(fields, needle):
    with pytest.raises(ValueError, match=needle):
        LlamaConfig(**{**TINY, **fields})


# --------------------------------------------------------------------------------------------- 9. training


def test_tiny_model_learns_a_repeat_task():
    """Sequences repeat a random 4-token pattern; from position 4 on the next token is fully determined, which
    needs attention to the relative offset -4 (RoPE). Loss there must fall far below chance."""
    torch.manual_seed(0)
    model = LlamaTransformer(LlamaConfig(vocab_size=16, seq_len=16, d_model=32, n_layer=2, n_head=4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)

    def batch(n=32):
        return torch.randint(0, 16, (n, 4), generator=g).repeat(1, 4)  # (n, 16)

    def loss_of(x):
        logits = model(x[:, :-1])
        return F.cross_entropy(logits[:, 3:].reshape(-1, 16), x[:, 4:].reshape(-1))

    test = batch(256)
    with torch.no_grad():
        start = loss_of(test).item()
    assert start == pytest.approx(math.log(16), abs=0.3)
    for step in range(150):
        loss = loss_of(batch())
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
    with torch.no_grad():
        end = loss_of(test).item()
    assert end < 0.25 * start, (start, end)


# ---------------------------------------------------------------------------------------------- 10. autocast


@pytest.mark.parametrize("path", ["fast", "explicit"])
def test_bf16_autocast_is_close_to_fp32(path):
    model = make_model(dtype=torch.float32, randomize=False)
    hooks = [] if path == "fast" else [(lambda n: n.endswith("hook_pattern"), noop)]
    tokens = make_tokens()
    with torch.no_grad():
        ref = model.run_with_hooks(tokens, hooks)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.run_with_hooks(tokens, hooks)
    assert torch.isfinite(low).all()
    err = (low.float() - ref).abs().amax() / ref.abs().amax()
    assert err < 0.03, err


# ------------------------------------------------------------------------------------------ llama2.c import


def test_llama2c_checkpoint_import():
    model = make_model(n_kv_heads=2)
    sd = model.state_dict()
    llama2c = {"_orig_mod.tok_embeddings.weight": sd["tok_emb.weight"], "_orig_mod.output.weight": sd["tok_emb.weight"],
               "_orig_mod.norm.weight": sd["ln_final.norm.weight"]}
    for l in range(2):
        for ours, theirs in [("attn.wq", "attention.wq"), ("attn.wk", "attention.wk"), ("attn.wv", "attention.wv"),
                             ("attn.wo", "attention.wo"), ("mlp.w1", "feed_forward.w1"), ("mlp.w2", "feed_forward.w2"),
                             ("mlp.w3", "feed_forward.w3"), ("ln1", "attention_norm"), ("ln2", "ffn_norm")]:
            llama2c[f"_orig_mod.layers.{l}.{theirs}.weight"] = sd[f"blocks.{l}.{ours}.weight"]
    args = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 24, "multiple_of": 64,
            "max_seq_len": 16, "dropout": 0.0}
    cfg = config_from_llama2c(args)
    assert cfg == model.cfg
    twin = LlamaTransformer(cfg).double()
    twin.load_state_dict(convert_llama2c_state_dict(llama2c), strict=True)
    tokens = make_tokens()
    with torch.no_grad():
        torch.testing.assert_close(twin(tokens), model(tokens), atol=0, rtol=0)
    llama2c["_orig_mod.output.weight"] = sd["tok_emb.weight"] + 1
    with pytest.raises(ValueError, match="tied"):
        convert_llama2c_state_dict(llama2c)
    with pytest.raises(ValueError, match="bogus"):
        convert_llama2c_state_dict({"bogus.weight": torch.zeros(1)})


def test_kv_cached_sampling_matches_full_recompute_across_the_context_edge():
    """The KV cache (used while the sequence fits seq_len = 16) gives the logits of a full forward (fp64, 1e-10),
    so greedy decoding equals the by-hand loop that reruns the cropped window every step, past the edge too."""
    model = make_model()  # fp64
    prompt = make_tokens(b=3, t=5)
    cache = [[None, None] for _ in model.blocks]
    seq = prompt.clone()
    with torch.no_grad():
        for i in range(12):  # fills the 16-token context exactly
            step = model.step_cached(seq if i == 0 else seq[:, -1:], cache)
            torch.testing.assert_close(step, model(seq)[:, -1], **F64)
            seq = torch.cat([seq, step.argmax(-1, keepdim=True)], dim=1)
        with pytest.raises(ValueError, match="exceeds"):
            model.step_cached(seq[:, -1:], cache)
    out = generate(model, prompt, 20, temperature=0)  # 5 + 20 tokens: cached to 16, then cropped recompute
    ref = prompt.clone()
    with torch.no_grad():
        for _ in range(20):
            ref = torch.cat([ref, model(ref[:, -16:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def test_hooked_generation_reruns_the_whole_context_and_stop_token_ends_early():
    model = make_model(dtype=torch.float32)
    prompt = make_tokens(b=2, t=4)
    lengths = []
    with model.hooks([("blocks.0.hook_resid_post", lambda x, hook: lengths.append(x.shape[1]) or x)]):
        out = generate(model, prompt, 5, temperature=0)
    assert lengths == [4, 5, 6, 7, 8]  # every step saw every position (no cache while hooked)
    assert torch.equal(out, generate(model, prompt, 5, temperature=0))
    full = generate(model, prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(3))
    stop = int(full[0, 4])  # row 0's first draw: row 0 stops at once, row 1 at its first draw of that token
    early = generate(model, prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(3), stop_token=stop)
    assert early.shape == full.shape
    alone = generate(model, prompt[:1], 12, temperature=1.0, generator=torch.Generator().manual_seed(3))
    first = int(alone[0, 4])  # one row stopping at its first draw: one step taken, the rest filled
    one = generate(model, prompt[:1], 12, temperature=1.0, generator=torch.Generator().manual_seed(3),
                   stop_token=first)
    assert one.shape == (1, 16) and torch.equal(one[0, :5], alone[0, :5]) and bool((one[0, 5:] == first).all())
    cuts = [row.index(stop) + 1 if stop in row else 12 for row in full[:, 4:].tolist()]
    k = max(cuts)  # the batch stops once its last row has drawn the stop token: until then, the same draws
    assert torch.equal(early[:, :4 + k], full[:, :4 + k]) and bool((early[:, 4 + k:] == stop).all())
