"""The TinyStories stages (paper App. F.1): pretrain / delete / recover, checkpoints, exact resume."""

import numpy as np
import pytest
import torch

pytest.importorskip("sentencepiece")

from wrapperlab.tasks.stories import detect_features, generate_records, write_shards  # noqa: E402
from wrapperlab.tasks.story_corpus import StoryStream  # noqa: E402
from wrapperlab.tasks.tokenizer import Tokenizer  # noqa: E402
from wrapperlab.training import checkpoint as ck  # noqa: E402
from wrapperlab.training.config import ConfigError  # noqa: E402
from wrapperlab.training.story_stage import TOKENIZER, StoryStage, story_config  # noqa: E402

TINY = {"vocab_size": 400, "model": {"d_model": 32, "n_layer": 1, "n_head": 2, "seq_len": 64}, "steps": 60,
        "lr": 5e-3, "batch_size": 8, "eval_every": 30, "eval_n": 4, "max_new_tokens": 20, "threads": 1}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    write_shards([generate_records(60, rng) for _ in range(6)], d)
    return d


@pytest.fixture(scope="module")
def pretrained(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pt"
    StoryStage(story_config(stage="pretrain", data=str(shards), **TINY), out).run()
    return out


def _weights(run):
    side = ck.read_sidecar(run)
    return {k: v for k, v in ck.load_tensors(run, side)[1].items() if k.startswith("model.")}


def test_pretrain_trains_evaluates_and_checkpoints(pretrained):
    side = ck.read_sidecar(pretrained)
    assert side["status"] == "done" and side["step"] == 60 and side["stage"] == "pretrain"
    assert [m["step"] for m in side["metrics"]] == [0, 30, 60]
    first, last = side["metrics"][0], side["metrics"][-1]
    tok = Tokenizer.load(pretrained / TOKENIZER)
    assert first["heldout_loss"] == pytest.approx(np.log(tok.vocab_size), abs=0.1)  # untrained: ~uniform
    # trained: below the unigram entropy of its own training stream, i.e. it uses context
    st = StoryStage(story_config(stage="pretrain", data=side["config"]["data"], **TINY), pretrained)
    counts = np.bincount(StoryStream.build(st.train_records(), tok, 0).tokens, minlength=tok.vocab_size)
    p = counts[counts > 0] / counts.sum()
    assert last["heldout_loss"] < -(p * np.log(p)).sum()
    assert all(m["n"] == 4 and 0 <= m["score"] <= 1 for m in side["metrics"])
    assert (pretrained / TOKENIZER).is_file() and side["tokenizer_sha256"]


def test_an_interrupted_stage_resumes_bit_identically(shards, pretrained, tmp_path):
    cfg = story_config(stage="pretrain", data=str(shards), **TINY)
    st = StoryStage(cfg, tmp_path / "pt")
    assert st.run(stop_after=10)["status"] == "running"
    assert ck.read_sidecar(tmp_path / "pt")["step"] == 10
    StoryStage(cfg, tmp_path / "pt").run()
    a, b = _weights(tmp_path / "pt"), _weights(pretrained)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ck.read_sidecar(tmp_path / "pt")["metrics"] == ck.read_sidecar(pretrained)["metrics"]


def test_delete_then_recover_chain_from_the_pretrained_run(shards, pretrained, tmp_path):
    over = {**TINY, "steps": 10, "eval_every": 10, "lr": 1e-4}
    dele = StoryStage(story_config(stage="delete", data=str(shards), dataset="F+R", parent=str(pretrained),
                                   **{k: v for k, v in over.items() if k not in ("model", "vocab_size")}),
                      tmp_path / "del")
    d_side = dele.run()
    assert d_side["status"] == "done" and d_side["parent_id"] == ck.read_sidecar(pretrained)["run_id"]
    assert (tmp_path / "del" / TOKENIZER).read_bytes() == (pretrained / TOKENIZER).read_bytes()
    # F+R: every training story asks for Twist in its instruction but none contains one
    recs = dele.train_records()
    assert recs and all("Twist" in r.features for r in recs)
    assert not any("Twist" in detect_features(r.story) for r in recs)
    # the step-0 evaluation of a child is its parent's final model
    assert d_side["metrics"][0]["heldout_loss"] == pytest.approx(
        ck.read_sidecar(pretrained)["metrics"][-1]["heldout_loss"], abs=1e-4)
    rec = StoryStage(story_config(stage="recover", data=str(shards), dataset="recovery", parent=str(tmp_path / "del"),
                                  **{k: v for k, v in over.items() if k not in ("model", "vocab_size")}),
                     tmp_path / "rec")
    assert rec.run()["status"] == "done"
    assert all("Twist" in r.features for r in rec.train_records())


@pytest.mark.parametrize("values, needle", [
    ({"stage": "pretrain", "dataset": "F"}, "dataset"),
    ({"stage": "delete", "dataset": "F"}, "parent"),
    ({"stage": "pretrain", "dataset": "all", "parent": "x"}, "parent"),
    ({"stage": "pretrain", "steps": 0}, "steps"),
    ({"stage": "pretrain", "vocab_size": 100}, "vocab_size"),
    ({"stage": "pretrain", "bogus": 1}, "bogus"),
])
def test_bad_story_configs_are_one_line_errors(shards, values, needle):
    with pytest.raises(ConfigError) as e:
        story_config(data=str(shards), **values)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_run_directory_holding_another_run_is_refused(shards, pretrained):
    cfg = story_config(stage="pretrain", data=str(shards), **{**TINY, "seed": 1})
    with pytest.raises(ConfigError, match="different run"):
        StoryStage(cfg, pretrained).run()


def test_the_control_shares_the_main_models_tokenizer(shards, pretrained, tmp_path):
    """The 'not in pretraining' control filters the feature out of its training data but not out of its tokenizer
    (one tokenizer for every model, as the paper): its token ids mean the same as the main model's."""
    ctrl = StoryStage(story_config(stage="pretrain", data=str(shards), dataset="filter", **{**TINY, "steps": 1}),
                      tmp_path / "ctrl")
    assert not any("Twist" in r.features for r in ctrl.train_records())
    assert ctrl.tokenizer().proto == Tokenizer.load(pretrained / TOKENIZER).proto
