"""The TinyStories tokenizer: SentencePiece BPE trained on the local corpus (paper App. B.3, F.1).

The paper's settings: BPE, vocabulary 8192, ``split_digits=True``, ``byte_fallback=True``,
``character_coverage=1.0``, ``normalization_rule_name=identity``, trained on the text of the first 10 shards. Every
text is encoded with BOS and without EOS, and a shard's texts are concatenated into one token stream.

Choices the paper leaves open (or that the authors' code does differently):
- Whitespace is kept exactly (``remove_extra_whitespaces=False``), so ``decode(encode(text)) == text`` for every
  text, newlines of the instruction format included (tested); the authors' default trainer collapses runs of spaces.
- Ids: unk 0, BOS 1, EOS 2 (llama2.c's layout), no pad id (the LM stream has no padding).
- Training is single-threaded with the input in the given order (``shuffle_input_sentence=False``), so the same
  texts give byte-identical model files (tested). ``input_sentence_size`` caps the texts read (0 = all).
- The vocabulary size is a parameter: 8192 for the paper; the cpu scale uses a few hundred pieces, which the small
  procedural corpus supports (SentencePiece refuses a size the corpus cannot fill — reported as one line).

The model file is a SentencePiece protobuf: data, not code. It is written atomically, with its SHA-256 beside it in
the caller's metadata if wanted (``Tokenizer.sha256``).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from wrapperlab.fileio import atomic_write_bytes

PAPER_VOCAB = 8192


class TokenizerError(ValueError):
    """A tokenizer that cannot be trained or read (one-line message)."""


def _spm():
    try:
        import sentencepiece
    except ImportError:  # pragma: no cover - depends on the install
        raise TokenizerError("the TinyStories tokenizer needs sentencepiece: pip install -e '.[stories]'") from None
    return sentencepiece


class Tokenizer:
    """A trained SentencePiece model (``.proto`` bytes) with the encode/decode the experiment uses."""

    def __init__(self, proto: bytes, source: str = "<memory>"):
        spm = _spm()
        self.proto, self.source = bytes(proto), source
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with multi-line text
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise TokenizerError(f"{source}: not a SentencePiece model ({first})") from None

    # ------------------------------------------------------------------ building
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = PAPER_VOCAB, input_sentence_size: int = 0) -> Tokenizer:
        """Train the paper's BPE tokenizer on ``texts`` (see the module docstring for every setting)."""
        spm = _spm()
        if vocab_size < 260:  # 3 specials + 256 byte pieces + at least one merge
            raise TokenizerError(f"vocab_size: must be >= 260 with byte fallback (got {vocab_size})")
        texts = [t for t in texts if t]
        if not texts:
            raise TokenizerError("texts: nothing to train the tokenizer on")
        out = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_writer=out, model_type="bpe", vocab_size=vocab_size,
                split_digits=True, byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
                remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2,
                pad_id=-1, num_threads=1, shuffle_input_sentence=False, input_sentence_size=input_sentence_size,
                max_sentence_length=1 << 20, minloglevel=2)
        except RuntimeError as e:
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            raise TokenizerError(f"sentencepiece training failed: {lines[-1] if lines else e}") from None
        return cls(out.getvalue(), "<trained>")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        p = Path(path)
        if not p.is_file():
            raise TokenizerError(f"{p}: no such tokenizer model file")
        return cls(p.read_bytes(), str(p))

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(p, self.proto)
        return p

    # ------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        return int(self.sp.GetPieceSize())

    @property
    def bos_id(self) -> int:
        return int(self.sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self.sp.eos_id())

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.proto).hexdigest()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = list(self.sp.EncodeAsIds(text))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; BOS/EOS ids are dropped."""
        specials = {self.bos_id, self.eos_id}
        return self.sp.DecodeIds([int(i) for i in ids if int(i) not in specials])

    def spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of ``text`` (no BOS) and each id's (begin, end) character offsets in ``text`` (a byte-fallback
        piece of a multi-byte character may have begin == end)."""
        m = self.sp.encode(text, return_type="offset_mapping")
        return [int(i) for i in m["ids"]], [(int(b), int(e)) for b, e in m["offsets"]]

    def pieces(self, text: str) -> list[str]:
        return list(self.sp.EncodeAsPieces(text))

    def encode_stream(self, texts: Iterable[str]) -> np.ndarray:
        """One shard's token stream: every text with BOS, no EOS, concatenated, as uint16 (vocab < 65536)."""
        if self.vocab_size > np.iinfo(np.uint16).max:
            raise TokenizerError(f"vocab_size {self.vocab_size} does not fit the uint16 token stream")
        out: list[int] = []
        for t in texts:
            out += self.encode(t)
        return np.asarray(out, dtype=np.uint16)
