"""TinyStories as a task kind (paper App. F.1): pretrain / delete (finetune) / recover (reft) as ordinary stages of
the one stage loop, with checkpoints and exact resume."""

import numpy as np
import pytest
import torch

pytest.importorskip("sentencepiece")

from wrapperlab.tasks.stories import detect_features, generate_records, write_shards  # noqa: E402
from wrapperlab.tasks.story_corpus import StoryStream  # noqa: E402
from wrapperlab.tasks.story_task import TOKENIZER  # noqa: E402
from wrapperlab.tasks.tokenizer import Tokenizer  # noqa: E402
from wrapperlab.training import checkpoint as ck  # noqa: E402
from wrapperlab.training.config import ConfigError, build_config  # noqa: E402
from wrapperlab.training.stage import Stage, resolve  # noqa: E402

TINY = {"task.vocab_size": 400, "task.seq_len": 64, "model.d_model": 32, "model.n_layer": 1, "model.n_head": 2,
        "steps": 60, "lr": 5e-3, "batch_size": 8, "eval.every": 30, "task.eval_n": 4, "task.max_new_tokens": 20,
        "threads": 1}
CHILD = {k: v for k, v in TINY.items() if not k.startswith(("model.", "task.vocab_size", "task.seq_len"))}


def stage(stage_name: str, run_dir, **values) -> Stage:
    cfg, parent = resolve(build_config(stage_name, "stories", values=values))
    return Stage(cfg, parent, run_dir)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    write_shards([generate_records(60, rng) for _ in range(6)], d)
    return d


@pytest.fixture(scope="module")
def pretrained(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pt"
    stage("pretrain", out, **{"task.data": str(shards)}, **TINY).run(progress=False)
    return out


def _weights(run):
    side = ck.read_sidecar(run)
    return {k: v for k, v in ck.load_tensors(run, side)[1].items() if k.startswith("model.")}


def test_pretrain_trains_evaluates_and_checkpoints(pretrained):
    side = ck.read_sidecar(pretrained)
    assert side["status"] == "done" and side["step"] == 60 and side["stage"] == "pretrain"
    assert side["config"]["task"]["kind"] == "story" and side["config"]["model"]["family"] == "llama"
    assert [m["step"] for m in side["metrics"]] == [0, 30, 60]
    first, last = side["metrics"][0], side["metrics"][-1]
    tok = Tokenizer.load(pretrained / TOKENIZER)
    assert first["heldout_loss"] == pytest.approx(np.log(tok.vocab_size), abs=0.1)  # untrained: ~uniform
    # trained: below the unigram entropy of its own training stream, i.e. it uses context
    st = stage("pretrain", pretrained, **{"task.data": side["config"]["task"]["data"]}, **TINY)
    st.task.attach(pretrained, None, 0)
    counts = np.bincount(StoryStream.build(st.task.train_records(), tok, 0).tokens, minlength=tok.vocab_size)
    p = counts[counts > 0] / counts.sum()
    assert last["heldout_loss"] < -(p * np.log(p)).sum()
    assert all(m["n"] == 4 and 0 <= m["score"] <= 1 for m in side["metrics"])


def test_an_interrupted_stage_resumes_bit_identically(shards, pretrained, tmp_path):
    values = {"task.data": str(shards), **TINY}
    assert stage("pretrain", tmp_path / "pt", **values).run(progress=False, stop_after=10)["status"] == "running"
    assert ck.read_sidecar(tmp_path / "pt")["step"] == 10
    stage("pretrain", tmp_path / "pt", **values).run(progress=False)
    a, b = _weights(tmp_path / "pt"), _weights(pretrained)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ck.read_sidecar(tmp_path / "pt")["metrics"] == ck.read_sidecar(pretrained)["metrics"]


def test_delete_then_recover_chain_from_the_pretrained_run(shards, pretrained, tmp_path):
    over = {**CHILD, "steps": 10, "eval.every": 10, "lr": 1e-4}
    dele = stage("finetune", tmp_path / "del", parent=str(pretrained), **{"task.dataset": "F+R"}, **over)
    d_side = dele.run(progress=False)
    assert d_side["status"] == "done" and d_side["parent_id"] == ck.read_sidecar(pretrained)["run_id"]
    assert (tmp_path / "del" / TOKENIZER).read_bytes() == (pretrained / TOKENIZER).read_bytes()
    # F+R: every training story asks for Twist in its instruction but none contains one
    recs = dele.task.train_records()
    assert recs and all("Twist" in r.features for r in recs)
    assert not any("Twist" in detect_features(r.story) for r in recs)
    # the step-0 evaluation of a child is its parent's final model
    assert d_side["metrics"][0]["heldout_loss"] == pytest.approx(
        ck.read_sidecar(pretrained)["metrics"][-1]["heldout_loss"], abs=1e-4)
    rec = stage("reft", tmp_path / "rec", parent=str(tmp_path / "del"), **over)
    assert rec.run(progress=False)["status"] == "done"  # reFT at the deletion LR is allowed for stories
    assert all("Twist" in r.features for r in rec.task.train_records())


@pytest.mark.parametrize("stage_name, values, needle", [
    ("pretrain", {"task.dataset": "F"}, "task.dataset"),
    ("finetune", {"task.dataset": "F"}, "parent"),
    ("pretrain", {"steps": 0}, "train.steps"),
    ("pretrain", {"task.vocab_size": 100}, "task.vocab_size"),
    ("pretrain", {"task.bogus": 1}, "task.bogus"),
    ("pretrain", {"task.feature": "Plot"}, "task.feature"),
    ("pretrain", {"steps": 10, "eval.at": [11]}, "eval.at"),
    ("pretrain", {"eval.stop_margin": 0.1}, "eval.stop_margin"),
    ("scratch", {}, "no scratch stage"),
])
def test_bad_story_configs_are_one_line_errors(shards, stage_name, values, needle):
    with pytest.raises(ConfigError) as e:
        resolve(build_config(stage_name, "stories", values={"task.data": str(shards), **values}))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_run_directory_holding_another_run_is_refused(shards, pretrained):
    with pytest.raises(ConfigError, match="different run"):
        stage("pretrain", pretrained, **{"task.data": str(shards)}, **{**TINY, "seed": 1}).run(progress=False)


def test_the_control_shares_the_main_models_tokenizer(shards, pretrained, tmp_path):
    """The 'not in pretraining' control filters the feature out of its training data but not out of its tokenizer
    (one tokenizer for every model, as the paper): its token ids mean the same as the main model's."""
    ctrl = stage("pretrain", tmp_path / "ctrl", **{"task.data": str(shards), "task.dataset": "filter"},
                 **{**TINY, "steps": 1})
    ctrl.task.attach(tmp_path / "ctrl", None, 0)
    assert not any("Twist" in r.features for r in ctrl.task.train_records())
    assert ctrl.task.tokenizer.proto == Tokenizer.load(pretrained / TOKENIZER).proto
