"""The files of compiled Tracr programs as the task layer reads them: vocabularies and lengths, no weights.

A compiled program is ``<name>.json`` (format, the model's shape, ``TracrMeta``, the SHA-256 of its tensors) beside
``<name>.safetensors``; the paper's Counter and Max-identifier ship in ``wrapperlab/data/tracr``. Tasks need only
the JSON (which tokens exist, which classes the output has, how long an input is); ``models/tracr.py`` compiles,
writes and loads the weights. Plain Python: no torch, no JAX.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

BOS, PAD = "BOS", "PAD"  # tracr's compiler_bos / compiler_pad names used throughout wrapperlab
FORMAT = "wrapperlab-tracr/1"
SHIPPED = ("counter", "max-identifier")

class TracrError(ValueError):
    """A Tracr problem reported as one line (missing extra, unknown program, bad or foreign file)."""

def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v

@dataclass
class TracrMeta:
    """What the weights mean: vocabularies, output kind, the label of every residual dimension."""

    program: str
    input_vocab: list  # token id -> value (BOS and PAD included)
    output_vocab: list | None  # output class id -> value; None for a numerical output
    max_seq_len: int  # RASP tokens, BOS excluded
    causal: bool
    residual_labels: list[str]
    compiler: dict = field(default_factory=dict)

    @property
    def categorical(self) -> bool:
        return self.output_vocab is not None

    @property
    def bos_id(self) -> int:
        return self.input_vocab.index(BOS)

    @property
    def pad_id(self) -> int:
        return self.input_vocab.index(PAD)

    def encode(self, tokens: list) -> list[int]:
        ids = {_key(v): i for i, v in enumerate(self.input_vocab)}
        out = []
        for t in [BOS, *tokens]:
            if _key(t) not in ids:
                raise TracrError(f"token {t!r} is not in program {self.program!r}'s vocabulary")
            out.append(ids[_key(t)])
        if len(out) > self.max_seq_len + 1:
            raise TracrError(f"input of {len(tokens)} tokens exceeds max_seq_len {self.max_seq_len}")
        return out

def _key(v: Any) -> str:
    return json.dumps(_jsonable(v))



def shipped_dir() -> Path:
    return Path(str(resources.files("wrapperlab") / "data" / "tracr"))


def read_program(name_or_path: str | Path) -> tuple[Path, dict]:
    """(path, JSON document) of a shipped program by name or of a ``.json`` written by ``wrapperlab tracr
    compile``; one-line ``TracrError`` for an unknown name or a bad file."""
    p = Path(name_or_path)
    if p.suffix != ".json":
        if str(name_or_path) not in SHIPPED:
            raise TracrError(f"no shipped compiled model named {str(name_or_path)!r}; shipped: {', '.join(SHIPPED)} "
                             f"(or give a .json written by 'wrapperlab tracr compile')")
        p = shipped_dir() / f"{str(name_or_path).replace('-', '_')}.json"
    if not p.is_file():
        raise TracrError(f"{p}: no such compiled-model file")
    try:
        doc = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TracrError(f"{p}: not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise TracrError(f"{p}: not a {FORMAT} file")
    return p, doc


def program_meta(name_or_path: str | Path) -> TracrMeta:
    p, doc = read_program(name_or_path)
    try:
        return TracrMeta(**doc["meta"])
    except (KeyError, TypeError):
        raise TracrError(f"{p}: unreadable compiled model (meta)") from None
