"""Linear probes on the residual stream (paper App. D; the paper's Read_l, Definition 1 in §3).

What is probed. One linear probe per block output ``blocks.{l}.hook_resid_post`` plus the embedding output
(``blocks.0.hook_resid_pre``), labelled B0 (embedding) … B{L} (block L-1's output) as in the paper's plots
(B0–B6 for the 6-block model). The input is the residual stream at the ART position, the position whose output
predicts the answer token. The paper says "the residual stream corresponding to the answer token (Ans)"; at the
Ans position itself the answer is already in the input embedding, so a probe there would read the label, not the
model — we take the position that *predicts* Ans (a documented choice, docs/analysis.md). Targets: the answer
token for the task asked with operand O_PT and with O_FT (the prompt names the operand being probed), drawn at
``c_test`` (default 0, as Fig. 8). The probe's output dimension is the vocabulary size, as in the paper.

Training (paper recipe, ``ProbeSettings.paper()``): AdamW at 1e-3 for 4K iterations, multiplied by 0.1 at 2K, 3K
and 3.5K. The paper trains on fresh PCFG samples; we extract features once for a fixed pool of ``n_train``
samples (the model is frozen, so this is the same estimator at a fraction of the cost) and draw minibatches
from it. Features are standardised per dimension with the training pool's mean and std (a linear probe's
expressiveness is unchanged; optimisation is better conditioned — the same for every model compared). The batch
size is not given by the paper (we use 256). All layers' probes are trained at once as one batched linear map;
each probe has its own parameters and loss term, so this equals training them separately.

Controls (``probe_run``): the same probes on the pretrained ancestor (Fig. 8a's baseline) and on a randomly
initialised model of the same shape. Random features can linearly encode counts (attention averages token
embeddings), so the control shows how much of a probe's accuracy is the model's doing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from wrapperlab.analysis.common import Result, Settings, ancestor, need
from wrapperlab.analysis.evaluate import load_run
from wrapperlab.tasks.registry import get_task_kind
from wrapperlab.tasks.task import PCFGTask
from wrapperlab.training.evaluation import majority_rate
from wrapperlab.training.stage import build_model


class ProbeSettings(Settings):
    n_train: int = Field(4000, ge=1)
    n_test: int = Field(1000, ge=1)
    iters: int = Field(1500, ge=1)
    lr: float = Field(1e-3, gt=0)
    milestones: tuple[float, ...] = (0.5, 0.75, 0.875)  # fractions of iters (paper: 2K, 3K, 3.5K of 4K)
    batch_size: int = Field(256, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    standardize: bool = True
    c_test: float = Field(0.0, ge=0, le=1)
    seed: int = Field(0, ge=0)
    family: str | None = Field(None, description="task family probed (default: the run's)")
    controls: bool = Field(True, description="also probe the pretrained ancestor and a random-init model")

    @classmethod
    def paper(cls) -> ProbeSettings:
        return cls(n_train=20000, n_test=2000, iters=4000)

    @classmethod
    def for_preset(cls, preset: str) -> ProbeSettings:
        return cls.paper() if preset == "paper" else cls()


def layer_names(model) -> list[tuple[str, str]]:
    """(label, hook name) of the probed residual stream: B0 (input of block 0) … B{n_layer} (any model family)."""
    return need(model, "residual").residual


@torch.no_grad()
def residual_features(model, tokens: np.ndarray, position: int, batch_size: int = 512) -> torch.Tensor:
    """Residual stream at ``position`` for every probed layer: a (n_layers + 1, n, d_model) float tensor.
    For a causal model ``tokens`` is truncated after ``position`` (later tokens cannot matter)."""
    comp = need(model, "residual")
    names = [h for _, h in comp.residual]
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    parts = []
    for i in range(0, tokens.shape[0], batch_size):
        x = tokens[i:i + batch_size, :position + 1] if comp.causal else tokens[i:i + batch_size]
        _, cache = model.run_with_cache(torch.from_numpy(x).to(device), names_filter=names, positions=position)
        parts.append(torch.stack([cache[n][:, position] for n in names]).float().cpu())
    model.train(was)
    return torch.cat(parts, dim=1)


def fit_linear_probes(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, out_dim: int, *,
                      multilabel: bool = False, bias: bool = True, lr: float = 1e-3, weight_decay: float = 0.0,
                      iters: int = 1000, milestones: tuple[float, ...] = (), batch_size: int = 256,
                      standardize: bool = True, seed: int = 0) -> torch.Tensor:
    """The one probe trainer: a linear probe per leading slice of ``x`` ((P, n, d) frozen features), trained at once
    as a batched map (each probe has its own parameters and loss term, so this equals training them apart). Softmax
    cross-entropy on (n,) class labels, or (``multilabel``) binary cross-entropy on (n, out_dim) 0/1 labels; AdamW,
    the LR times 0.1 at each of ``milestones`` (fractions of ``iters``); features standardised with the training
    pool's mean and std. Returns the probes' logits on ``x_test``: (P, n_test, out_dim)."""
    p, n, d = x_train.shape
    if standardize:
        mu = x_train.mean(1, keepdim=True)
        sd = x_train.std(1, keepdim=True).clamp_min(1e-6)
        x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(p, d, out_dim, requires_grad=True)
    b = torch.zeros(p, 1, out_dim, requires_grad=True) if bias else None
    opt = torch.optim.AdamW([w] + ([b] if bias else []), lr=lr, weight_decay=weight_decay)
    sched = (torch.optim.lr_scheduler.MultiStepLR(opt, [int(m * iters) for m in milestones], gamma=0.1)
             if milestones else None)

    def logits(x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(b, x, w) if bias else torch.bmm(x, w)

    y_train = y_train.float() if multilabel else y_train
    for _ in range(iters):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        out = logits(x_train[:, idx])  # (P, batch, out_dim)
        if multilabel:
            loss = F.binary_cross_entropy_with_logits(out, y_train[idx].expand(p, -1, -1))
        else:
            loss = F.cross_entropy(out.reshape(-1, out_dim), y_train[idx].repeat(p), reduction="sum") / idx.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    with torch.no_grad():
        return logits(x_test)


def train_probes(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                 n_classes: int, s: ProbeSettings) -> np.ndarray:
    """Held-out accuracy of one softmax probe per leading slice of ``x`` ((P, n, d) features, (n,) int labels),
    shape (P,)."""
    out = fit_linear_probes(x_train, y_train, x_test, n_classes, lr=s.lr, weight_decay=s.weight_decay, iters=s.iters,
                            milestones=s.milestones, batch_size=s.batch_size, standardize=s.standardize, seed=s.seed)
    return (out.argmax(-1) == y_test[None]).float().mean(1).numpy()


def _data(task: PCFGTask, family: str, operand: str, n: int, c: float, seed: int, salt: int):
    return task.sample(n, np.random.default_rng([seed, salt, ord(operand)]), family=family, operand=operand, c=c)


def probe(model, task: PCFGTask, *, family: str | None = None, operands: dict[str, str] | None = None,
          settings: ProbeSettings | None = None, label: str = "model") -> Result:
    """Per-layer probe accuracy for each target. ``operands`` maps a target name to an operand (default
    ``{"O_PT": o_pt, "O_FT": o_ft}``). Rows: model, layer, layer_index, target, operand, acc, majority."""
    s = settings or ProbeSettings()
    family = family or s.family or get_task_kind(task.config.kind).default_family(task.config)
    operands = operands or task.probe_targets()
    pos = task.readout_pos
    layers = layer_names(model)
    rows = []
    for target, op in operands.items():
        tr = _data(task, family, op, s.n_train, s.c_test, s.seed, 1)
        te = _data(task, family, op, s.n_test, s.c_test, s.seed, 2)
        acc = train_probes(residual_features(model, tr.tokens, pos), torch.from_numpy(tr.answer),
                           residual_features(model, te.tokens, pos), torch.from_numpy(te.answer),
                           len(task.output_names), s)
        maj = majority_rate(te.answer)
        for i, (name, _) in enumerate(layers):
            rows.append({"model": label, "layer": name, "layer_index": i, "target": target, "operand": op,
                         "family": family, "acc": float(acc[i]), "majority": maj, "n_test": s.n_test})
    return Result("probe", rows, {"settings": s.to_dict(), "position": "ART (predicts Ans)", "family": family})


def probe_run(run_dir: str | Path, *, settings: ProbeSettings | None = None, family: str | None = None,
              controls: bool = True, device: str = "cpu") -> Result:
    """Probe a run's model and, as controls, its pretrained ancestor and a random-init model of the same shape
    (all on the same probe data)."""
    cfg, task, model, side = load_run(run_dir, device)
    s = settings or ProbeSettings.for_preset(cfg.preset)
    fam = family or s.family or cfg.eval_family
    controls = controls and s.controls
    subjects = [(side.get("stage", "model"), model)]
    if controls:
        pt = ancestor(run_dir, "pretrain")
        if pt is not None and Path(pt) != Path(run_dir):
            subjects.append(("pretrained", load_run(pt, device)[2]))
        torch.manual_seed(s.seed)
        subjects.append(("random-init", build_model(cfg, task).to(device).eval()))
    rows: list[dict] = []
    for label, m in subjects:
        rows += probe(m, task, family=fam, settings=s, label=label).rows
    meta = {"settings": s.to_dict(), "run": str(run_dir), "stage": side.get("stage"), "family": fam,
            "position": "ART (predicts Ans)", "models": [lab for lab, _ in subjects]}
    return Result("probe", rows, meta, {"summary": probe_summary(rows)})


def probe_summary(rows: list[dict]) -> list[dict]:
    """Best layer per (model, target): the number the verdict and the acceptance compare."""
    best: dict[tuple[str, str], dict] = {}
    for r in rows:
        k = (r["model"], r["target"])
        if k not in best or r["acc"] > best[k]["acc"]:
            best[k] = r
    return [{"model": m, "target": t, "best_layer": r["layer"], "acc": r["acc"], "majority": r["majority"]}
            for (m, t), r in best.items()]


def with_overrides(s: ProbeSettings, **kw) -> ProbeSettings:
    return s.replace(**{k: v for k, v in kw.items() if v is not None})
