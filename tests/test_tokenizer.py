"""The TinyStories tokenizer (paper App. F.1): the paper's SentencePiece settings, exact round trips, stream layout."""

import numpy as np
import pytest

pytest.importorskip("sentencepiece")

from wrapperlab.tasks.stories import generate_records, make_text  # noqa: E402
from wrapperlab.tasks.tokenizer import Tokenizer, TokenizerError  # noqa: E402


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    recs = generate_records(300, np.random.default_rng(0))
    return [make_text(r, np.random.default_rng(i)) for i, r in enumerate(recs)]


@pytest.fixture(scope="module")
def tok(corpus) -> Tokenizer:
    return Tokenizer.train(corpus, vocab_size=400)


def test_round_trip_is_exact_for_the_corpus_and_for_unseen_text(tok, corpus):
    for t in corpus[:50]:
        assert tok.decode(tok.encode(t)) == t
    odd = "Zoë   saw 42 🐉s\n\n  on the Pont-Neuf — twice!\tDone."
    assert tok.decode(tok.encode(odd)) == odd  # byte fallback + identity normalisation + kept whitespace


def test_paper_settings_bos_no_eos_digits_split_bpe(tok):
    assert tok.vocab_size == 400
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id) == (0, 1, 2)
    ids = tok.encode("Words: run, cat, red")
    assert ids[0] == tok.bos_id and tok.eos_id not in ids
    # split_digits: every digit of a number is its own piece (or its own byte)
    pieces = tok.pieces("In 2023 there were 1234 cats.")
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p) or p.startswith("<0x3")]
    assert all(len(p.lstrip("▁")) == 1 or p.startswith("<0x") for p in digit_pieces), pieces
    assert sum(1 for p in digit_pieces) >= 8
    assert tok.sp.IsByte(tok.sp.PieceToId("<0x0A>"))  # byte_fallback: the newline byte is a piece
    # BPE merged frequent words of the corpus into single pieces
    assert "▁the" in {tok.sp.IdToPiece(i) for i in range(tok.vocab_size)}


def test_training_is_deterministic_and_save_load_round_trips(tok, corpus, tmp_path):
    again = Tokenizer.train(corpus, vocab_size=400)
    assert again.proto == tok.proto and again.sha256 == tok.sha256
    path = tok.save(tmp_path / "tok" / "tok400.model")
    loaded = Tokenizer.load(path)
    assert loaded.encode(corpus[3]) == tok.encode(corpus[3])
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


def test_encode_stream_concatenates_texts_with_bos_and_no_eos(tok):
    texts = ["Story: A cat.", "Story: A dog."]
    stream = tok.encode_stream(texts)
    assert stream.dtype == np.uint16
    want = tok.encode(texts[0]) + tok.encode(texts[1])
    assert stream.tolist() == want
    assert [i for i, x in enumerate(stream.tolist()) if x == tok.bos_id] == [0, len(tok.encode(texts[0]))]


def test_errors_are_one_line(tmp_path, corpus):
    bad = tmp_path / "evil.model"
    bad.write_bytes(b"\x80\x04not a protobuf at all" * 10)
    with pytest.raises(TokenizerError) as e:
        Tokenizer.load(bad)
    assert "\n" not in str(e.value) and "evil.model" in str(e.value)
    with pytest.raises(TokenizerError, match="no such"):
        Tokenizer.load(tmp_path / "missing.model")
    with pytest.raises(TokenizerError, match="vocab_size"):
        Tokenizer.train(corpus, vocab_size=100)
    with pytest.raises(TokenizerError, match="nothing"):
        Tokenizer.train(["", ""], vocab_size=400)
    with pytest.raises(TokenizerError) as e:  # more pieces than a 3-sentence corpus can make
        Tokenizer.train(["a b", "c d", "e"], vocab_size=5000)
    assert "\n" not in str(e.value)
