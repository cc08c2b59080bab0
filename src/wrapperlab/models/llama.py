"""LLaMA-2-style decoder (llama2.c) with the same hook points and API as ``models/transformer.py``.

This is the model of the TinyStories experiment (paper App. F.1): Jain et al. train
Karpathy's llama2.c ``model.py``, at the paper's scale **dim 768, 12 layers, 12 heads, vocab 8192** (≈ 91.2M
parameters), context 1024 (the paper's sequence length; the repo's ``configs/base91M.py`` says 256 — set
``seq_len`` to match a checkpoint). ``LlamaConfig()`` with no arguments is that model.

Architecture (each choice as llama2.c makes it, unless marked *ours*):

- token embedding, no position embedding (positions enter only through RoPE), no dropout (*ours*: the paper's
  pretraining uses none; llama2.c's ``dropout`` only matters during training and is not offered);
- pre-norm blocks ``x + attn(rmsnorm(x))`` then ``x + ffn(rmsnorm(x))``; RMSNorm ``x / sqrt(mean(x²) + eps) * w``
  with ``eps = 1e-5``, computed in at least fp32 (llama2.c: ``x.float()``; *ours*: fp64 stays fp64), weight ones;
- attention with separate bias-free ``wq, wk, wv, wo``, head_dim = d_model / n_head, scale 1/sqrt(head_dim),
  causal; grouped-query attention when ``n_kv_heads < n_head`` (query head ``h`` reads key/value head
  ``h // (n_head / n_kv_heads)``, llama2.c's ``repeat_kv``); the paper's model has ``n_kv_heads = n_head``;
- RoPE on q and k, llama2.c's *interleaved* form: dimensions (2i, 2i+1) of a head form one complex number rotated
  by ``pos * theta**(-2i/head_dim)``, ``theta = 10000``. The cos/sin tables cover positions ``0..seq_len-1``;
  they are computed in fp64 (*ours*; llama2.c uses fp32 — a difference below 1e-6) and kept as non-persistent
  buffers in fp32 (fp64 when the model is cast to fp64; *ours*: rebuilt after every ``.to``/``.half``/
  ``to_empty``, so they are never rounded to bf16/fp16 nor left uninitialised after a meta-device build); the
  rotation runs in at least fp32 and is cast back (as llama2.c);
- SwiGLU feed-forward ``w2(silu(w1 x) * w3 x)``, bias-free, hidden width ``hidden_dim`` or by default llama2.c's
  rule ``multiple_of * ceil(int(2 * 4 * d_model / 3) / multiple_of)`` with ``multiple_of = 64`` (768 ->
  2048; llama2.c's ``train.py`` uses 32, which gives the same 2048 at d = 768);
- final RMSNorm, then the output head **tied** to the token embedding: ``head.weight`` *is* ``tok_emb.weight``. The
  head is a small module that reads the embedding's parameter instead of holding a second reference to it, so the
  state dict has one key (``tok_emb.weight``) and safetensors (which refuses shared tensors) saves it as is;
- init as llama2.c: every Linear and the embedding ~ N(0, 0.02), RMSNorm weights 1, then ``w3.weight`` and
  ``wo.weight`` ~ N(0, 0.02 / sqrt(2 * n_layer)). llama2.c scales **w3** (the SwiGLU up-projection), not w2 (the
  projection into the residual stream, GPT-2's choice); we follow llama2.c, as the paper's pretraining did.

Parameter names are ours (``blocks.{l}.attn.wq``, ``blocks.{l}.mlp.w1``, ``blocks.{l}.ln1``/``ln2``,
``ln_final.norm``, ``tok_emb``) so that module paths give the hook names; ``convert_llama2c_state_dict`` maps
llama2.c's (``layers.{l}.attention.wq``, ``feed_forward.w1``, ``attention_norm``/``ffn_norm``, ``norm``,
``tok_embeddings``/``output``).

Hook points (names as ``Transformer``; a hook is ``fn(activation, hook) -> activation | None``; shapes for
batch b, length t, heads h, head_dim dh, hidden width f):

- ``hook_embed`` (b, t, d) — the token embedding (there is no ``hook_pos_embed``: RoPE has no position embedding);
- ``blocks.{l}.hook_resid_pre`` (b, t, d);
- ``blocks.{l}.attn.hook_q`` / ``hook_k`` / ``hook_v`` (b, h, t, dh) — q and k **after RoPE** (the vectors whose
  dot products are the attention scores; TransformerLens would call these ``hook_rot_q``/``hook_rot_k``); with
  GQA, k and v are already repeated to all h query heads;
- ``blocks.{l}.attn.hook_pattern`` (b, h, query, key), ``blocks.{l}.attn.hook_z`` (b, h, t, dh);
- ``blocks.{l}.hook_attn_out`` (b, t, d), ``blocks.{l}.hook_resid_mid`` (b, t, d);
- ``blocks.{l}.mlp.hook_pre`` (b, t, f) — the gate pre-activation ``w1 x``;
- ``blocks.{l}.mlp.hook_post`` (b, t, f) — ``silu(w1 x) * w3 x``, the input of ``w2``;
- ``blocks.{l}.hook_mlp_out`` (b, t, d), ``blocks.{l}.hook_resid_post`` (b, t, d);
- ``ln_final.hook_normalized`` (b, t, d) — after the final RMSNorm's weight (the head's input), as ``Transformer``.

Fast path exactly as ``Transformer``: unhooked hook points are skipped, attention is fused
``scaled_dot_product_attention`` unless one of hook_q/k/v/pattern is hooked, and on the CPU fused attention runs
in fp32 under bf16 autocast (``transformer.CPU_SDPA_FP32``, read at call time). ``forward(tokens, positions=...)``
applies the final norm and head only at the given positions. The hook API (``hooks``, ``run_with_hooks``,
``run_with_cache``, ``hook_dict``, ``n_params``) is the ``HookedModel`` mixin that ``Transformer`` uses too
(n_params counts the tied matrix once).

``generate`` samples as llama2.c's ``Transformer.generate`` (the paper: ≤ 350 new tokens, temperature 1.0, no
top-k), without a KV cache; ``convert_llama2c_state_dict`` / ``config_from_llama2c`` read a llama2.c checkpoint's
``model`` and ``model_args`` once the caller has loaded them (we never unpickle a file ourselves).
"""

from __future__ import annotations

import math
import re
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from wrapperlab.models.registry import Components, ModelFamily, register, residual_hooks, row_matrices
from wrapperlab.models.transformer import HookedModel, HookPoint, _maybe, attend


class LlamaConfig(BaseModel):
    """llama2.c ``ModelArgs`` under our names; the defaults are the paper's 91M TinyStories model."""

    model_config = ConfigDict(extra="forbid")

    family: Literal["llama"] = "llama"
    vocab_size: int = Field(8192, ge=1)
    seq_len: int = Field(1024, ge=1, description="maximum context (llama2.c max_seq_len); RoPE tables cover it")
    d_model: int = Field(768, ge=1)
    n_layer: int = Field(12, ge=1)
    n_head: int = Field(12, ge=1)
    n_kv_heads: int | None = Field(None, ge=1, description="key/value heads (GQA); default n_head")
    hidden_dim: int | None = Field(None, ge=1, description="SwiGLU width; default llama2.c's rule (see mlp_dim)")
    multiple_of: int = Field(64, ge=1, description="the default hidden_dim is rounded up to a multiple of this")
    norm_eps: float = Field(1e-5, gt=0)
    rope_theta: float = Field(10000.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> LlamaConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(f"head_dim = d_model / n_head ({self.d_model // self.n_head}) must be even for RoPE")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_heads ({self.kv_heads})")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_head

    @property
    def mlp_dim(self) -> int:
        """``hidden_dim``, or llama2.c's rule: 2/3 of 4·d_model, rounded up to a multiple of ``multiple_of``."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        h = int(2 * (4 * self.d_model) / 3)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)


# --------------------------------------------------------------------------------------------------- pieces


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """At least fp32 (bf16/fp16 are upcast as llama2.c's ``x.float()``; fp64 stays fp64)."""
    return torch.promote_types(x.dtype, torch.float32)


def rope_tables(head_dim: int, seq_len: int, theta: float = 10000.0, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (seq_len, head_dim / 2): angle ``pos * theta**(-2i/head_dim)`` (llama2.c's
    ``precompute_freqs_cis``), computed in fp64 on the CPU, returned in ``dtype`` (default: the default dtype)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device="cpu"), inv_freq)
    dtype = dtype or torch.get_default_dtype()
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2i, 2i+1) of the last dim of ``x`` (..., t, head_dim) by the angles of ``cos``/``sin``
    (t, head_dim / 2): llama2.c's ``apply_rotary_emb`` (real-number form of the complex product)."""
    dt = _compute_dtype(x)
    re_, im = x.to(dt).unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos.to(dt), sin.to(dt)
    return torch.stack((re_ * cos - im * sin, re_ * sin + im * cos), dim=-1).flatten(-2).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(_compute_dtype(x))
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        h, kv, dh = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, h * dh, bias=False)
        self.wk = nn.Linear(cfg.d_model, kv * dh, bias=False)
        self.wv = nn.Linear(cfg.d_model, kv * dh, bias=False)
        self.wo = nn.Linear(h * dh, cfg.d_model, bias=False)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_pattern, self.hook_z = HookPoint(), HookPoint()
        self.scale = 1.0 / math.sqrt(dh)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: list | None = None) -> torch.Tensor:
        """``cache``: a [k, v] pair of this layer's earlier keys and values (sampling with a KV cache; ``cos`` and
        ``sin`` are then the new positions' rows): the new ones are appended and the queries attend to all."""
        b, t, _ = x.shape
        h, kv, dh = self.cfg.n_head, self.cfg.kv_heads, self.cfg.head_dim
        q = apply_rope(self.wq(x).view(b, t, h, dh).transpose(1, 2), cos, sin)  # (b, h, t, dh)
        k = apply_rope(self.wk(x).view(b, t, kv, dh).transpose(1, 2), cos, sin)  # (b, kv, t, dh)
        v = self.wv(x).view(b, t, kv, dh).transpose(1, 2)
        if cache is not None:
            if cache[0] is not None:
                if t != 1:
                    raise ValueError("a KV-cached step feeds one new token per row")
                k, v = torch.cat((cache[0], k), dim=2), torch.cat((cache[1], v), dim=2)
            cache[0], cache[1] = k, v
            causal = cache[0].shape[2] == t  # the prompt (causal); then one query over every earlier key
        else:
            causal = True
        if kv != h:  # GQA: llama2.c's repeat_kv (each kv head serves h / kv consecutive query heads)
            k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
        z = attend(self, q, k, v, causal, self.scale)
        return self.wo(z.transpose(1, 2).reshape(b, t, h * dh))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.mlp_dim, bias=False)
        self.w2 = nn.Linear(cfg.mlp_dim, cfg.d_model, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.mlp_dim, bias=False)
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = _maybe(self.hook_pre, self.w1(x))
        return self.w2(_maybe(self.hook_post, F.silu(gate) * self.w3(x)))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.ln1, self.ln2 = RMSNorm(cfg.d_model, cfg.norm_eps), RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn, self.mlp = LlamaAttention(cfg), SwiGLU(cfg)
        self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid = HookPoint(), HookPoint(), HookPoint()
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: list | None = None) -> torch.Tensor:
        x = _maybe(self.hook_resid_pre, x)
        x = _maybe(self.hook_resid_mid, x + _maybe(self.hook_attn_out, self.attn(self.ln1(x), cos, sin, cache)))
        return _maybe(self.hook_resid_post, x + _maybe(self.hook_mlp_out, self.mlp(self.ln2(x))))


class LlamaNormFinal(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _maybe(self.hook_normalized, self.norm(x))


class TiedHead(nn.Module):
    """The unembedding, tied to a token embedding: ``weight`` is the embedding's parameter itself. The embedding
    is held in a plain list, not as a submodule, so the parameter is registered (and saved) only once."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self._tied = [embedding]

    @property
    def weight(self) -> nn.Parameter:
        return self._tied[0].weight

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


# ---------------------------------------------------------------------------------------------------- model


class LlamaTransformer(HookedModel, nn.Module):
    """llama2.c's decoder with ``Transformer``'s hook points and API (see the module docstring)."""

    family = "llama"

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_final = LlamaNormFinal(cfg)
        self.head = TiedHead(self.tok_emb)
        ambient = torch.empty(0).device  # honours a `with torch.device(...)` block (meta builds)
        cos, sin = rope_tables(cfg.head_dim, cfg.seq_len, cfg.rope_theta, device=ambient)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # llama2.c's scaled init: w3 and wo (sic, not w2)
            if name.endswith(("w3.weight", "wo.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))
        self._collect_hook_points()

    @staticmethod
    def _init(m: nn.Module) -> None:
        """llama2.c's ``_init_weights``: N(0, 0.02) for every Linear and the embedding (RMSNorm keeps ones)."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def _apply(self, fn, recurse=True):
        """After every move or cast (``to``, ``double``, ``half``, ``to_empty`` ...) rebuild the RoPE tables from
        the config on the new device: fp64 for an fp64 model, fp32 otherwise (a bf16/fp16 cast would round them
        and ``to_empty`` would leave them uninitialised)."""
        super()._apply(fn, recurse)
        dtype = torch.float64 if self.rope_cos.dtype == torch.float64 else torch.float32
        self.rope_cos, self.rope_sin = rope_tables(self.cfg.head_dim, self.cfg.seq_len, self.cfg.rope_theta,
                                                   dtype, self.rope_cos.device)
        return self

    def residual(self, tokens: torch.Tensor) -> torch.Tensor:
        """Residual stream after the last block (before the final norm), shape (b, t, d)."""
        t = tokens.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds the model's context ({self.cfg.seq_len})")
        if self.rope_cos.is_meta:  # built on meta, then load_state_dict(assign=True): build the tables now
            self.rope_cos, self.rope_sin = rope_tables(self.cfg.head_dim, self.cfg.seq_len, self.cfg.rope_theta,
                                                       torch.float32, tokens.device)
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = _maybe(self.hook_embed, self.tok_emb(tokens))
        for block in self.blocks:
            x = block(x, cos, sin)
        return x

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | int | None = None) -> torch.Tensor:
        """Logits (b, t, vocab); with ``positions`` (an int or a 1-D index tensor) only at those positions,
        which skips the final norm and the vocabulary head everywhere else."""
        x = self.residual(tokens)
        if positions is not None:
            x = x[:, positions]
        return self.head(self.ln_final(x))

    def step_cached(self, tokens: torch.Tensor, cache: list[list]) -> torch.Tensor:
        """Last-position logits (b, vocab) of ``tokens`` appended to the sequence whose keys and values ``cache``
        holds (one [k, v] per block; ``[[None, None], ...]`` to start: then ``tokens`` is the whole prompt).
        The positions continue from the cached length; the caller keeps it within ``cfg.seq_len``."""
        start = 0 if cache[0][0] is None else cache[0][0].shape[2]
        t = tokens.shape[1]
        if start + t > self.cfg.seq_len:
            raise ValueError(f"sequence of {start + t} tokens exceeds the model's context ({self.cfg.seq_len})")
        cos, sin = self.rope_cos[start:start + t], self.rope_sin[start:start + t]
        x = _maybe(self.hook_embed, self.tok_emb(tokens))
        for block, c in zip(self.blocks, cache):
            x = block(x, cos, sin, c)
        return self.head(self.ln_final(x[:, -1]))


LLAMA_MATRICES = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w2", "mlp.w3")


def _components(model: LlamaTransformer) -> Components:
    n = model.cfg.n_layer
    return Components("llama", n, True, residual_hooks(n), [f"blocks.{i}.attn.hook_pattern" for i in range(n)],
                      row_matrices(model, {m: m for m in LLAMA_MATRICES}), LLAMA_MATRICES)


def _rope_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection reordered from our interleaved RoPE pairs (2i, 2i+1) to Hugging Face's halves
    (i, i + head_dim/2) within each head; q·k is unchanged because q and k are permuted alike."""
    rows, d = w.shape
    return w.view(heads, rows // heads // 2, 2, d).transpose(1, 2).reshape(rows, d).contiguous()


def to_hf_llama(model: LlamaTransformer) -> tuple[dict, dict]:
    """The model as a Hugging Face Llama checkpoint (``LlamaForCausalLM``, tied head): q and k rows reordered for
    HF's half-split rotary form (:func:`_rope_half`); w1, w3, w2 are gate, up and down projections."""
    c = model.cfg
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["ln_final.norm.weight"]}
    for i in range(c.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        out |= {h + "self_attn.q_proj.weight": _rope_half(sd[b + "attn.wq.weight"], c.n_head),
                h + "self_attn.k_proj.weight": _rope_half(sd[b + "attn.wk.weight"], c.kv_heads),
                h + "self_attn.v_proj.weight": sd[b + "attn.wv.weight"],
                h + "self_attn.o_proj.weight": sd[b + "attn.wo.weight"],
                h + "mlp.gate_proj.weight": sd[b + "mlp.w1.weight"], h + "mlp.up_proj.weight": sd[b + "mlp.w3.weight"],
                h + "mlp.down_proj.weight": sd[b + "mlp.w2.weight"],
                h + "input_layernorm.weight": sd[b + "ln1.weight"],
                h + "post_attention_layernorm.weight": sd[b + "ln2.weight"]}
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": c.vocab_size,
              "hidden_size": c.d_model, "intermediate_size": c.mlp_dim, "num_hidden_layers": c.n_layer,
              "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
              "max_position_embeddings": c.seq_len, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
              "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta}, "hidden_act": "silu",
              "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True}
    return config, out


LLAMA_HF_NAMES = {"attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
                  "attn.wo": "self_attn.o_proj", "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj",
                  "mlp.w2": "mlp.down_proj"}


def lora_to_hf_llama(model: LlamaTransformer, factors: dict) -> tuple[dict, bool]:
    """LoRA factors on the HF Llama names; the output rows of q and k (the rows of B) take the same RoPE
    permutation as the weights (:func:`_rope_half`)."""
    c, out = model.cfg, {}
    for path, (a, b) in factors.items():
        _, i, *rest = path.split(".")
        name = ".".join(rest)
        if name in ("attn.wq", "attn.wk"):
            b = _rope_half(b, c.n_head if name == "attn.wq" else c.kv_heads)
        out[f"model.layers.{i}.{LLAMA_HF_NAMES[name]}"] = (a, b)
    return out, False


FAMILY = register(ModelFamily(
    "llama", LlamaConfig,
    lambda cfg, vocab, seq: LlamaTransformer(cfg.model_copy(update={"vocab_size": vocab, "seq_len": seq})),
    _components, "llama2.c decoder: RoPE, RMSNorm, SwiGLU, tied head", default_for_tasks=("story",),
    to_hf=to_hf_llama, lora_to_hf=lora_to_hf_llama))


# ----------------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def generate(model: nn.Module, prompt_tokens: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             stop_token: int | None = None) -> torch.Tensor:
    """Sample ``max_new_tokens`` tokens after ``prompt_tokens`` ((t,) or (b, t) integer tensor) and return the
    prompt followed by them, in the prompt's shape. As llama2.c's ``generate``: each step feeds the last
    ``model.cfg.seq_len`` tokens (longer contexts are cropped), divides the last position's logits by
    ``temperature``, keeps the ``top_k`` largest if given, and draws from the softmax; ``temperature=0`` takes
    the argmax (the first on ties). Draws come from ``generator`` (on the model's device), so a seeded generator
    makes the output reproducible. Models with ``step_cached`` (``LlamaTransformer``) sample with a KV cache while
    the sequence fits ``cfg.seq_len`` (the same logits up to float rounding; past the context every step reruns the
    cropped window, as llama2.c); with any hook attached, every step reruns the whole context, so the hooks apply to
    every position at every step. Works for any model with ``cfg.seq_len`` and ``forward(tokens, positions=)``.

    ``stop_token``: stop early once every row has sampled it (the rows keep their length: ``stop_token`` fills the
    steps not taken). Everything up to each row's first ``stop_token`` is exactly what the full run samples, since
    a step's draw does not depend on later steps; callers that cut at the first stop token (the generation score
    cuts at the next story's BOS) get identical results, faster."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if prompt_tokens.dim() not in (1, 2) or prompt_tokens.shape[-1] == 0 or prompt_tokens.is_floating_point():
        raise ValueError(f"prompt_tokens must be a non-empty (t,) or (b, t) integer tensor, got "
                         f"{tuple(prompt_tokens.shape)} {prompt_tokens.dtype}")
    idx = prompt_tokens.long().reshape(-1, prompt_tokens.shape[-1])
    ctx = model.cfg.seq_len
    stopped = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    hooked = any(h.fns for h in getattr(model, "_hook_points", {}).values())
    cache = ([[None, None] for _ in model.blocks] if hasattr(model, "step_cached") and not hooked
             and idx.shape[1] < ctx else None)
    for step in range(max_new_tokens):
        if cache is not None and idx.shape[1] <= ctx:
            # KV cache while the sequence fits the context: the prompt once, then one token per step
            logits = model.step_cached(idx if cache[0][0] is None else idx[:, -1:], cache).float()
        else:  # past the context llama2.c crops the window, which re-rotates every position: recompute
            cache = None
            logits = model(idx[:, -ctx:], positions=-1).float()  # (b, vocab)
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
        idx = torch.cat((idx, nxt), dim=1)
        if stop_token is not None:
            stopped |= nxt[:, 0] == stop_token
            if bool(stopped.all()):
                pad = idx.new_full((idx.shape[0], max_new_tokens - step - 1), stop_token)
                idx = torch.cat((idx, pad), dim=1)
                break
    return idx[0] if prompt_tokens.dim() == 1 else idx


# ---------------------------------------------------------------------------------------- llama2.c import

_LLAMA2C_ARGS = {"dim": "d_model", "n_layers": "n_layer", "n_heads": "n_head", "n_kv_heads": "n_kv_heads",
                 "vocab_size": "vocab_size", "hidden_dim": "hidden_dim", "multiple_of": "multiple_of",
                 "norm_eps": "norm_eps", "max_seq_len": "seq_len"}
_LLAMA2C_KEYS = [
    (r"tok_embeddings\.weight", "tok_emb.weight"),
    (r"norm\.weight", "ln_final.norm.weight"),
    (r"layers\.(\d+)\.attention\.(w[qkvo])\.weight", r"blocks.\1.attn.\2.weight"),
    (r"layers\.(\d+)\.feed_forward\.(w[123])\.weight", r"blocks.\1.mlp.\2.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", r"blocks.\1.ln1.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"blocks.\1.ln2.weight"),
]


def config_from_llama2c(model_args: dict) -> LlamaConfig:
    """``LlamaConfig`` from a llama2.c checkpoint's ``model_args`` (``dropout`` is ignored: inference has none;
    a missing ``multiple_of`` is llama2.c ``ModelArgs``' default, 256)."""
    unknown = set(model_args) - set(_LLAMA2C_ARGS) - {"dropout"}
    if unknown:
        raise ValueError(f"unknown llama2.c model_args: {sorted(unknown)}")
    fields = {_LLAMA2C_ARGS[k]: v for k, v in model_args.items() if k in _LLAMA2C_ARGS}
    fields.setdefault("multiple_of", 256)
    return LlamaConfig(**fields)


def convert_llama2c_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A llama2.c ``model.state_dict()`` (``_orig_mod.`` prefixes of torch.compile allowed) renamed for
    ``LlamaTransformer.load_state_dict``. The tied ``output.weight`` is dropped after checking that it equals
    ``tok_embeddings.weight``; RoPE buffers are dropped (rebuilt from the config)."""
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    for key, val in state.items():
        if key in ("output.weight", "freqs_cos", "freqs_sin", "freqs_cis"):
            continue
        for pat, repl in _LLAMA2C_KEYS:
            if re.fullmatch(pat, key):
                out[re.sub(pat, repl, key)] = val
                break
        else:
            raise ValueError(f"unexpected key in a llama2.c state dict: {key!r}")
    if "output.weight" in state:
        if "tok_emb.weight" not in out:
            out["tok_emb.weight"] = state["output.weight"]
        elif not torch.equal(out["tok_emb.weight"], state["output.weight"]):
            raise ValueError("output.weight differs from tok_embeddings.weight: not a tied llama2.c model")
    return out
