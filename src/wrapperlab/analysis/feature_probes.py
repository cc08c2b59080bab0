"""Per-block multi-label feature probes (paper App. F.2, the TinyStories probes of Fig. 11a).

As the authors' code: one bias-free linear map ``d_model -> n_features`` per probed block, on the **mean of the
residual stream over the last 10 token positions**, trained with multi-label BCE-with-logits (an independent binary
probe per feature) on a frozen model, constant LR 1e-3, 2,000 iterations, batch 128; accuracy is
``(logit > 0) == label`` per feature on held-out data.

Probed layers: the residual stream after each block except the last (B0 … B{L-2}: "after each of the first 11
blocks" of the 12-block model; the paper has no probe after the last block). Works on any wrapperlab model with
``blocks.{l}.hook_resid_post`` (``Transformer``, ``LlamaTransformer``). Choices the paper leaves open: the features
are standardised per layer on the training set (as ``probing.py`` does for the PCFG probes; ``standardize=False``
turns it off), and every row reports the feature's base rate (the accuracy of always answering the majority
label) beside the probe's accuracy, which is the number a probe claim has to beat. ``pool="story"`` averages over
every position of the story instead of the last 10 (a control for what the paper's pooling can see).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from wrapperlab.analysis.common import AnalysisError, Result, Settings, need
from wrapperlab.analysis.probing import fit_linear_probes


class FeatureProbeSettings(Settings):
    last: int = Field(10, ge=1, description="positions averaged at the end of each sequence")
    pool: Literal["last", "story"] = Field("last", description="average the last `last` positions (the paper) or "
                                           "every position of the sequence's own text (needs its length)")
    iters: int = Field(2000, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(128, ge=1)
    standardize: bool = True
    seed: int = Field(0, ge=0)
    forward_batch: int = Field(64, ge=1)


def probe_layers(n_layer: int) -> list[tuple[str, str]]:
    """(label, hook name) of the probed layers: after blocks 0 … n_layer-2."""
    return [(f"B{i}", f"blocks.{i}.hook_resid_post") for i in range(max(1, n_layer - 1))]


@torch.no_grad()
def pooled_residuals(model, tokens: torch.Tensor, last: int = 10, batch: int = 64,
                     lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Mean residual at every probed layer over the last ``last`` positions, or, given ``lengths`` (n,), over the
    last ``lengths[i]`` positions of row i: (n_layers, n, d_model), fp32."""
    names = [h for _, h in probe_layers(need(model, "residual").n_layer)]
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    t = tokens.shape[1]
    if lengths is None:
        lengths = torch.full((tokens.shape[0],), last)
    if lengths.shape != (tokens.shape[0],):
        raise AnalysisError(f"lengths: need one length per sequence ({tokens.shape[0]}), got shape "
                            f"{tuple(lengths.shape)}")
    lengths = lengths.clamp(1, t).to(device)
    pos = torch.arange(t, device=device)
    parts = []
    for i in range(0, tokens.shape[0], batch):
        _, cache = model.run_with_cache(tokens[i:i + batch].to(device), names_filter=names)
        n = lengths[i:i + batch]
        w = (pos[None] >= (t - n)[:, None]).float() / n[:, None]  # (b, t): 1/len on the pooled tail
        parts.append(torch.stack([torch.einsum("bt,btd->bd", w, cache[h].float()) for h in names]).cpu())
    model.train(was)
    return torch.cat(parts, dim=1)


def train_feature_probes(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                         s: FeatureProbeSettings) -> np.ndarray:
    """Held-out accuracy per (probe, feature) of one bias-free multi-label probe per leading slice of ``x``
    ((P, n, d) features, (n, F) 0/1 labels), shape (P, F); the one probe trainer, constant LR."""
    out = fit_linear_probes(x_train, y_train, x_test, y_train.shape[1], multilabel=True, bias=False, lr=s.lr,
                            weight_decay=0.0, iters=s.iters, batch_size=s.batch_size, standardize=s.standardize,
                            seed=s.seed)
    return ((out > 0) == y_test.bool()[None]).float().mean(1).numpy()


def feature_probes(model, tokens_train: torch.Tensor, y_train: np.ndarray, tokens_test: torch.Tensor,
                   y_test: np.ndarray, features: list[str], *, settings: FeatureProbeSettings | None = None,
                   label: str = "model", lengths_train: torch.Tensor | None = None,
                   lengths_test: torch.Tensor | None = None) -> Result:
    """Probe accuracy per (layer, feature). Rows: model, layer, layer_index, feature, acc, base_rate, n_test.
    ``pool="story"`` needs ``lengths_train``/``lengths_test``: the length of each row's own text (its tail)."""
    s = settings or FeatureProbeSettings()
    if s.pool == "story" and (lengths_train is None or lengths_test is None):
        raise AnalysisError("pool: 'story' needs the length of each sequence's text (lengths_train, lengths_test)")
    if s.pool == "last":
        lengths_train = lengths_test = None
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    if y_train.ndim != 2 or y_train.shape[1] != len(features) or y_test.shape[1:] != y_train.shape[1:]:
        raise AnalysisError(f"labels: need (n, {len(features)}) 0/1 arrays for features {features}")
    if tokens_train.shape[0] != y_train.shape[0] or tokens_test.shape[0] != y_test.shape[0]:
        raise AnalysisError("labels: one row of labels per sequence")
    if tokens_train.shape[1] < s.last:
        raise AnalysisError(f"last: sequences of {tokens_train.shape[1]} tokens are shorter than last={s.last}")
    acc = train_feature_probes(pooled_residuals(model, tokens_train, s.last, s.forward_batch, lengths_train),
                               torch.from_numpy(y_train),
                               pooled_residuals(model, tokens_test, s.last, s.forward_batch, lengths_test),
                               torch.from_numpy(y_test), s)
    rate = y_test.mean(0)
    rows = []
    n_layer = need(model, "residual").n_layer
    for i, (name, _) in enumerate(probe_layers(n_layer)):
        for j, feat in enumerate(features):
            rows.append({"model": label, "layer": name, "layer_index": i, "feature": feat, "acc": float(acc[i, j]),
                         "base_rate": float(max(rate[j], 1 - rate[j])), "n_test": int(y_test.shape[0])})
    pooling = f"mean of the last {s.last} positions" if s.pool == "last" else "mean over the story's positions"
    return Result("feature_probe", rows, {"settings": s.to_dict(), "pooling": pooling,
                                          "layers": [n for n, _ in probe_layers(n_layer)]})


class FeatureProbeRunSettings(Settings):
    """Fig. 11a's probes on a story run: trained on ``n_train`` stories of the pretraining split, measured on
    ``n_test`` of the test split (each at most the split's size)."""

    n_train: int = Field(1500, ge=1)
    n_test: int = Field(500, ge=1)
    iters: int = Field(2000, ge=1)
    seed: int = Field(0, ge=0)
    pool: Literal["last", "story"] = "last"


def feature_probe_run(run_dir: str | Path, *, settings: FeatureProbeRunSettings | None = None,
                      device: str = "cpu") -> Result:
    """Fig. 11a's probes on one finished story run: story text only (the instruction stripped), BOS-prefixed,
    left-padded with other stories' text to the model's context; trained on the pretraining split (the paper's
    ``pretrain-all``), measured on the test split."""
    from wrapperlab.analysis.evaluate import load_story_run
    from wrapperlab.tasks.stories import STORY_FEATURES
    from wrapperlab.tasks.story_corpus import left_padded

    s = settings or FeatureProbeRunSettings()
    run_dir = Path(run_dir)
    _, task, model, side = load_story_run(run_dir, device, "feature probes")
    tok, split = task.tokenizer, task.split
    seq = task.seq_len
    rng = np.random.default_rng([s.seed, 11])

    def tokens(records, n):
        pick = [records[int(i)] for i in rng.choice(len(records), size=min(n, len(records)), replace=False)]
        ends = [tok.encode(r.story) for r in pick]
        fillers = [tok.encode(r.story) for r in records[:512]]
        y = np.array([[f in r.features for f in STORY_FEATURES] for r in pick], dtype=np.float32)
        return left_padded(ends, fillers, seq, rng), y, torch.tensor([len(e) - 1 for e in ends])  # story, no BOS

    xtr, ytr, ltr = tokens(split["pretrain"], s.n_train)
    xte, yte, lte = tokens(split["test"], s.n_test)
    res = feature_probes(model, xtr, ytr, xte, yte, list(STORY_FEATURES), label=run_dir.name,
                         settings=FeatureProbeSettings(iters=s.iters, seed=s.seed, pool=s.pool),
                         lengths_train=ltr, lengths_test=lte)
    res.meta.update({"run_id": side["run_id"], "run_dir": str(run_dir), "n_train": int(len(ytr)),
                     "n_test": int(len(yte)), "input": "story only, BOS-prefixed, left-padded to the context"})
    return res
