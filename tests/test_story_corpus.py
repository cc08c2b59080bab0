"""Story token streams, left padding and the generation score (paper App. F.2 and the authors' code)."""

import numpy as np
import pytest
import torch

pytest.importorskip("sentencepiece")

from wrapperlab.tasks.stories import StoriesError, StoryRecord, detect_features, generate_records  # noqa: E402
from wrapperlab.tasks.story_corpus import StoryStream, left_padded, texts_of  # noqa: E402
from wrapperlab.tasks.tokenizer import Tokenizer  # noqa: E402
from wrapperlab.training.generation import GenerationError, GenerationSettings, generation_score  # noqa: E402


@pytest.fixture(scope="module")
def records():
    return generate_records(300, np.random.default_rng(5))


@pytest.fixture(scope="module")
def tok(records):
    return Tokenizer.train(texts_of(records, 0), vocab_size=400)


def test_stream_is_every_text_with_bos_concatenated(records, tok):
    st = StoryStream.build(records[:20], tok, seed=0)
    want = []
    for t in texts_of(records[:20], 0):
        want += [tok.bos_id] + tok.sp.EncodeAsIds(t)
    assert st.tokens.tolist() == want and st.n_texts == 20
    assert tok.decode(st.tokens.tolist()).count("Story: ") == 20


def test_lm_batches_are_windows_of_the_stream(records, tok):
    st = StoryStream.build(records[:50], tok, seed=0)
    b = st.lm_batch(8, 64, np.random.default_rng(1))
    assert b.shape == (8, 65) and b.dtype == torch.long
    stream = st.tokens.tolist()
    for row in b.tolist():  # brute force: the row occurs in the stream at some offset
        assert any(stream[i:i + 65] == row for i in range(len(stream) - 64)), row[:10]
    again = st.lm_batch(8, 64, np.random.default_rng(1))
    assert torch.equal(b, again)
    with pytest.raises(StoriesError, match="seq_len"):
        st.lm_batch(2, len(stream), np.random.default_rng(0))


def test_left_padding_ends_with_the_prompt_and_fills_with_other_text():
    ends = [[1, 7, 7], [1, 8, 8, 8, 8, 8]]
    fillers = [[1, 20, 21, 22], [1, 30]]
    out = left_padded(ends, fillers, 5, np.random.default_rng(0))
    assert out.shape == (2, 5)
    assert out[0, -3:].tolist() == [1, 7, 7] and out[1].tolist() == [8, 8, 8, 8, 8]  # cropped to its last 5
    filler_tokens = {t for f in fillers for t in f}
    assert set(out[0, :2].tolist()) <= filler_tokens


class Scripted(torch.nn.Module):
    """A 'model' that writes a fixed token script after any prompt (one-hot logits); the first call sees the
    prompt alone, which fixes where the script starts."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.script, self.vocab, self.prompt_len = script, vocab, None
        self.cfg = type("C", (), {"seq_len": 4096})()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens, positions=None):
        if self.prompt_len is None:
            self.prompt_len = tokens.shape[1]
        k = tokens.shape[1] - self.prompt_len
        logits = torch.full((tokens.shape[0], self.vocab), -1e9)
        logits[:, self.script[k] if k < len(self.script) else 3] = 0.0
        return logits


def _score(records, tok, story: str, tail: str = "") -> float:
    script = tok.sp.EncodeAsIds(story) + ([tok.bos_id] + tok.sp.EncodeAsIds(tail) if tail else [])
    s = GenerationSettings(n=4, max_new_tokens=len(script) + 2, temperature=0.0)
    model = Scripted(script, tok.vocab_size)
    res = generation_score(model, tok, records, settings=s)
    assert res.meta["n"] == 4 and all(r["story"].startswith(story[:20]) for r in res.rows)
    return res.meta["score"]


def test_generation_score_judges_what_the_model_writes(records, tok):
    twist = next(r.story for r in records if "Twist" in r.features)
    plain = next(r.story for r in records if not r.features)
    assert "Twist" in detect_features(twist) and not detect_features(plain)
    assert _score(records, tok, twist) == 1.0
    assert _score(records, tok, plain) == 0.0
    assert _score(records, tok, plain, tail=twist) == 0.0  # a story ends at the next BOS


def test_generation_needs_prompts_with_the_feature(tok):
    r = StoryRecord(story="Tom ran.", words=("run", "ball", "red"), features=(), summary="Tom ran.")
    with pytest.raises(GenerationError, match="none has the feature"):
        generation_score(Scripted([1], tok.vocab_size), tok, [r])
