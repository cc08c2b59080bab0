"""Local Hugging Face checkpoints as a model family (``hf``), with the same named components as our own models.

A checkpoint is a local directory (``config.json`` + safetensors); loading never contacts a hub (offline mode is
forced and a hub id is refused). Supported layouts: GPT-2, GPT-NeoX (Pythia) and the Llama layout (Llama, Qwen2,
Mistral and the other ``model.layers.{l}.self_attn`` / ``mlp.gate_proj`` decoders). Weights are used as stored: no
folding, centring or merging, so the difference between two checkpoints is the real one.

The wrapper adds the TransformerLens hook names our analyses read, attached to the HF modules with PyTorch hooks:
``blocks.{l}.hook_resid_pre`` (a layer's input), ``blocks.{l}.hook_resid_post`` (its output),
``blocks.{l}.attn.hook_pattern`` (read-only here: eager attention is switched on while a pattern hook is attached)
and ``ln_final.hook_normalized``. Prunable units are the output units of every linear map in the blocks, named as
in the checkpoint (GPT-2's ``Conv1D`` weights are (in, out): their units are columns).
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from wrapperlab.models.registry import Components, Matrix, ModelFamily, register, residual_hooks
from wrapperlab.models.transformer import HookedModel, HookPoint


class HFLoadError(ValueError):
    """A path that is not a loadable local checkpoint (one-line message)."""


@dataclass(frozen=True)
class Layout:
    """Where a decoder architecture keeps its blocks, attention, final norm and linear maps (paths in a layer;
    axis 1 for (in, out) weights)."""

    layers: str
    attn: str
    final_norm: str
    matrices: dict[str, int]


GPT2 = Layout("transformer.h", "attn", "transformer.ln_f",
              {"attn.c_attn": 1, "attn.c_proj": 1, "mlp.c_fc": 1, "mlp.c_proj": 1})
NEOX = Layout("gpt_neox.layers", "attention", "gpt_neox.final_layer_norm",
              {"attention.query_key_value": 0, "attention.dense": 0, "mlp.dense_h_to_4h": 0, "mlp.dense_4h_to_h": 0})
LLAMA = Layout("model.layers", "self_attn", "model.norm",
               {f"self_attn.{p}": 0 for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
               | {f"mlp.{p}": 0 for p in ("gate_proj", "up_proj", "down_proj")})
LAYOUTS = {"gpt2": GPT2, "gpt_neox": NEOX, "llama": LLAMA, "qwen2": LLAMA, "mistral": LLAMA, "qwen3": LLAMA}


class HFConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    family: Literal["hf"] = "hf"
    path: str = Field(..., description="local Hugging Face model directory (config.json + safetensors), or "
                                       "BASE+ADAPTER (a PEFT adapter on it, merged)")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:  # absolute, so the run id names the checkpoint wherever the command started
        p = Path(v).expanduser()
        if not p.exists() and "+" in v:
            base, _, adapter = v.rpartition("+")
            return f"{Path(base).expanduser().resolve()}+{Path(adapter).expanduser().resolve()}"
        return str(p.resolve())


def check_local(path: str | Path) -> Path:
    """``path`` as a local checkpoint directory, or one line saying why not (hub ids are never downloaded)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise HFLoadError(f"{path}: not a directory; wrapperlab loads local Hugging Face directories only (hub ids "
                          f"such as 'gpt2' are not downloaded: save the model to a directory first)")
    if not (p / "config.json").is_file():
        raise HFLoadError(f"{path}: no config.json; not a Hugging Face model directory")
    return p.resolve()


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def hf_model_type(path: str | Path) -> str:
    try:
        return str(json.loads((check_local(path) / "config.json").read_text()).get("model_type", ""))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise HFLoadError(f"{path}: config.json is not a JSON object ({e})") from None


class _Slot(nn.Module):
    """Hook points of one HF module, applied by PyTorch hooks that are bound methods of this slot, so that a deep
    copy of the model (pruning works on one) rebinds them to the copy's own hook points."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_resid_pre, self.hook_resid_post, self.hook_normalized = HookPoint(), HookPoint(), HookPoint()
        self.attn = nn.Module()
        self.attn.hook_pattern = HookPoint()

    def pre(self, module, args, kwargs):
        hp = self.hook_resid_pre
        if not hp.fns:
            return None
        if args:
            return (hp(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hp(kwargs["hidden_states"])}

    def _out(self, hp: HookPoint, out):
        if not hp.fns:
            return None
        return (hp(out[0]), *out[1:]) if isinstance(out, tuple) else hp(out)

    def post(self, module, args, out):
        return self._out(self.hook_resid_post, out)

    def final(self, module, args, out):
        return self._out(self.hook_normalized, out)

    def pattern(self, module, args, out):
        hp = self.attn.hook_pattern
        if hp.fns and isinstance(out, tuple) and len(out) > 1 and out[1] is not None:
            hp(out[1])  # (b, heads, query, key); read-only: the layer has already used it


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


class HFModel(HookedModel, nn.Module):
    """A ``transformers`` causal LM behind wrapperlab's model API: ``model(tokens, positions=None)`` gives logits,
    hooks use TransformerLens names, parameters are the checkpoint's under ``hf.``."""

    family = "hf"

    def __init__(self, hf_model: nn.Module, path: str = ""):
        super().__init__()
        mtype = hf_model.config.model_type
        if mtype not in LAYOUTS:
            raise HFLoadError(f"{path or mtype}: model type {mtype!r} is not supported; supported: "
                              f"{', '.join(sorted(LAYOUTS))}")
        self.layout = LAYOUTS[mtype]
        self.hf = hf_model
        self.path = path
        layers = _get(hf_model, self.layout.layers)
        self.n_layer = len(layers)
        self.blocks = nn.ModuleList(_Slot() for _ in range(self.n_layer))
        self.ln_final = _Slot()
        for layer, slot in zip(layers, self.blocks):
            layer.register_forward_pre_hook(slot.pre, with_kwargs=True)
            layer.register_forward_hook(slot.post)
            _get(layer, self.layout.attn).register_forward_hook(slot.pattern)
        _get(hf_model, self.layout.final_norm).register_forward_hook(self.ln_final.final)
        names = [f"blocks.{i}.{h}" for i in range(self.n_layer)
                 for h in ("hook_resid_pre", "hook_resid_post", "attn.hook_pattern")] + ["ln_final.hook_normalized"]
        self._hook_points = {n: self.get_submodule(n) for n in names}
        for n, hp in self._hook_points.items():
            hp.name = n

    @property
    def seq_len(self) -> int:
        c = self.hf.config
        return int(getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", 0))

    @property
    def vocab_size(self) -> int:
        return int(self.hf.config.vocab_size)

    # ------------------------------------------------------------------------------------------- hooks
    @contextmanager
    def hooks(self, fwd_hooks):
        """As ``HookedModel.hooks``; while an attention pattern is hooked, attention runs eagerly so that the
        pattern exists (fused kernels never form it)."""
        fwd_hooks = list(fwd_hooks)
        with super().hooks(fwd_hooks):
            wants = any(b.attn.hook_pattern.fns for b in self.blocks)
            impl = self.hf.config._attn_implementation
            if wants and impl != "eager":
                self.hf.set_attn_implementation("eager")
            try:
                yield self
            finally:
                if wants and impl != "eager":
                    self.hf.set_attn_implementation(impl)

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | int | None = None) -> torch.Tensor:
        """Logits (b, t, vocab); with ``positions`` (an int or a 1-D index tensor) only there, computed only there
        (``logits_to_keep``: a large vocabulary is never projected at every position)."""
        if positions is None:
            return self.hf(input_ids=tokens, use_cache=False).logits
        if isinstance(positions, int):
            keep = torch.tensor([positions % tokens.shape[1]], device=tokens.device)
            return self.hf(input_ids=tokens, use_cache=False, logits_to_keep=keep).logits[:, 0]
        return self.hf(input_ids=tokens, use_cache=False, logits_to_keep=positions).logits


def _load_raw(path: str | Path, device: str, dtype: torch.dtype):
    """The transformers model at ``path`` (offline), in ``dtype`` on ``device``, in eval mode."""
    p = check_local(path)
    _offline()
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise HFLoadError("Hugging Face models need the hf extra: pip install 'wrapperlab[hf]'") from None
    mtype = hf_model_type(p)
    if mtype not in LAYOUTS:
        raise HFLoadError(f"{path}: model type {mtype!r} is not supported; supported: {', '.join(sorted(LAYOUTS))}")
    hf_logging.disable_progress_bar()
    try:
        if torch.empty(0).device.type == "meta":  # a weightless model of the architecture (names and shapes only)
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(str(p), local_files_only=True, attn_implementation="sdpa")
            return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
        hf = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, dtype=dtype,
                                                  attn_implementation="sdpa")
    except Exception as e:  # a truncated safetensors file, a shape mismatch, ...: whatever transformers raises
        raise HFLoadError(f"{path}: cannot load the checkpoint ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:300]})") from None
    return hf.to(device).eval()


def load_hf(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> HFModel:
    """The local checkpoint at ``path`` as an ``HFModel`` in eval mode (offline). Weights are used as stored, in
    fp32 by default (a bf16 checkpoint is upcast exactly, so gradients and differences are not rounded)."""
    return HFModel(_load_raw(path, device, dtype), str(check_local(path)))


def split_adapter(spec: str | Path) -> tuple[Path, Path | None]:
    """(base, adapter) of a model path: ``BASE+ADAPTER``, a PEFT adapter directory whose ``adapter_config.json``
    names a local base (``base_model_name_or_path``), or a plain model directory (adapter None)."""
    p = Path(spec).expanduser()
    if not p.exists() and "+" in str(spec):
        base, _, adapter = str(spec).rpartition("+")
        return check_local(base), _check_adapter(adapter)
    if (p / "adapter_config.json").is_file():
        named = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not named:
            raise HFLoadError(f"{spec}: a PEFT adapter whose config names no base model; give BASE+{spec}")
        base = Path(named) if Path(named).is_absolute() else (p / named if (p / named).exists() else Path(named))
        return check_local(base), p.resolve()
    return check_local(p), None


def _check_adapter(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not (p / "adapter_config.json").is_file():
        raise HFLoadError(f"{path}: not a PEFT adapter directory (no adapter_config.json)")
    return p.resolve()


def _peft(base: str | Path, adapter: str | Path, device: str, dtype: torch.dtype):
    try:
        from peft import PeftModel
    except ImportError:
        raise HFLoadError("PEFT adapters need the hf extra: pip install 'wrapperlab[hf]'") from None
    raw = _load_raw(base, device, dtype)
    try:
        return PeftModel.from_pretrained(raw, str(_check_adapter(adapter)), is_trainable=False)
    except (OSError, ValueError, KeyError) as e:
        raise HFLoadError(f"{adapter}: cannot apply the adapter to {base} ({' '.join(str(e).split())[:300]})") from None


def load_adapter(base: str | Path, adapter: str | Path, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> HFModel:
    """A base checkpoint with a PEFT (LoRA) adapter merged into its weights (``merge_and_unload``); every weight
    trainable again (PEFT freezes the base), as for any loaded model."""
    merged = _peft(base, adapter, device, dtype).merge_and_unload().eval()
    merged.requires_grad_(True)
    return HFModel(merged, f"{base}+{adapter}")


def adapter_delta(spec: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The adapter's own change of every weight it adapts, {parameter name of the merged ``HFModel``: ΔW}, computed
    by PEFT (``get_delta_weight``: lora_alpha / r · B A, transposed for fan_in_fan_out layers)."""
    base, adapter = split_adapter(spec)
    if adapter is None:
        raise HFLoadError(f"{spec}: not a PEFT adapter (give BASE+ADAPTER or an adapter directory)")
    pm = _peft(base, adapter, "cpu", dtype)
    delta: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, mod in pm.base_model.model.named_modules():
            if hasattr(mod, "get_delta_weight") and getattr(mod, "active_adapters", None):
                for a in mod.active_adapters:
                    d = mod.get_delta_weight(a).detach()
                    delta[f"hf.{name}.weight"] = delta[f"hf.{name}.weight"] + d if f"hf.{name}.weight" in delta else d
    return delta


def load_any(spec: str | Path, device: str = "cpu") -> HFModel:
    """A local checkpoint, or a base with its adapter merged (see :func:`split_adapter`). Under a meta default
    device, the base's architecture without weights."""
    base, adapter = split_adapter(spec)
    if torch.empty(0).device.type == "meta":
        adapter = None
    return load_hf(base, device) if adapter is None else load_adapter(base, adapter, device)


def hf_components(model: HFModel) -> Components:
    params = dict(model.named_parameters())
    mats = []
    for i in range(model.n_layer):
        for name, axis in model.layout.matrices.items():
            w = f"hf.{model.layout.layers}.{i}.{name}.weight"
            if w in params:
                b = w[: -len("weight")] + "bias"
                mats.append(Matrix(w, i, name, b if b in params else None, axis))
    names = tuple(dict.fromkeys(m.name for m in mats))
    return Components("hf", model.n_layer, True, residual_hooks(model.n_layer),
                      [f"blocks.{i}.attn.hook_pattern" for i in range(model.n_layer)], mats, names)


def _build(cfg: HFConfig, vocab: int, seq: int) -> HFModel:
    """The checkpoint itself (a stage that trains an ``hf`` model continues it; the task's vocabulary must fit)."""
    model = load_any(cfg.path)
    if vocab > model.vocab_size:
        raise HFLoadError(f"model.path: {cfg.path} has {model.vocab_size} token embeddings; the task needs {vocab}")
    return model


def _fresh(model: HFModel) -> HFModel:
    from transformers import AutoModelForCausalLM

    return HFModel(AutoModelForCausalLM.from_config(copy.deepcopy(model.hf.config)), model.path)


FAMILY = register(ModelFamily(
    "hf", HFConfig, _build, hf_components, fresh=_fresh, description=
    "a local Hugging Face checkpoint (GPT-2, GPT-NeoX, Llama/Qwen2/Mistral layouts), weights as stored"))
