"""Attention maps per layer and head (paper App. D; Fig. 10).

``attention(model, tokens)`` reads ``blocks.{l}.attn.hook_pattern`` for one example or a batch. A batch is
averaged position by position (sequences are left-padded, so positions count back from the answer and the
tail ``< text > = `` lines up only at the end; per-token labels are kept only for a single example).

Tidy rows summarise where the query at the ART position (the one that predicts the answer) puts its weight:
for every (layer, head) and every token string, the attention mass on keys holding that token (per example,
then averaged). This is the number behind statements like "the block-1 head still attends to ``a``".
The full maps are in ``Result.arrays["pattern"]`` with shape (layers, heads, query, key).
"""

from __future__ import annotations

import numpy as np
import torch

from wrapperlab.analysis.common import AnalysisError, Result, need


@torch.no_grad()
def attention_patterns(model, tokens: np.ndarray, layers: list[int] | None = None,
                       batch_size: int = 256) -> np.ndarray:
    """Attention patterns, shape (n, layers, heads, query, key), float32."""
    comp = need(model, "attention")
    n_layer = comp.n_layer
    layers = list(range(n_layer)) if layers is None else list(layers)
    bad = [lay for lay in layers if not 0 <= lay < n_layer]
    if bad:
        raise AnalysisError(f"layers: {bad} out of range (the model has layers 0..{n_layer - 1})")
    names = [comp.attention[lay] for lay in layers]
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    for i in range(0, tokens.shape[0], batch_size):
        x = torch.from_numpy(tokens[i:i + batch_size]).to(device)
        _, cache = model.run_with_cache(x, names_filter=names, positions=-1)
        out.append(torch.stack([cache[n] for n in names], dim=1).float().cpu().numpy())
    model.train(was)
    return np.concatenate(out)


def attention(model, tokens: np.ndarray, *, vocab=None, query: int = -1,
              layers: list[int] | None = None, average: bool | None = None) -> Result:
    """Attention maps of ``tokens`` ((n, t) ids; the caller truncates after the position of interest).
    ``query`` is the query position summarised in the rows (default the last: the ART position when tokens end
    at ART). ``average`` defaults to True for n > 1."""
    tokens = np.atleast_2d(np.asarray(tokens))
    if tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise AnalysisError("tokens: need at least one non-empty sequence")
    pat = attention_patterns(model, tokens, layers)
    n, n_l, n_h, t, _ = pat.shape
    q = query % t
    layer_ids = list(range(pat.shape[1])) if layers is None else list(layers)
    rows = []
    names = (lambda i: vocab.tokens[int(i)]) if vocab is not None else (lambda i: str(int(i)))
    uniq = np.unique(tokens)
    for li, lay in enumerate(layer_ids):
        for h in range(n_h):
            w = pat[:, li, h, q, :]  # (n, key)
            for tok in uniq:
                mass = float((w * (tokens == tok)).sum(1).mean())
                if mass > 0:
                    rows.append({"layer": lay, "head": h, "query": q, "key_token": names(tok), "mass": mass})
    avg = (n > 1) if average is None else average
    arr = pat.mean(0) if avg else pat[0]
    labels = [names(i) for i in tokens[0]] if not avg else [str(i - t + 1) if i < t - 1 else "q" for i in range(t)]
    meta = {"n": n, "averaged": avg, "layers": layer_ids, "heads": n_h, "query": q, "labels": labels}
    return Result("attention", rows, meta, arrays={"pattern": arr})


def mass_on(result: Result, layer: int, head: int, token: str) -> float:
    """Attention mass the summarised query puts on ``token`` at (layer, head); 0 if none."""
    hit = result.where(layer=layer, head=head, key_token=token)
    return hit[0]["mass"] if hit else 0.0


def attention_signature(run_dir, n: int = 200, seed: int = 5) -> Result:
    """The attention facts of the paper's §5 (Fig. 10) and App. G for one fine-tuned run, on n natural O_PT inputs.

    Counter: the attention mass the block-1 head puts, from the readout query, on tokens `a`, `b` and BOS
    (compiled: all of it on the a's and BOS, which SelectorWidth attends to equally). Max-identifier: how intact
    the block-0 sorting head is — 1 minus the mean total-variation distance between its attention rows and the
    compiled model's on the same inputs (1 = same).
    One row; ``meta`` holds the program, LR and c_train of the run."""
    from wrapperlab.analysis.evaluate import load_run
    from wrapperlab.models.tracr import load as load_compiled

    cfg, task, model, _ = load_run(run_dir)
    b = task.sample(n, np.random.default_rng(seed), operand=cfg.task.o_pt)
    if not cfg.is_tracr:
        raise AnalysisError(f"{run_dir}: the attention signature is defined for Tracr runs only")
    meta = {"program": cfg.task.program, "lr": cfg.train.lr, "c_train": cfg.train.c_train, "run": str(run_dir),
            "n": n, "seed": seed}
    if cfg.task.program == "counter":
        res = attention(model, b.tokens, vocab=task.vocab, query=task.readout, layers=[1])
        from wrapperlab.tasks.tracr_programs import BOS

        row = {"attn_a": mass_on(res, 1, 0, cfg.task.o_pt), "attn_b": mass_on(res, 1, 0, cfg.task.o_ft),
               "attn_bos": mass_on(res, 1, 0, BOS)}
        return Result("attention_signature", [row], meta)
    ft = attention_patterns(model, b.tokens, layers=[0])[:, 0, 0]
    pt = attention_patterns(load_compiled(cfg.task.program).build(), b.tokens, layers=[0])[:, 0, 0]
    tv = 0.5 * np.abs(ft - pt).sum(-1)[:, 1:].mean()  # query rows after BOS
    return Result("attention_signature", [{"sort_intact": float(1 - tv)}], meta)
