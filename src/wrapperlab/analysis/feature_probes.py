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
label) beside the probe's accuracy, which is the number a probe claim has to beat.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from wrapperlab.analysis.common import AnalysisError, Result, need


@dataclass(frozen=True)
class FeatureProbeSettings:
    last: int = 10  # positions averaged at the end of each sequence
    iters: int = 2000
    lr: float = 1e-3
    batch_size: int = 128
    standardize: bool = True
    seed: int = 0
    forward_batch: int = 64

    def check(self) -> FeatureProbeSettings:
        for name in ("last", "iters", "batch_size", "forward_batch"):
            if getattr(self, name) < 1:
                raise AnalysisError(f"{name}: must be >= 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            raise AnalysisError(f"lr: must be > 0 (got {self.lr})")
        return self


def probe_layers(n_layer: int) -> list[tuple[str, str]]:
    """(label, hook name) of the probed layers: after blocks 0 … n_layer-2."""
    return [(f"B{i}", f"blocks.{i}.hook_resid_post") for i in range(max(1, n_layer - 1))]


@torch.no_grad()
def pooled_residuals(model, tokens: torch.Tensor, last: int = 10, batch: int = 64) -> torch.Tensor:
    """Mean residual over the last ``last`` positions at every probed layer: (n_layers, n, d_model), fp32."""
    names = [h for _, h in probe_layers(need(model, "residual").n_layer)]
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    parts = []
    for i in range(0, tokens.shape[0], batch):
        _, cache = model.run_with_cache(tokens[i:i + batch].to(device), names_filter=names)
        parts.append(torch.stack([cache[n][:, -last:].float().mean(1) for n in names]).cpu())
    model.train(was)
    return torch.cat(parts, dim=1)


def train_feature_probes(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                         s: FeatureProbeSettings) -> np.ndarray:
    """One bias-free multi-label probe per leading slice of ``x`` ((P, n, d) features, (n, F) 0/1 labels);
    returns held-out accuracy per (probe, feature), shape (P, F)."""
    p, n, d = x_train.shape
    f = y_train.shape[1]
    if s.standardize:
        mu = x_train.mean(1, keepdim=True)
        sd = x_train.std(1, keepdim=True).clamp_min(1e-6)
        x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    g = torch.Generator().manual_seed(s.seed)
    w = torch.zeros(p, d, f, requires_grad=True)
    opt = torch.optim.AdamW([w], lr=s.lr, weight_decay=0.0)
    y_train = y_train.float()
    for _ in range(s.iters):
        idx = torch.randint(0, n, (min(s.batch_size, n),), generator=g)
        logits = torch.bmm(x_train[:, idx], w)  # (P, batch, F)
        loss = F.binary_cross_entropy_with_logits(logits, y_train[idx].expand(p, -1, -1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = torch.bmm(x_test, w) > 0
    return (pred == y_test.bool()[None]).float().mean(1).numpy()


def feature_probes(model, tokens_train: torch.Tensor, y_train: np.ndarray, tokens_test: torch.Tensor,
                   y_test: np.ndarray, features: list[str], *, settings: FeatureProbeSettings | None = None,
                   label: str = "model") -> Result:
    """Probe accuracy per (layer, feature). Rows: model, layer, layer_index, feature, acc, base_rate, n_test."""
    s = (settings or FeatureProbeSettings()).check()
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    if y_train.ndim != 2 or y_train.shape[1] != len(features) or y_test.shape[1:] != y_train.shape[1:]:
        raise AnalysisError(f"labels: need (n, {len(features)}) 0/1 arrays for features {features}")
    if tokens_train.shape[0] != y_train.shape[0] or tokens_test.shape[0] != y_test.shape[0]:
        raise AnalysisError("labels: one row of labels per sequence")
    if tokens_train.shape[1] < s.last:
        raise AnalysisError(f"last: sequences of {tokens_train.shape[1]} tokens are shorter than last={s.last}")
    acc = train_feature_probes(pooled_residuals(model, tokens_train, s.last, s.forward_batch),
                               torch.from_numpy(y_train), pooled_residuals(model, tokens_test, s.last, s.forward_batch),
                               torch.from_numpy(y_test), s)
    rate = y_test.mean(0)
    rows = []
    n_layer = need(model, "residual").n_layer
    for i, (name, _) in enumerate(probe_layers(n_layer)):
        for j, feat in enumerate(features):
            rows.append({"model": label, "layer": name, "layer_index": i, "feature": feat, "acc": float(acc[i, j]),
                         "base_rate": float(max(rate[j], 1 - rate[j])), "n_test": int(y_test.shape[0])})
    return Result("feature_probe", rows, {"settings": asdict(s), "pooling": f"mean of the last {s.last} positions",
                                          "layers": [n for n, _ in probe_layers(n_layer)]})
