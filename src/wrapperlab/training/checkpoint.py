"""Checkpoints: safetensors for tensors + a JSON sidecar, written atomically; never unpickled.

A run directory holds ``checkpoint.json`` (config, parent, step, status, metrics, RNG, checksum) and the one
``ckpt-XXXXXXXX.safetensors`` it points to. Each save writes a *new* tensor file, then atomically replaces the
sidecar, then deletes older tensor files — so a crash at any instant leaves a sidecar that points at a complete
file whose SHA-256 it records. ``metrics.jsonl`` is a convenience copy of the metrics, also replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from wrapperlab.fileio import (  # noqa: F401  (atomic_write_* are re-exported)
    IntegrityError,
    atomic_write_bytes,
    atomic_write_text,
    read_verified_tensors,
)

SIDECAR = "checkpoint.json"
FORMAT = "wrapperlab-checkpoint/1"


class CheckpointError(ValueError):
    """A missing, corrupt or foreign checkpoint (one-line message)."""


def read_sidecar(run_dir: str | Path) -> dict:
    p = Path(run_dir) / SIDECAR
    if not p.is_file():
        raise CheckpointError(f"{run_dir}: no {SIDECAR} (not a wrapperlab run directory, or never checkpointed)")
    try:
        side = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: corrupt sidecar ({e.__class__.__name__})") from None
    if not isinstance(side, dict) or side.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a {FORMAT} sidecar")
    return side


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], sidecar: dict) -> dict:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    flat = {}
    for k, v in tensors.items():  # tied weights (a Hugging Face model's embedding and head) are stored once each
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr()
        flat[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    data = st_save(flat)
    fname = f"ckpt-{step:08d}.safetensors"
    atomic_write_bytes(run_dir / fname, data)
    side = dict(sidecar, format=FORMAT, step=step,
                checkpoint={"file": fname, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
    atomic_write_text(run_dir / SIDECAR, json.dumps(side, indent=1))
    metrics = side.get("metrics", [])
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in metrics))
    for old in run_dir.glob("ckpt-*.safetensors"):
        if old.name != fname:
            old.unlink(missing_ok=True)
    return side


def load_tensors(run_dir: str | Path, side: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(sidecar, tensors) of a run's latest checkpoint, after verifying its checksum."""
    side = side or read_sidecar(run_dir)
    meta = side.get("checkpoint") or {}
    p = Path(run_dir) / str(meta.get("file", ""))
    if not meta.get("file") or not p.is_file():
        raise CheckpointError(f"{run_dir}: checkpoint file {meta.get('file')!r} named by the sidecar is missing")
    try:
        return side, read_verified_tensors(p, meta.get("sha256"))
    except IntegrityError as e:
        raise CheckpointError(str(e)) from None


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            t = val if torch.is_tensor(val) else torch.tensor(val)
            tensors[f"{idx}.{key}"] = t
    return tensors, sd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    opt.load_state_dict({"state": state, "param_groups": groups})


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict load with a one-line error naming the first mismatch (names, shapes or dtypes)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise CheckpointError(f"{where}: weights do not fit the model ({what})")
    for k, v in own.items():
        if state[k].shape != v.shape:
            raise CheckpointError(f"{where}: {k} has shape {tuple(state[k].shape)}, model needs {tuple(v.shape)}")
        if state[k].dtype != v.dtype:
            raise CheckpointError(f"{where}: {k} has dtype {state[k].dtype}, model needs {v.dtype}")
    model.load_state_dict(state)
