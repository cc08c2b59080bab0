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

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from wrapperlab.analysis.common import AnalysisError, Result, Settings, need


class CapabilityError(AnalysisError):
    """A capability file, tokenizer or model pair that cannot be used (one line naming what is wrong)."""


@dataclass(frozen=True)
class Record:
    prompt: str
    answer: str
    label: str | None = None
    line: int = 0


def read_records(path: str | Path) -> list[Record]:
    """The records of a capability JSONL file; a malformed line is an error naming its number."""
    p = Path(path)
    if not p.is_file():
        raise CapabilityError(f"--capability: {path} is not a file")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CapabilityError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("answer"),
                                                                                                  str):
            raise CapabilityError(f"{path}: line {n} needs string fields \"prompt\" and \"answer\"")
        label = rec.get("label")
        if label is not None and not isinstance(label, (str, int)):
            raise CapabilityError(f"{path}: line {n}: \"label\" must be a string or an integer")
        if not rec["answer"]:
            raise CapabilityError(f"{path}: line {n}: the answer is empty")
        out.append(Record(rec["prompt"], rec["answer"], None if label is None else str(label), n))
    if not out:
        raise CapabilityError(f"{path}: no records")
    return out


# ------------------------------------------------------------------------------------------------ tokenizers
class WordTokenizer:
    """A run's own vocabulary: text is split on whitespace and every piece must be a token."""

    def __init__(self, tokens: tuple[str, ...] | list[str]):
        self.tokens = tuple(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in text.split():
            if piece not in self.index:
                raise KeyError(piece)
            ids.append(self.index[piece])
        return ids

    def decode(self, ids) -> str:
        return " ".join(self.tokens[i] for i in ids)

    def identity(self) -> tuple:
        return ("word", self.tokens)


class HFTokenizer:
    """A Hugging Face tokenizer from a local model directory (no special tokens are added to the text)."""

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        self.path = str(path)
        cfg = Path(path) / "tokenizer_config.json"
        named = json.loads(cfg.read_text()).get("tokenizer_class") if cfg.is_file() else None
        # a plain tokenizer.json (as wrapperlab writes) is read as it is; AutoTokenizer would rebuild it as the
        # model type's own tokenizer class (a Qwen2 directory's, say), which can drop its vocabulary
        cls = PreTrainedTokenizerFast if named == "PreTrainedTokenizerFast" else AutoTokenizer
        self.tok = cls.from_pretrained(self.path, local_files_only=True)

    def encode(self, text: str) -> list[int]:
        try:
            return list(self.tok(text, add_special_tokens=False)["input_ids"])
        except Exception as e:  # tokenizers raises a bare Exception for a word outside a WordLevel vocabulary
            raise ValueError(f"the tokenizer cannot encode {text!r} ({' '.join(str(e).split())[:200]})") from None

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def identity(self) -> tuple:
        return ("hf", tuple(sorted(self.tok.get_vocab().items())))


@dataclass
class Capability:
    """Tokenized records: prompt and answer ids per record, and the probe classes (label, else answer)."""

    records: list[Record]
    prompts: list[list[int]]
    answers: list[list[int]]
    classes: np.ndarray
    class_names: list[str]
    source: str = ""

    @classmethod
    def build(cls, records: list[Record], tokenizer, vocab_size: int, seq_len: int | None = None,
              source: str = "") -> Capability:
        prompts, answers = [], []
        for r in records:
            where = f"{source}: line {r.line}" if source else f"line {r.line}"
            try:
                p, full = tokenizer.encode(r.prompt), tokenizer.encode(joined(r.prompt, r.answer))
            except KeyError as e:
                raise CapabilityError(f"{where}: token {e.args[0]!r} is not in the model's vocabulary") from None
            except ValueError as e:
                raise CapabilityError(f"{where}: {e}") from None
            if not p:
                raise CapabilityError(f"{where}: the prompt has no tokens")
            a = full[len(p):]
            if full[:len(p)] != p:
                raise CapabilityError(f"{where}: the answer {r.answer!r} merges with the prompt's last token when "
                                      f"the two are tokenized together; end the prompt at a token boundary")
            if not a or tokenizer.decode(a).strip() != r.answer.strip():
                raise CapabilityError(f"{where}: the tokenizer cannot produce the answer {r.answer!r} "
                                      f"(it encodes to {a})")
            if max(p + a) >= vocab_size:
                raise CapabilityError(f"{where}: token id {max(p + a)} is beyond the model's vocabulary "
                                      f"({vocab_size}); the tokenizer does not belong to this model")
            if seq_len and len(p) + len(a) > seq_len:
                raise CapabilityError(f"{where}: prompt + answer is {len(p) + len(a)} tokens, beyond the model's "
                                      f"context ({seq_len})")
            prompts.append(p)
            answers.append(a)
        keys = [r.label if r.label is not None else r.answer for r in records]
        names = sorted(set(keys))
        classes = np.array([names.index(k) for k in keys], dtype=np.int64)
        return cls(records, prompts, answers, classes, names, source)

    def __len__(self) -> int:
        return len(self.records)

    def split(self, test_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """A seeded (train, test) split of the record indices (the probes fit on train and score on test)."""
        order = np.random.default_rng([seed, 11]).permutation(len(self))
        n_test = max(1, int(round(test_frac * len(self))))
        if n_test >= len(self):
            raise CapabilityError(f"{self.source}: {len(self)} records are too few to hold out {n_test} for testing")
        return np.sort(order[n_test:]), np.sort(order[:n_test])

    def majority(self, idx: np.ndarray) -> float:
        answers = [self.records[i].answer for i in idx]
        return max(answers.count(a) for a in set(answers)) / len(answers)


def joined(prompt: str, answer: str) -> str:
    """The text a model reads: the answer follows the prompt after one space, unless either side already has
    whitespace at the join (so ``"... ="`` + ``"4"`` reads ``"... = 4"``, and GPT-2's BPE sees ``" 4"``, the token
    a model would produce there)."""
    if not prompt or not answer or prompt[-1].isspace() or answer[0].isspace():
        return prompt + answer
    return f"{prompt} {answer}"


def _groups(lengths: list[int], idx: np.ndarray) -> list[np.ndarray]:
    """``idx`` grouped by equal length (each group keeps idx order)."""
    by: dict[int, list[int]] = {}
    for i in idx:
        by.setdefault(lengths[i], []).append(int(i))
    return [np.array(v) for _, v in sorted(by.items())]


def _device(model) -> torch.device:
    return next(model.parameters()).device


# -------------------------------------------------------------------------------------------- measurements
@torch.no_grad()
def correct(model, cap: Capability, idx: np.ndarray | None = None, batch_size: int = 256) -> np.ndarray:
    """Per record of ``idx``: does greedy decoding from the prompt reproduce every answer token?"""
    idx = np.arange(len(cap)) if idx is None else idx
    dev, was = _device(model), model.training
    model.eval()
    ok = {}
    keys = [len(p) * 10_000 + len(a) for p, a in zip(cap.prompts, cap.answers)]
    for g in _groups(keys, idx):
        for s in range(0, len(g), batch_size):
            rows = g[s:s + batch_size]
            x = torch.tensor([cap.prompts[i] for i in rows], device=dev)
            ans = torch.tensor([cap.answers[i] for i in rows], device=dev)
            hit = torch.ones(len(rows), dtype=torch.bool, device=dev)
            for j in range(ans.shape[1]):
                pred = model(x, positions=-1).argmax(-1)
                hit &= pred == ans[:, j]
                x = torch.cat([x, pred[:, None]], 1)
            ok.update(zip(rows.tolist(), hit.cpu().tolist()))
    model.train(was)
    return np.array([ok[int(i)] for i in idx], dtype=bool)


def accuracy(model, cap: Capability, idx: np.ndarray | None = None) -> float:
    return float(correct(model, cap, idx).mean())


def answer_loss(model, cap: Capability, idx: np.ndarray, *, batch_size: int = 128,
                backward: bool = False) -> torch.Tensor:
    """Mean teacher-forced cross-entropy of the answer tokens given the prompt, over every answer token of the
    records ``idx``, in batches of ``batch_size`` records. ``backward``: backpropagate batch by batch (the
    gradient of the mean, without holding every batch's graph) and return the value detached; otherwise the
    returned value is differentiable."""
    dev = _device(model)
    count = sum(len(cap.answers[i]) for i in idx)
    total = torch.zeros((), device=dev)
    keys = [len(p) * 10_000 + len(a) for p, a in zip(cap.prompts, cap.answers)]
    for g in _groups(keys, idx):
        lp, la = len(cap.prompts[g[0]]), len(cap.answers[g[0]])
        for s in range(0, len(g), batch_size):
            seq = torch.tensor([cap.prompts[i] + cap.answers[i] for i in g[s:s + batch_size]], device=dev)
            logits = model(seq[:, :-1], positions=torch.arange(lp - 1, lp - 1 + la, device=dev))
            part = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, lp:].reshape(-1),
                                   reduction="sum") / count
            if backward:
                part.backward()
                part = part.detach()
            total = total + part
    return total


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


def verdict_pair(base, finetuned, cap: Capability, *, control=None, settings: PairSettings | None = None,
                 thresholds=None, log=lambda _m: None) -> tuple[Result, dict[str, Result]]:
    """The verdict on a (base, fine-tuned) pair: behaviour on every record, probes (base, fine-tuned and a control:
    the given model, else a random-init model of the fine-tuned one's architecture), pruning of the fine-tuned
    model; returns the verdict and the evidence it read."""
    from wrapperlab.analysis.verdict import Thresholds, decide
    from wrapperlab.models.registry import random_like

    s = settings or PairSettings()
    th = thresholds or Thresholds()
    log("behaviour")
    acc_b, acc_f = accuracy(base, cap), accuracy(finetuned, cap)
    log("probes")
    ctl = control if control is not None else random_like(finetuned, s.seed)
    probe = probe_pair([("finetune", finetuned), ("pretrained", base), ("random-init", ctl)], cap, s)
    log("pruning")
    prune = prune_pair(finetuned, cap, s.replace(ks=tuple(k for k in s.ks if k <= th.prune_k) or (0,)))
    res = decide(acc_b, acc_f, th, probe=probe, prune=prune, what=f"capability ({len(cap)} records)")
    res.meta |= {"capability": cap.source, "control": "given" if control is not None else "random-init"}
    return res, {"probe": probe, "prune": prune}


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
        return Subject(str(p), run.model, WordTokenizer(tokens), run.model.cfg.vocab_size, run.model.cfg.seq_len)
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
    return Subject(str(path), model, tok, model.vocab_size, model.seq_len or None)


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
