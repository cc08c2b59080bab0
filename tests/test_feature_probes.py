"""Multi-label feature probes (paper App. F.2): known answers on planted features."""

import numpy as np
import pytest
import torch

from wrapperlab.analysis.common import AnalysisError
from wrapperlab.analysis.feature_probes import FeatureProbeSettings, feature_probes, probe_layers
from wrapperlab.models.llama import LlamaConfig, LlamaTransformer

FEATURES = ["f1", "f2", "f3", "f4"]


def planted(n: int, seed: int, t: int = 24):
    """Random tokens 10..39; feature j is on when token j+1 is planted somewhere in the last 10 positions."""
    rng = np.random.default_rng(seed)
    tok = rng.integers(10, 40, size=(n, t))
    y = rng.random((n, len(FEATURES))) < 0.5
    for i in range(n):
        pos = rng.choice(np.arange(t - 10, t), size=len(FEATURES), replace=False)
        for j in range(len(FEATURES)):
            if y[i, j]:
                tok[i, pos[j]] = j + 1
    return torch.from_numpy(tok), y.astype(np.float32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaTransformer(LlamaConfig(vocab_size=40, seq_len=32, d_model=64, n_layer=3, n_head=4)).eval()


def test_planted_features_are_read_and_shuffled_labels_are_not(model):
    torch.set_num_threads(1)
    s = FeatureProbeSettings(iters=400, batch_size=128)
    xtr, ytr = planted(1200, 1)
    xte, yte = planted(400, 2)
    res = feature_probes(model, xtr, ytr, xte, yte, FEATURES, settings=s)
    b0 = {r["feature"]: r for r in res.rows if r["layer"] == "B0"}
    assert set(b0) == set(FEATURES)
    for r in b0.values():  # presence of a token among the averaged positions is linear in the mean residual
        assert r["acc"] >= 0.9, r
        assert 0.5 <= r["base_rate"] <= 0.6
    shuffled = ytr[np.random.default_rng(3).permutation(len(ytr))]
    ctrl = feature_probes(model, xtr, shuffled, xte, yte, FEATURES, settings=s, label="shuffled")
    for r in ctrl.rows:
        assert r["acc"] <= r["base_rate"] + 0.1, r


def test_the_paper_probes_after_every_block_but_the_last():
    assert [n for n, _ in probe_layers(12)] == [f"B{i}" for i in range(11)]
    assert probe_layers(12)[-1][1] == "blocks.10.hook_resid_post"


def test_bad_inputs_are_one_line_errors(model):
    xtr, ytr = planted(20, 1)
    with pytest.raises(AnalysisError, match="labels"):
        feature_probes(model, xtr, ytr[:, :2], xtr, ytr, FEATURES)
    with pytest.raises(AnalysisError, match="one row"):
        feature_probes(model, xtr[:10], ytr, xtr, ytr, FEATURES)
    with pytest.raises(AnalysisError, match="last"):
        feature_probes(model, xtr[:, :5], ytr, xtr[:, :5], ytr, FEATURES)
    with pytest.raises(AnalysisError, match="iters"):
        feature_probes(model, xtr, ytr, xtr, ytr, FEATURES, settings=FeatureProbeSettings(iters=0))


def test_story_pooling_averages_each_rows_own_tail_and_reads_what_precedes_the_last_ten(model):
    from wrapperlab.analysis.feature_probes import pooled_residuals

    torch.set_num_threads(1)
    x, _ = planted(6, 4)
    lengths = torch.tensor([1, 5, 10, 17, 24, 40])  # 40 is longer than the row: the whole row
    got = pooled_residuals(model, x, lengths=lengths)
    _, cache = model.run_with_cache(x, names_filter=[h for _, h in probe_layers(3)])
    for li, (_, h) in enumerate(probe_layers(3)):
        for i, n in enumerate([1, 5, 10, 17, 24, 24]):
            assert torch.allclose(got[li, i], cache[h][i, -n:].mean(0), atol=1e-5)
        assert torch.allclose(pooled_residuals(model, x, last=10)[li], cache[h][:, -10:].mean(1), atol=1e-5)
    with pytest.raises(AnalysisError, match="lengths"):
        pooled_residuals(model, x, lengths=torch.tensor([3, 4]))

    def early(n, seed):  # the feature token sits 11..20 positions from the end: inside a 20-token story only
        tok, y = planted(n, seed)
        return torch.roll(tok, -10, dims=1), y
    xtr, ytr = early(1200, 1)
    xte, yte = early(400, 2)
    s = FeatureProbeSettings(iters=1000, batch_size=128, pool="story")
    lengths = {"lengths_train": torch.full((1200,), 20), "lengths_test": torch.full((400,), 20)}
    res = feature_probes(model, xtr, ytr, xte, yte, FEATURES, settings=s, **lengths)
    assert res.meta["pooling"] == "mean over the story's positions"
    story = [r["acc"] for r in res.rows if r["layer"] == "B0"]
    last = [r["acc"] for r in feature_probes(model, xtr, ytr, xte, yte, FEATURES, **lengths,
                                             settings=s.model_copy(update={"pool": "last"})).rows if r["layer"] == "B0"]
    assert min(story) >= 0.85 and np.mean(story) >= np.mean(last) + 0.2, (story, last)
    with pytest.raises(AnalysisError, match="pool"):
        feature_probes(model, xtr, ytr, xte, yte, FEATURES, settings=s)
