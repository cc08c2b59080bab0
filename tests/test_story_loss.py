"""The held-out loss split by part (analysis/story_loss.py): spans from the generator, losses against brute force
and a model whose answer is known (uniform logits)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sentencepiece")

from wrapperlab.analysis.common import AnalysisError  # noqa: E402
from wrapperlab.analysis.story_loss import PARTS, part_losses, story_loss, token_parts  # noqa: E402
from wrapperlab.models.llama import LlamaConfig, LlamaTransformer  # noqa: E402
from wrapperlab.tasks.stories import feature_spans, generate_records, make_text  # noqa: E402
from wrapperlab.tasks.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def corpus():
    recs = generate_records(300, np.random.default_rng(0), feature_rate={"Twist": 0.5})
    tok = Tokenizer.train([make_text(r, np.random.default_rng([0, i])) for i, r in enumerate(recs)], 400)
    return recs, tok


def test_feature_spans_are_the_generators_twist_sentences(corpus):
    recs, _ = corpus
    for r in recs[:100]:
        spans = feature_spans(r.story, "Twist")
        assert bool(spans) == ("Twist" in r.features)
        for a, b in spans:
            s = r.story[a:b]
            assert s.startswith(("But then, to everyone's surprise,", "Then something unexpected happened:"))
            assert s.endswith("!")


def test_token_parts_label_the_instruction_the_twist_and_the_rest(corpus):
    recs, tok = corpus
    r = next(r for r in recs if "Twist" in r.features)
    text = make_text(r, np.random.default_rng(1))
    story = r.story.strip()
    start = len(text) - len(story)
    (a, b), = [(start + x, start + y) for x, y in feature_spans(story, "Twist")]
    ids, parts = token_parts(tok, text, start, [(a, b)])
    assert ids[0] == tok.bos_id and len(ids) == len(parts) + 1 and tok.decode(ids) == text
    _, offs = tok.spans(text)
    raw = text.encode()
    pieces = [raw[b:e].decode() for b, e in offs]
    assert "".join(pieces) == text  # the offsets tile the text
    joined = lambda name: "".join(p for p, q in zip(pieces, parts) if q == name)  # noqa: E731
    assert text[a:b] in joined("feature sentence")  # every byte of the sentence, and little else
    assert len(joined("feature sentence")) <= (b - a) + 2
    assert text[:start].startswith(joined("instruction")) and len(joined("instruction")) >= start - 3
    assert set(parts) == {"instruction", "feature sentence", "rest of story"}


def test_part_losses_match_one_sequence_at_a_time_and_a_uniform_model_gives_log_v(corpus):
    recs, tok = corpus
    torch.manual_seed(0)
    model = LlamaTransformer(LlamaConfig(vocab_size=tok.vocab_size, seq_len=256, d_model=32, n_layer=2, n_head=2))
    seqs = []
    for i, r in enumerate(recs[:7]):
        text = make_text(r, np.random.default_rng([5, i]))
        start = len(text) - len(r.story.strip())
        spans = [(start + x, start + y) for x, y in feature_spans(r.story.strip(), "Twist")]
        seqs.append(token_parts(tok, text, start, spans))
    got = part_losses(model, seqs, seq_len=64, batch=3)
    want = {p: [] for p in PARTS}
    with torch.no_grad():
        for ids, parts in seqs:  # texts are longer than 64 tokens: the first window, then the rest from token 64 on
            assert len(ids) > 65
            for k in range(0, len(ids) - 1, 64):
                x = torch.tensor(ids[k:k + 65])[None]
                ce = F.cross_entropy(model(x[:, :-1])[0], x[0, 1:], reduction="none")
                for v, part in zip(ce.tolist(), parts[k:k + 64]):
                    want["all"].append(v)
                    want[part].append(v)
    for p in PARTS:
        assert len(got[p]) == len(want[p]) and np.allclose(got[p], want[p], atol=1e-4), p
    # every token after BOS is predicted exactly once
    assert len(got["all"]) == sum(len(ids) - 1 for ids, _ in seqs) == sum(len(got[p]) for p in PARTS[1:])
    with torch.no_grad():
        model.tok_emb.weight.zero_()  # the tied head too: every logit is 0
    res = story_loss(model, tok, recs, "Twist", 256)
    assert {(r["stories"], r["part"]) for r in res.rows} >= {("with Twist", "feature sentence"),
                                                            ("without Twist", "all")}
    for row in res.rows:
        assert row["loss"] == pytest.approx(math.log(tok.vocab_size), abs=1e-4)
    with pytest.raises(AnalysisError, match="none"):
        story_loss(model, tok, [r for r in recs if "Twist" not in r.features], "Twist", 64)
