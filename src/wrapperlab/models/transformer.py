"""minGPT-style decoder-only transformer with TransformerLens-style hook points (paper App. C.2).

Paper preset: 6 blocks, 6 heads, d = 192, GELU MLP of width 4d, pre-LayerNorm, learned positional embeddings,
untied head (minGPT defaults; the paper states only depth, heads and width). No dropout (the paper does not
state any; determinism and exact resumes are simpler without it).

Options for other model families (Tracr ports): ``norm="none"``, ``act="relu"``, ``causal=False``,
``d_head`` independent of ``d_model / n_head``, ``attn_scale``, ``d_vocab_out`` (an output space other than
the input vocabulary; see ``models/tracr.py``).

Hook points (names as TransformerLens): ``hook_embed``, ``hook_pos_embed``, ``blocks.{l}.hook_resid_pre``,
``blocks.{l}.attn.hook_q|hook_k|hook_v``, ``blocks.{l}.attn.hook_pattern``, ``blocks.{l}.attn.hook_z``,
``blocks.{l}.hook_attn_out``, ``blocks.{l}.hook_resid_mid``, ``blocks.{l}.mlp.hook_pre``,
``blocks.{l}.mlp.hook_post``, ``blocks.{l}.hook_mlp_out``, ``blocks.{l}.hook_resid_post``,
``ln_final.hook_normalized``. A hook is ``fn(activation, hook) -> activation | None``.

Fast path: a hook point with no hook attached is skipped entirely, and attention uses fused
``scaled_dot_product_attention`` unless ``hook_pattern`` (or anything inside attention) is hooked, in which
case the pattern is computed explicitly so it can be read or edited.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from wrapperlab.models.registry import Components, ModelFamily, register, residual_hooks, row_matrices

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    family: Literal["gpt"] = "gpt"
    vocab_size: int = Field(0, ge=0, description="0 = taken from the task")
    d_vocab_out: int | None = Field(None, ge=1, description="output classes; default vocab_size (Tracr ports "
                                                            "unembed to the program's own output space)")
    seq_len: int = Field(0, ge=0, description="context length; 0 = taken from the task")
    d_model: int = Field(192, ge=1)
    n_layer: int = Field(6, ge=1)
    n_head: int = Field(6, ge=1)
    d_head: int | None = Field(None, ge=1, description="default d_model // n_head")
    d_mlp: int | None = Field(None, ge=1, description="default 4 * d_model")
    norm: Literal["layernorm", "none"] = "layernorm"
    act: Literal["gelu", "relu"] = "gelu"
    causal: bool = True
    bias: bool = True
    attn_scale: float | None = Field(None, gt=0, description="default 1/sqrt(d_head)")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.d_head is None and self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_head

    @property
    def mlp_dim(self) -> int:
        return self.d_mlp or 4 * self.d_model


class HookPoint(nn.Module):
    """Identity with attachable forward hooks. ``name`` is set by the model."""

    def __init__(self) -> None:
        super().__init__()
        self.name = ""
        self.fns: list[HookFn] = []

    @property
    def active(self) -> bool:
        return bool(self.fns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self.fns:
            out = fn(x, self)
            if out is not None:
                x = out
        return x


def _maybe(hook: HookPoint, x: torch.Tensor) -> torch.Tensor:
    return hook(x) if hook.fns else x


def _norm(cfg: ModelConfig) -> nn.Module:
    return nn.LayerNorm(cfg.d_model) if cfg.norm == "layernorm" else nn.Identity()


CPU_SDPA_FP32 = True
_CPU_SDPA_NOTE = """On the CPU, fused attention runs in fp32 even under bf16 autocast: PyTorch's CPU flash-attention
backward is slower in bf16 than in fp32 (measured at the paper shape, batch 96 x 6 heads x 258 x 32: forward +
backward 169 ms in bf16 against 130 ms in fp32 including the casts; docs/speed.md). On a GPU bf16 stays bf16."""


def attend(hp: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
           scale: float) -> torch.Tensor:
    """Attention of (b, h, t, dh) ``q``, ``k``, ``v`` through the hook points of ``hp`` (``hook_q``, ``hook_k``,
    ``hook_v``, ``hook_pattern``, ``hook_z``): fused ``scaled_dot_product_attention`` when none of the first four is
    hooked (in fp32 under CPU bf16 autocast, see _CPU_SDPA_NOTE), else the explicit pattern, readable and editable.
    Returns z after ``hook_z``, shape (b, h, t, dh). Shared by every wrapperlab model."""
    if not any(p.fns for p in (hp.hook_q, hp.hook_k, hp.hook_v, hp.hook_pattern)):
        if CPU_SDPA_FP32 and q.dtype == torch.bfloat16 and q.device.type == "cpu":
            with torch.autocast("cpu", enabled=False):  # autocast would cast the inputs back to bf16
                z = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal, scale=scale)
        else:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    else:
        q, k, v = _maybe(hp.hook_q, q), _maybe(hp.hook_k, k), _maybe(hp.hook_v, v)
        scores = (q @ k.transpose(-1, -2)) * scale
        if causal:
            t = q.shape[-2]
            mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        z = _maybe(hp.hook_pattern, scores.softmax(dim=-1)) @ v  # pattern: (b, h, query, key)
    return _maybe(hp.hook_z, z)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        inner = cfg.n_head * cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * inner, bias=cfg.bias)
        self.proj = nn.Linear(inner, cfg.d_model, bias=cfg.bias)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_pattern, self.hook_z = HookPoint(), HookPoint()
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(cfg.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h, dh = self.cfg.n_head, self.cfg.head_dim
        q, k, v = self.qkv(x).view(b, t, 3, h, dh).permute(2, 0, 3, 1, 4)  # each (b, h, t, dh)
        z = attend(self, q, k, v, self.cfg.causal, self.scale)
        return self.proj(z.transpose(1, 2).reshape(b, t, h * dh))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_dim, cfg.d_model, bias=cfg.bias)
        self.act = F.gelu if cfg.act == "gelu" else F.relu
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(_maybe(self.hook_post, self.act(_maybe(self.hook_pre, self.fc(x)))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1, self.ln2 = _norm(cfg), _norm(cfg)
        self.attn, self.mlp = Attention(cfg), MLP(cfg)
        self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid = HookPoint(), HookPoint(), HookPoint()
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _maybe(self.hook_resid_pre, x)
        x = _maybe(self.hook_resid_mid, x + _maybe(self.hook_attn_out, self.attn(self.ln1(x))))
        return _maybe(self.hook_resid_post, x + _maybe(self.hook_mlp_out, self.mlp(self.ln2(x))))


class LNFinal(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = _norm(cfg)
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _maybe(self.hook_normalized, self.norm(x))


class HookedModel:
    """The hook API every wrapperlab model shares (TransformerLens names): a subclass sets ``self._hook_points``
    ({name: HookPoint}) and is callable as ``self(tokens, **kw)``."""

    _hook_points: dict[str, HookPoint]

    def _collect_hook_points(self) -> None:
        """Name every HookPoint after its module path (call at the end of ``__init__``)."""
        self._hook_points = {n: m for n, m in self.named_modules() if isinstance(m, HookPoint)}
        for n, m in self._hook_points.items():
            m.name = n

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        return dict(self._hook_points)

    def _resolve(self, name_or_filter) -> list[HookPoint]:
        if callable(name_or_filter):
            return [h for n, h in self._hook_points.items() if name_or_filter(n)]
        if name_or_filter not in self._hook_points:
            raise KeyError(f"no hook point named {name_or_filter!r}")
        return [self._hook_points[name_or_filter]]

    @contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[str | Callable[[str], bool], HookFn]]):
        added: list[tuple[HookPoint, HookFn]] = []
        try:
            for target, fn in fwd_hooks:
                for hp in self._resolve(target):
                    hp.fns.append(fn)
                    added.append((hp, fn))
            yield self
        finally:
            for hp, fn in added:
                hp.fns.remove(fn)

    def run_with_hooks(self, tokens: torch.Tensor, fwd_hooks=(), **kw) -> torch.Tensor:
        with self.hooks(fwd_hooks):
            return self(tokens, **kw)

    def run_with_cache(self, tokens: torch.Tensor, names_filter=None, detach: bool = True, **kw):
        """Returns (logits, cache) where cache maps hook names to activations."""
        if names_filter is None:
            names = list(self._hook_points)
        elif isinstance(names_filter, str):
            names = [names_filter]
        elif callable(names_filter):
            names = [n for n in self._hook_points if names_filter(n)]
        else:
            names = list(names_filter)
        cache: dict[str, torch.Tensor] = {}

        def save(x: torch.Tensor, hook: HookPoint) -> None:
            cache[hook.name] = x.detach() if detach else x

        logits = self.run_with_hooks(tokens, [(n, save) for n in names], **kw)
        return logits, cache

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class Transformer(HookedModel, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1 or cfg.seq_len < 1:
            raise ValueError("ModelConfig.vocab_size and seq_len must be set (>= 1) before building a model")
        self.cfg = cfg
        self.family = cfg.family  # gpt, or a family that reuses this class (tracr)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_final = LNFinal(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.d_vocab_out or cfg.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))
        self._collect_hook_points()

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    # ------------------------------------------------------------------ forward
    def residual(self, tokens: torch.Tensor) -> torch.Tensor:
        """Residual stream after the last block (before the final norm), shape (b, t, d)."""
        t = tokens.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds the model's context ({self.cfg.seq_len})")
        pos = torch.arange(t, device=tokens.device)
        x = _maybe(self.hook_embed, self.tok_emb(tokens)) + _maybe(self.hook_pos_embed, self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | int | None = None) -> torch.Tensor:
        """Logits (b, t, vocab); with ``positions`` (an int or a 1-D index tensor) only at those positions,
        which skips the vocabulary head everywhere else (the answer-only fast path)."""
        x = self.residual(tokens)
        if positions is not None:
            x = x[:, positions]
        return self.head(self.ln_final(x))



GPT_MATRICES = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


def gpt_components(model: Transformer) -> Components:
    """Components of ``Transformer`` (shared by the families that reuse the class): a neuron is a row of
    ``attn.qkv`` (one query/key/value dimension of one head), ``attn.proj``, ``mlp.fc`` (one MLP hidden neuron) or
    ``mlp.proj``, with its bias entry."""
    n = model.cfg.n_layer
    return Components(model.family, n, model.cfg.causal, residual_hooks(n),
                      [f"blocks.{i}.attn.hook_pattern" for i in range(n)],
                      row_matrices(model, {m: m for m in GPT_MATRICES}), GPT_MATRICES)


def to_gpt2(model: Transformer) -> tuple[dict, dict]:
    """The model as a Hugging Face GPT-2 checkpoint (``GPT2LMHeadModel``): exact GELU (``"gelu"``, not GPT-2's
    tanh form), untied head, LayerNorm eps 1e-5; GPT-2's ``Conv1D`` stores (in, out), so every linear weight is
    transposed. Options GPT-2 cannot express (no norm, ReLU, bidirectional, another head size or scale, an output
    space other than the vocabulary) raise ``ValueError``."""
    c = model.cfg
    odd = [f"{k}={getattr(c, k)}" for k, ok in (
        ("norm", c.norm == "layernorm"), ("act", c.act == "gelu"), ("causal", c.causal),
        ("d_head", c.d_head in (None, c.d_model // c.n_head) and c.d_model % c.n_head == 0),
        ("attn_scale", c.attn_scale is None or abs(c.attn_scale * math.sqrt(c.head_dim) - 1) < 1e-12),
        ("d_vocab_out", c.d_vocab_out in (None, c.vocab_size))) if not ok]
    if odd:
        raise ValueError(f"this gpt model has no GPT-2 equivalent ({', '.join(odd)})")
    sd = {k: v.detach() for k, v in model.state_dict().items()}

    def bias(name: str, n: int) -> torch.Tensor:
        return sd.get(name, torch.zeros(n, dtype=sd["tok_emb.weight"].dtype))

    out = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"],
           "transformer.ln_f.weight": sd["ln_final.norm.weight"], "transformer.ln_f.bias": sd["ln_final.norm.bias"],
           "lm_head.weight": sd["head.weight"]}
    for i in range(c.n_layer):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[h + theirs + ".weight"], out[h + theirs + ".bias"] = sd[b + ours + ".weight"], sd[b + ours + ".bias"]
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"),
                             ("mlp.proj", "mlp.c_proj")):
            w = sd[b + ours + ".weight"]
            out[h + theirs + ".weight"] = w.t().contiguous()
            out[h + theirs + ".bias"] = bias(b + ours + ".bias", w.shape[0])
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size,
              "n_positions": c.seq_len, "n_embd": c.d_model, "n_layer": c.n_layer, "n_head": c.n_head,
              "n_inner": c.mlp_dim, "activation_function": "gelu", "layer_norm_epsilon": 1e-5,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
              "tie_word_embeddings": False}
    return config, out


GPT2_NAMES = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}


def lora_to_gpt2(model: Transformer, factors: dict) -> tuple[dict, bool]:
    """LoRA factors on the GPT-2 names; Conv1D stores (in, out), so PEFT applies them with fan_in_fan_out."""
    out = {}
    for path, ab in factors.items():
        _, i, *rest = path.split(".")
        out[f"transformer.h.{i}.{GPT2_NAMES['.'.join(rest)]}"] = ab
    return out, True


FAMILY = register(ModelFamily(
    "gpt", ModelConfig,
    lambda cfg, vocab, seq: Transformer(cfg.model_copy(update={"vocab_size": vocab, "seq_len": seq})),
    gpt_components, "minGPT-style decoder: learned positions, pre-LayerNorm, GELU MLP, untied head",
    to_hf=to_gpt2, lora_to_hf=lora_to_gpt2))
