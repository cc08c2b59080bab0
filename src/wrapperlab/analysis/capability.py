"""A capability given as data, and the verdict's battery on any (base, fine-tuned) pair of models.

A capability is a JSONL file of records ``{"prompt": str, "answer": str, "label": optional}`` read with the models'
tokenizer (a Hugging Face tokenizer in the model directory, or a run's own word-level vocabulary); the answer
follows the prompt after one space unless either side has whitespace at the join (:func:`joined`). It defines:

- behaviour: the greedy continuation of the prompt reproduces the answer's tokens exactly;
- the probe target: the label, else the answer, read from the residual stream at the last prompt token (the
  position that predicts the answer, as the paper probes at ART, §5 and App. D);
- the capability loss: teacher-forced cross-entropy of the answer tokens, the objective of grad·w pruning (App. D).

The battery compares base and fine-tuned models on the same records: behaviour of both, per-block probes of both
and of a random-init model of the same architecture (or a given control), pruning of the fine-tuned model, and the
verdict with the rules of ``verdict.py``. Records of different lengths are batched by length (no padding, so no
attention mask is needed and positions are exact).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from wrapperlab.analysis.common import Result, Settings, need
from wrapperlab.tasks.capability import (  # noqa: F401  (the capability's names, for one import)
    Capability,
    CapabilityError,
    HFTokenizer,
    Record,
    WordTokenizer,
    _groups,
    joined,
    read_records,
)
from wrapperlab.training.capability_eval import accuracy, answer_loss, correct  # noqa: F401


def features(model, cap: Capability, idx: np.ndarray) -> torch.Tensor:
    """Residual stream at the last prompt token for every block boundary B0..BL: (L + 1, len(idx), d)."""
    from wrapperlab.analysis.probing import residual_features

    lengths = [len(p) for p in cap.prompts]
    parts, order = [], []
    for g in _groups(lengths, idx):
        tokens = np.array([cap.prompts[i] for i in g], dtype=np.int64)
        parts.append(residual_features(model, tokens, tokens.shape[1] - 1))
        order += g.tolist()
    feats = torch.cat(parts, 1)
    pos = {v: k for k, v in enumerate(order)}
    return feats[:, [pos[int(i)] for i in idx]]


# ------------------------------------------------------------------------------------------------- battery
class PairSettings(Settings):
    test_frac: float = Field(0.25, gt=0, lt=1, description="records held out to score probes and pruning")
    probe_iters: int = Field(1500, ge=1)
    probe_lr: float = Field(1e-3, gt=0)
    ks: tuple[int, ...] = tuple(range(16))
    matrices: tuple[str, ...] = ()
    seed: int = Field(0, ge=0)


def probe_pair(subjects: list[tuple[str, object]], cap: Capability, s: PairSettings) -> Result:
    """Per-block probes of the capability's classes for every (label, model), on the same split."""
    from wrapperlab.analysis.probing import ProbeSettings, layer_names, probe_summary, train_probes

    tr, te = cap.split(s.test_frac, s.seed)
    ps = ProbeSettings(iters=s.probe_iters, lr=s.probe_lr, seed=s.seed)
    y_tr, y_te = torch.from_numpy(cap.classes[tr]), torch.from_numpy(cap.classes[te])
    maj = float(np.bincount(cap.classes[te]).max() / len(te))
    rows = []
    for label, m in subjects:
        acc = train_probes(features(m, cap, tr), y_tr, features(m, cap, te), y_te, len(cap.class_names), ps)
        for i, (name, _) in enumerate(layer_names(m)):
            rows.append({"model": label, "layer": name, "layer_index": i, "target": "O_PT", "operand": "capability",
                         "acc": float(acc[i]), "majority": maj, "n_test": len(te)})
    meta = {"settings": s.to_dict(), "position": "last prompt token", "capability": cap.source,
            "classes": len(cap.class_names), "models": [lab for lab, _ in subjects]}
    return Result("probe", rows, meta, {"summary": probe_summary(rows)})


def prune_pair(model, cap: Capability, s: PairSettings, units_listed: int = 100) -> Result:
    """grad·w pruning of ``model`` on the capability loss (train split), then behaviour on the test split for
    every K, in the row shape the verdict's pruning rule reads (target O_PT, c_test 0)."""
    import copy

    from wrapperlab.analysis.pruning import rank_units, zero_units

    need(model, "matrices")
    tr, te = cap.split(s.test_frac, s.seed)
    units, n = rank_units(model, lambda m: answer_loss(m, cap, tr, backward=True), s.matrices, "neuron",
                          max(units_listed, max(s.ks)))
    if max(s.ks) > n:
        raise CapabilityError(f"ks: K={max(s.ks)} exceeds the {n} candidate units")
    pruned = copy.deepcopy(model).eval()
    maj = cap.majority(te)
    rows, done = [], 0
    for k in sorted(set(s.ks)):
        zero_units(pruned, units[done:k])
        done = k
        rows.append({"k": k, "target": "O_PT", "c_test": 0.0, "acc": accuracy(pruned, cap, te), "majority": maj,
                     "n": len(te)})
    listed = [u.row(i + 1) | {"param": u.param} for i, u in enumerate(units[:units_listed])]
    return Result("prune", rows, {"settings": s.to_dict(), "n_candidates": n, "capability": cap.source,
                                  "objective": "answer CE of the capability records (train split)"},
                  {"units": listed})


class RelearnSettings(Settings):
    lr: float = Field(1e-5, gt=0, description="relearning LR (constant after warmup)")
    steps: int = Field(200, ge=1)
    batch_size: int = Field(32, ge=1)
    warmup: int = Field(0, ge=0, description="warmup steps")
    every: int = Field(20, ge=1, description="evaluation and checkpoint cadence (plus steps 1, 2, 5, 10, ...)")
    fraction: float = Field(0.9, gt=0, le=1, description="target: this fraction of the base model's accuracy")
    test_frac: float = Field(0.25, gt=0, lt=1)
    seed: int = Field(0, ge=0)
    threads: int = Field(0, ge=0)


def stage_model(path: str | Path) -> tuple[dict, dict]:
    """How a training stage starts from the model at ``path``: (model section, extra config keys). A run directory
    is its family's model with ``init`` = the run; a Hugging Face directory (or BASE+ADAPTER) is the ``hf`` family."""
    from wrapperlab.training.checkpoint import SIDECAR, read_sidecar

    if (Path(path) / SIDECAR).is_file():
        return read_sidecar(path)["config"]["model"], {"init": str(path)}
    return {"family": "hf", "path": str(path)}, {}


def fingerprint(model_path: str | Path, *files: str | Path) -> str:
    """sha256 of the record files' contents and of the starting model: a run's id, or a Hugging Face directory's
    config and the size and modification time of its weight files (BASE+ADAPTER: both directories)."""
    import hashlib

    from wrapperlab.models.hf import split_adapter
    from wrapperlab.training.checkpoint import SIDECAR, read_sidecar

    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    if (Path(model_path) / SIDECAR).is_file():
        h.update(read_sidecar(model_path)["run_id"].encode())
    else:
        for d in (p for p in split_adapter(model_path) if p is not None):
            for f in sorted(d.iterdir()):
                if f.suffix == ".json":
                    h.update(f.read_bytes())
                elif f.suffix in (".safetensors", ".bin"):
                    st = f.stat()
                    h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def relearn_config(subject: Subject, capability: str | Path, s: RelearnSettings,
                   train_data: str | Path | None = None) -> dict:
    """The raw config of a ``reft`` stage that relearns the capability file's answers from ``subject`` (on
    ``train_data``'s records when given, else on the file's training split)."""
    from wrapperlab.models.hf import split_adapter

    model, extra = stage_model(subject.path)
    words = subject.tokenizer.tokens if isinstance(subject.tokenizer, WordTokenizer) else None
    task = {"kind": "capability", "path": str(capability), "vocab_size": subject.vocab_size,
            "seq_len": subject.seq_len, "test_frac": s.test_frac, "split_seed": s.seed,
            **({"train_path": str(train_data)} if train_data else {}),
            "digest": fingerprint(subject.path, capability, *([train_data] if train_data else [])),
            **({"words": list(words)} if words is not None else {"tokenizer": str(split_adapter(subject.path)[0])})}
    train = {"loss": "masked", "lr": s.lr, "steps": s.steps, "batch_size": s.batch_size, "warmup_steps": s.warmup,
             "schedule": "constant", "weight_decay": 0.0, "seed": s.seed}
    return {"stage": "reft", "task": task, "model": model, "train": train, "threads": s.threads,
            "eval": {"every": s.every, "log_spaced": True}, **extra}


def curve_area(steps: list[int], accs: list[float], base_acc: float) -> float | None:
    """Sample efficiency of a relearning curve: its trapezoid area over the steps run, divided by the steps and by
    the base model's accuracy (1.0: at the base model's accuracy from the first step; None without a span or a base
    accuracy above 0). The difference of two curves' areas compares them over every step, not at one threshold."""
    span = steps[-1] - steps[0] if steps else 0
    if span <= 0 or base_acc <= 0:
        return None
    area = sum((b - a) * (x + y) / 2 for a, b, x, y in zip(steps, steps[1:], accs, accs[1:]))
    return area / span / base_acc


def relearn_pair(subjects: list[tuple[str, Subject]], cap: Capability, out: str | Path, base,
                 s: RelearnSettings | None = None, *, train_data: str | Path | None = None, progress: bool = False,
                 log=lambda _m: None) -> Result:
    """Relearning (paper §5: reverse fine-tuning) of each (curve, subject) on the capability file's training split,
    one ``reft`` stage each under ``out`` (finished stages are reused, interrupted ones resume), scored on its
    held-out records. Curves: ``reft`` (the fine-tuned model) and ``scr+ft`` (the control: a model that never had
    the capability, the role of the paper's Scr.+FT baseline). Rows: curve, step, acc, loss, majority. Side table
    ``summary``: per curve, the first evaluated step whose accuracy reaches ``fraction`` x ``base_acc`` (the base
    model's accuracy on the same held-out records), None when not reached, and the curve's area
    (:func:`curve_area`); ``meta["area_gap"]``: the fine-tuned curve's area minus the control's."""
    from wrapperlab.analysis.common import AnalysisError
    from wrapperlab.training.config import ConfigError
    from wrapperlab.training.stage import Stage, default_run_dir, resolve

    s = s or RelearnSettings()
    capability = cap.source
    if train_data:  # read and tokenized before anything trains: a bad line is one error, nothing written
        for _, subj in subjects:
            Capability.build(read_records(train_data), subj.tokenizer, subj.vocab_size, subj.seq_len, str(train_data))
    held_out = np.arange(len(cap)) if train_data else cap.split(s.test_frac, s.seed)[1]
    base_acc = accuracy(base, cap, held_out)
    target = s.fraction * base_acc
    rows, summary = [], []
    for curve, subj in subjects:
        try:
            cfg, _ = resolve(relearn_config(subj, capability, s, train_data))
        except ConfigError as e:
            raise AnalysisError(str(e)) from None
        run_dir = default_run_dir(cfg, None, Path(out) / "relearn")
        log(f"relearn {curve} ({subj.path}) -> {run_dir}")
        side = Stage(cfg, None, run_dir).run(progress=progress, log=log)
        if side.get("status") != "done":
            raise AnalysisError(f"{run_dir}: relearning ended with status {side.get('status')!r}")
        label = "control" if curve == "scr+ft" else "fine-tuned"
        curve_rows = sorted(({"curve": curve, "label": label, "step": m["step"], "acc": m["acc"], "loss": m["loss"],
                              "majority": m["majority"]} for m in side["metrics"]), key=lambda r: r["step"])
        rows += curve_rows
        hit = next((r["step"] for r in curve_rows if r["acc"] >= target), None)
        summary.append({"curve": curve, "label": label,
                        "model": subj.path, "lr": s.lr, "steps": s.steps, "steps_to_target": hit,
                        "area": curve_area([r["step"] for r in curve_rows], [r["acc"] for r in curve_rows], base_acc),
                        "target": target, "start_acc": curve_rows[0]["acc"], "final_acc": curve_rows[-1]["acc"],
                        "run_dir": str(run_dir)})
    areas = {r["curve"]: r["area"] for r in summary if r["area"] is not None}
    meta = {"settings": s.to_dict(), "capability": str(capability), "base_acc": base_acc, "target": target,
            "area_gap": areas["reft"] - areas["scr+ft"] if {"reft", "scr+ft"} <= set(areas) else None,
            "relearn_data": str(train_data) if train_data else "the capability's training split",
            "baseline": "control" if any(c == "scr+ft" for c, _ in subjects) else "none given"}
    return Result("revival", rows, meta, {"summary": summary})


def verdict_pair(base, finetuned, cap: Capability, *, control=None, settings: PairSettings | None = None,
                 thresholds=None, revival: Result | None = None, probe: Result | None = None,
                 prune: Result | None = None, log=lambda _m: None) -> tuple[Result, dict[str, Result]]:
    """The verdict on a (base, fine-tuned) pair: behaviour on every record, probes (base, fine-tuned and a control:
    the given model, else a random-init model of the fine-tuned one's architecture), pruning of the fine-tuned
    model, and relearning when ``revival`` (from :func:`relearn_pair`) is given; returns the verdict and the
    evidence it read."""
    from wrapperlab.analysis.verdict import Thresholds, decide
    from wrapperlab.models.registry import random_like

    s = settings or PairSettings()
    th = thresholds or Thresholds()
    log("behaviour")
    acc_b, acc_f = accuracy(base, cap), accuracy(finetuned, cap)
    if probe is None:
        log("probes")
        ctl = control if control is not None else random_like(finetuned, s.seed)
        probe = probe_pair([("finetune", finetuned), ("pretrained", base), ("random-init", ctl)], cap, s)
    if prune is None:
        log("pruning")
        prune = prune_pair(finetuned, cap, s.replace(ks=tuple(k for k in s.ks if k <= th.prune_k) or (0,)))
    res = decide(acc_b, acc_f, th, probe=probe, prune=prune, revival=revival,
                 majority=cap.majority(np.arange(len(cap))),
                 what=f"capability ({len(cap)} records)")
    res.meta |= {"capability": cap.source, "control": "given" if control is not None else "random-init"}
    return res, {"probe": probe, "prune": prune} | ({"revival": revival} if revival is not None else {})


# ----------------------------------------------------------------------------------------------- the models
@dataclass
class Subject:
    """A model opened from a path, with the tokenizer its capability text is read with."""

    path: str
    model: object
    tokenizer: object
    vocab_size: int
    seq_len: int | None


def open_subject(path: str | Path, device: str = "cpu") -> Subject:
    """A wrapperlab run directory (its own vocabulary as a word-level tokenizer), a local Hugging Face model
    directory, or a base with a PEFT adapter (``BASE+ADAPTER``, or an adapter directory naming its local base),
    analysed merged; the tokenizer is the base directory's."""
    from wrapperlab.training.checkpoint import SIDECAR

    p = Path(path)
    if (p / SIDECAR).is_file():
        from wrapperlab.analysis.run import Run

        run = Run.load(p, device)
        tokens = getattr(run.task.vocab, "tokens", None)
        if not isinstance(tokens, tuple):
            raise CapabilityError(f"{path}: a {run.config.task.kind} run has no word vocabulary to read a capability "
                                  f"file with; export it (wrapperlab export) and use the exported directory")
        return _causal(Subject(str(p), run.model, WordTokenizer(tokens), run.model.cfg.vocab_size,
                                    run.model.cfg.seq_len))
    from wrapperlab.models.hf import HFLoadError, load_any, split_adapter

    try:
        d, _ = split_adapter(path)
        model = load_any(path, device)
    except HFLoadError as e:
        raise CapabilityError(str(e)) from None
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise CapabilityError(f"{path}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json) in the "
                              f"model directory")
    try:
        tok = HFTokenizer(d)
    except Exception as e:  # whatever a broken tokenizer file raises inside transformers
        raise CapabilityError(f"{d}: cannot load its tokenizer ({' '.join(str(e).split())[:200]})") from None
    return _causal(Subject(str(path), model, tok, model.vocab_size, model.seq_len or None))


def _causal(s: Subject) -> Subject:
    """A capability is read left to right (its answer follows its prompt): a non-causal model would see it."""
    from wrapperlab.models.registry import components

    if not components(s.model).causal:
        raise CapabilityError(f"{s.path}: a {components(s.model).family} model that is not causal would read the "
                              f"answer it is asked to predict; capability files need a causal model")
    return s


@dataclass
class Pair:
    """The subject of a pair analysis: base and fine-tuned models (and a control that never had the capability, when
    given) read on one capability file with their shared tokenizer."""

    base: Subject | None
    finetuned: Subject
    capability: Capability
    control: Subject | None = None

    @classmethod
    def open(cls, base: str | Path | None, finetuned: str | Path, capability: str | Path,
             control: str | Path | None = None, device: str = "cpu") -> Pair:
        """Open every model and read the capability with their tokenizer, all checked to fit together (one line
        naming the mismatch otherwise)."""
        records = read_records(capability)
        f = open_subject(finetuned, device)
        b = open_subject(base, device) if base is not None else None
        if b is not None:
            check_pair(b, f)
        ctl = open_subject(control, device) if control is not None else None
        if ctl is not None:
            check_pair(f, ctl)
        return cls(b, f, Capability.build(records, f.tokenizer, f.vocab_size, f.seq_len, str(capability)), ctl)

    def need_base(self, what: str) -> Subject:
        if self.base is None:
            raise CapabilityError(f"{what} compares two models: give the base model too")
        return self.base


def check_pair(a: Subject, b: Subject) -> None:
    """Base and fine-tuned must read text alike and have the same shape (one line naming the difference)."""
    from wrapperlab.models.registry import components

    if a.tokenizer.identity() != b.tokenizer.identity():
        raise CapabilityError(f"{a.path} and {b.path} have different tokenizers; a pair must share one")
    if a.vocab_size != b.vocab_size:
        raise CapabilityError(f"{a.path} and {b.path} have different vocabulary sizes ({a.vocab_size} vs "
                              f"{b.vocab_size})")
    ca, cb = components(a.model), components(b.model)
    if (ca.n_layer, len(ca.residual)) != (cb.n_layer, len(cb.residual)):
        raise CapabilityError(f"{a.path} and {b.path} have different shapes ({ca.n_layer} vs {cb.n_layer} blocks)")
