"""Export a model as a standard Hugging Face checkpoint directory that ``transformers`` loads with no wrapperlab code.

The family's ``to_hf`` gives the ``config.json`` fields and the state dict in the HF parameter names (``gpt`` as
GPT-2, ``llama`` as Llama; weights as stored, no folding or centring); this module writes ``config.json``,
``model.safetensors`` (fp32 unless the weights are fp64) and, when given one, the tokenizer: a run's own word-level
vocabulary becomes a ``tokenizers`` WordLevel ``tokenizer.json`` (whitespace-separated tokens, as the capability
files write prompts). The directory appears whole or not at all (written beside it, then renamed).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from wrapperlab.models.registry import family_of


class ExportError(ValueError):
    """The model or the output directory cannot be exported to (one-line message)."""


def word_level_tokenizer(tokens: list[str] | tuple[str, ...], *, pad: str | None = None, bos: str | None = None,
                         eos: str | None = None, max_length: int | None = None) -> dict[str, str]:
    """``tokenizer.json`` and ``tokenizer_config.json`` of a word-level tokenizer whose ids are the positions of
    ``tokens``: text is split on whitespace and each piece must be a token (anything else fails loudly: there is
    no unknown token)."""
    if len(set(tokens)) != len(tokens) or any(not t or any(c.isspace() for c in t) for t in tokens):
        raise ExportError("a word-level tokenizer needs distinct tokens without whitespace")
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(tokens)}, "unk_token": "[UNK]"}}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           **{k: v for k, v in (("pad_token", pad), ("bos_token", bos), ("eos_token", eos)) if v is not None},
           **({"model_max_length": max_length} if max_length else {})}
    return {"tokenizer.json": json.dumps(tok, indent=1, ensure_ascii=False),
            "tokenizer_config.json": json.dumps(cfg, indent=1)}


def hf_checkpoint(model) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, state dict) of ``model`` in Hugging Face form; ExportError when its family has none."""
    fam = family_of(model)
    if fam.to_hf is None:
        raise ExportError(f"the {fam.name} family has no Hugging Face equivalent to export to")
    try:
        config, state = fam.to_hf(model)
    except ValueError as e:
        raise ExportError(str(e)) from None
    dtype = torch.float64 if any(v.dtype == torch.float64 for v in state.values()) else torch.float32
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    # our vocabularies have no BOS/EOS token: the config classes' defaults (GPT-2's 50256, Llama's 1 and 2) would
    # name a token outside the vocabulary, or an ordinary one that generation would stop at
    no_special = {"bos_token_id": None, "eos_token_id": None}
    return {**config, **no_special, "torch_dtype": str(dtype).removeprefix("torch.")}, state


def write_hf(model, out: str | Path, files: dict[str, str | bytes] | None = None,
             extra_config: dict | None = None) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory ``out`` (which must not exist, or be empty), with the
    extra ``files`` (a tokenizer) beside it. Returns ``out``."""
    from safetensors.torch import save_file

    out = check_out(out)
    config, state = hf_checkpoint(model)
    with _whole_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps({**config, **(extra_config or {})}, indent=1))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return out


def check_out(out: str | Path) -> Path:
    """``out`` as a directory that may be written: new, or empty (one line otherwise)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out: {out} already exists and is not an empty directory (choose another)")
    return out


@contextmanager
def _whole_dir(out: Path):
    """A temporary directory beside ``out`` that becomes ``out`` when the block succeeds, and vanishes otherwise."""
    tmp = out.with_name(f".{out.name}.export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_peft_adapter(model, factors: dict, rank: int, alpha: float, base_dir: str | Path, out: str | Path) -> Path:
    """Write LoRA ``factors`` ({our module path: (A, B)}) of ``model``'s family as a PEFT adapter directory
    (``adapter_config.json`` + ``adapter_model.safetensors``) for the base checkpoint ``base_dir`` that
    :func:`write_hf` wrote from the same family; ``peft`` loads it without wrapperlab."""
    from safetensors.torch import save_file

    fam = family_of(model)
    if fam.lora_to_hf is None:
        raise ExportError(f"the {fam.name} family has no Hugging Face equivalent to export an adapter for")
    named, fan_in_fan_out = fam.lora_to_hf(model, factors)
    out = check_out(out)
    tensors = {}
    for path, (a, b) in named.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = a.detach().float().contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = b.detach().float().contiguous()
    targets = sorted({".".join(p.split(".")[-2:]) for p in named})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
              "target_modules": targets, "fan_in_fan_out": fan_in_fan_out, "bias": "none", "inference_mode": True,
              "base_model_name_or_path": str(Path(base_dir).resolve())}
    with _whole_dir(out) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out
