"""Atomic file writes shared by every layer (checkpoints, compiled models, analysis results), and a lock.

A write goes to a hidden temporary file in the same directory, is fsync'ed, then renamed over the target: a
reader sees the old file or the new one, never a part. A failed write (disk full) removes its temporary file and
leaves the old file in place."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, interrupted...: the old file stays, the partial one goes
        tmp.unlink(missing_ok=True)
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete the temporary files that a process killed mid-write left in ``directory`` (``.NAME.tmp-PID`` whose
    PID is no longer running on this machine): SIGKILL gives ``atomic_write_bytes`` no chance to clean up, and
    the target file itself was never touched. Returns what was removed."""
    gone = []
    directory = Path(directory)
    if not directory.is_dir():
        return gone
    for p in directory.iterdir():
        name, _, pid = p.name.rpartition(".tmp-")
        if name.startswith(".") and pid.isdigit() and p.is_file() and not _pid_alive(int(pid)):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


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


class DirLock:
    """An exclusive advisory lock on ``directory/.lock`` (``fcntl.flock``), held across processes until
    released. The kernel drops it when the holder dies, so a killed process never leaves it stale."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / ".lock"
        self._fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
