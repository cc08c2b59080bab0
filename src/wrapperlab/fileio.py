"""Atomic file writes shared by every layer (checkpoints, compiled models, analysis results)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


class IntegrityError(ValueError):
    """A tensor file that is missing, does not match its recorded SHA-256, or is not safetensors."""


def read_verified_tensors(path: Path, sha256: str | None) -> dict:
    """Tensors of a safetensors file after checking its SHA-256 (never unpickled)."""
    from safetensors.torch import load as st_load

    path = Path(path)
    if not path.is_file():
        raise IntegrityError(f"{path}: tensor file missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise IntegrityError(f"{path}: checksum mismatch (truncated or corrupted)")
    try:
        return st_load(data)
    except Exception as e:  # safetensors raises its own error types
        raise IntegrityError(f"{path}: unreadable safetensors file ({e})") from None
