"""One training loop for every stage (paper App. C.2, D, E.4): pretrain, finetune, reft, scratch, scratch+ft.

Stages differ only in settings (init, data, loss, optimizer, schedule) — see ``presets.py``:
- pretrain: from scratch, fresh data every step from the family mix and operand prior, next-token loss (paper)
  or answer-only loss.
- finetune: from a finished pretrain run, one (family, O_FT) pair, spurious rate ``c_train``, answer-only loss.
- reft: from a finished finetune run, back on the pretraining task (family, O_PT), at an LR smaller than the
  fine-tuning LR (enforced: paper App. D makes it a rule).
- scratch: from scratch on one (family, operand) pair (the paper's Scr. baseline; with operand=O_FT it is the
  starting point of Scr.+FT).
- scratch+ft: from a finished scratch run, fine-tuned on (family, O_PT) exactly like reft (paper's Scr.+FT).

Determinism and exact resume: the batch of step s is drawn from ``np.random.default_rng([seed, s])``, the
LR is a function of s, and the checkpoint holds the optimizer state, so rerunning an interrupted command
continues bit-identically from the last checkpoint (taken at every evaluation).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wrapperlab.models.registry import default_family, get_family
from wrapperlab.models.registry import families as model_families
from wrapperlab.models.transformer import Transformer
from wrapperlab.tasks.registry import Task, build_task, get_task_kind
from wrapperlab.training import checkpoint as ck
from wrapperlab.training.config import ConfigError, RunConfig, _task_kind, validate
from wrapperlab.training.evaluation import make_evaluator
from wrapperlab.training.schedules import lr_at


def default_run_dir(cfg: RunConfig, parent_id: str | None, root: str | Path = "runs") -> Path:
    return Path(root) / f"{cfg.stage.replace('+', '-')}-{cfg.run_id(parent_id)}"


def parent_info(parent: str | None) -> dict | None:
    if not parent:
        return None
    side = ck.read_sidecar(parent)
    if side.get("status") != "done":
        raise ConfigError(f"parent: run {parent} is not finished (status {side.get('status')!r})")
    return side


def resolve(raw: dict, parent_side: dict | None = None) -> tuple[RunConfig, dict | None]:
    """Validate a raw config. A stage that starts from a trained model inherits the parent's model and task
    shapes; the user may change only the task keys its task kind lists in ``inherited_keys`` (an explicit attempt
    to change the window, O' or the model is refused, since the weights could not fit). It also inherits the
    parent's ``train.seed`` unless one is given, so every run derived from a seed-s run is a seed-s replicate.

    ``parent_side`` stands in for the parent's sidecar when the parent does not exist yet (the experiment
    planner resolves a whole DAG before anything trains); otherwise the sidecar is read from ``raw["parent"]``."""
    raw = dict(raw)
    explicit = set(raw.pop("_explicit", ()))
    raw.pop("_notes", None)
    parent = parent_side if parent_side is not None else parent_info(raw.get("parent"))
    if parent is not None:
        pcfg = parent["config"]
        inherited = get_task_kind(_task_kind(pcfg["task"])).inherited_keys  # task keys a child may still change
        for key in sorted(explicit):
            section, _, rest = key.partition(".")
            head = rest.split(".", 1)[0]
            if section == "model" or (section == "task" and head not in inherited):
                raise ConfigError(f"{key}: cannot change on a stage that starts from a trained model "
                                  f"(it inherits {section} settings from {raw['parent']})")
        raw["task"] = _child_task(pcfg["task"], raw.get("task", {}), inherited, explicit)
        raw["model"] = pcfg["model"]
        if "train.seed" not in explicit:  # a run derived from a seeded run is a replicate of that seed
            raw["train"] = {**raw.get("train", {}), "seed": pcfg["train"]["seed"]}
        cfg = validate(raw)
        kind = get_task_kind(cfg.task.kind)
        if kind.check_child is not None:  # what a child may not change although its key is inheritable
            try:
                kind.check_child(type(cfg.task).model_validate(pcfg["task"]), cfg.task)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        allowed = kind.parent_stages.get(cfg.stage, ())
        if pcfg["stage"] not in allowed:
            raise ConfigError(f"parent: a {cfg.stage} run starts from a {' or '.join(allowed)} run, "
                              f"not {pcfg['stage']}")
        if cfg.stage == "reft" and kind.reft_below_parent and cfg.train.lr >= pcfg["train"]["lr"]:
            raise ConfigError(f"train.lr: reft LR ({cfg.train.lr:g}) must be smaller than its parent's "
                              f"fine-tuning LR ({pcfg['train']['lr']:g}) (paper App. D)")
    else:
        fam = model_families().get((raw.get("model") or {}).get("family")
                                   or default_family(_task_kind(raw.get("task") or {})))
        if fam is not None and fam.shape_from_task is not None:  # e.g. a compiled program's shape
            for key in sorted(explicit):
                if key.startswith("model."):
                    raise ConfigError(f"{key}: a {fam.name} model's shape is fixed by its task")
            task_cfg = validate({**raw, "model": {}}).task
            raw["model"] = fam.shape_from_task(task_cfg).model_dump(mode="json")
        cfg = validate(raw)
    if cfg.init:  # the weights a parentless stage starts from must fit its model
        init = parent_info(cfg.init)
        if not _same_model(init["config"]["model"], cfg.model):
            raise ConfigError(f"init: {cfg.init} holds a different model ({init['config']['model']}) than this "
                              f"stage's ({cfg.model.model_dump(mode='json')})")
    if cfg.train.method == "lora":  # the targets must be linear maps of this family: checked on a weightless model
        from wrapperlab.training.lora import LoRAError, targets_of

        with torch.device("meta"):  # the vocabulary size does not change the names checked
            meta = get_family(cfg.model.family).build(cfg.model, max(1, getattr(cfg.model, "vocab_size", 0)),
                                                      make_task(cfg).seq_len)
        try:
            targets_of(meta, cfg.train.lora_targets)
        except LoRAError as e:
            raise ConfigError(str(e)) from None
    # the (family, operand) each single-task stage trains on, when not given (a task without families has none)
    if cfg.stage != "pretrain" and cfg.train.family is None:
        cfg.train.family = get_task_kind(cfg.task.kind).default_family(cfg.task)
    if cfg.stage != "pretrain" and cfg.train.operand is None and cfg.train.family is not None:
        cfg.train.operand = cfg.task.o_ft if cfg.stage == "finetune" else cfg.task.o_pt
    try:  # the task's rules again, now that the family and operand defaults are filled in
        get_task_kind(cfg.task.kind).check_run(cfg.stage, cfg.parent, cfg.train, cfg.eval, cfg.task)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg, parent


def _child_task(parent: dict, given: dict, inherited: tuple[str, ...], explicit: set[str]) -> dict:
    """The parent's task with the inheritable keys the user set (``task.families.count=2`` sets a key of
    ``families``: a dict-valued key is merged into the parent's, so one weight of a mix can change)."""
    named = {key.split(".")[1] for key in explicit if key.startswith("task.")}
    out = dict(parent)
    for k, v in given.items():
        if k in inherited and k in named:
            out[k] = {**parent[k], **v} if isinstance(v, dict) and isinstance(parent.get(k), dict) else v
    return out


def _same_model(stored: dict, model) -> bool:
    """A sidecar's model section (validated, so fields added since it was written take their defaults) is ``model``."""
    from pydantic import ValidationError

    if (stored.get("family") or "gpt") != model.family:
        return False
    try:
        return type(model).model_validate(stored) == model
    except ValidationError:
        return False


def make_task(cfg: RunConfig) -> Task:
    return build_task(cfg.task)


def build_model(cfg: RunConfig, task: Task) -> torch.nn.Module:
    """A freshly initialised model of the run's family and shape (vocabulary and length from the task)."""
    return get_family(cfg.model.family).build(cfg.model, len(task.vocab), task.seq_len)


def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """The optimizer over ``model``'s parameters (a LoRA run passes its adapters)."""
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas)


def compute_loss(model: Transformer, task, tokens: torch.Tensor, answer: torch.Tensor, kind: str) -> torch.Tensor:
    """Answer-only cross-entropy at the task's readout, next-token loss on the positions the batch marks (``answer``
    holds a target per input position, -100 where none), or next-token loss (PCFG) ignoring PAD."""
    if kind == "answer":
        logits = model(task.answer_inputs(tokens), positions=task.readout)
        return F.cross_entropy(logits, answer)
    if kind == "masked":
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), answer.reshape(-1), ignore_index=-100)
    pad_id = task.vocab.pad_id
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    logits = model(inp)
    tgt = tgt.masked_fill((tgt == pad_id) | (inp == pad_id), -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)


class Stage:
    """A configured stage bound to a run directory. ``run()`` trains (or resumes, or returns if done)."""

    def __init__(self, cfg: RunConfig, parent: dict | None, run_dir: str | Path | None = None):
        self.cfg, self.parent = cfg, parent
        self.parent_id = parent["run_id"] if parent else None
        self.run_id = cfg.run_id(self.parent_id)
        self.run_dir = Path(run_dir) if run_dir else default_run_dir(cfg, self.parent_id)
        self.task = make_task(cfg)
        self.lora = None  # the adapters of a train.method=lora run, once attached
        self.eval_s = 0.0  # seconds spent evaluating (resumed runs carry on from their sidecar)
        self.stopped: dict | None = None  # the headline row eval.stop_margin last read

    # ------------------------------------------------------------------ state
    def _fresh(self) -> tuple[Transformer, torch.optim.Optimizer, int, list]:
        model = self._starting_model()
        return model, make_optimizer(self._trainable(model), self.cfg), 0, []

    def _starting_model(self) -> torch.nn.Module:
        """The model at step 0 on the run's device: a fresh init, the family's own weights, or the parent's (or
        init run's) weights."""
        torch.manual_seed(self.cfg.train.seed)
        model = build_model(self.cfg, self.task)
        pretrained = get_family(self.cfg.model.family).pretrained
        if self.parent is None and self.cfg.stage == "finetune" and pretrained is not None:
            model = pretrained(self.cfg.task, self.cfg.train.seed)  # e.g. a compiled program (paper App. C.1)
        start = self.cfg.parent or self.cfg.init
        if start is not None:
            _, tensors = ck.load_tensors(start, self.parent)
            what = f"{'parent' if self.parent else 'init'} {start}"
            ck.load_model_state(model, ck.split_prefix(tensors, "model"), what)
        return model.to(self.cfg.device)

    def _trainable(self, model: torch.nn.Module) -> torch.nn.Module:
        """What the optimizer updates: the model, or (``train.method=lora``) adapters attached to it."""
        if self.cfg.train.method != "lora":
            self.lora = None
            return model
        from wrapperlab.training.lora import LoRA

        t = self.cfg.train
        self.lora = LoRA(model, t.lora_targets, t.lora_rank, t.lora_alpha)
        return self.lora

    def _resume(self, side: dict) -> tuple[Transformer, torch.optim.Optimizer, int, list]:
        _, tensors = ck.load_tensors(self.run_dir, side)
        if self.cfg.train.method == "lora":  # the frozen base is the starting model; the run saved it merged
            model = self._starting_model()
        else:
            model = build_model(self.cfg, self.task)
            ck.load_model_state(model, ck.split_prefix(tensors, "model"), str(self.run_dir))
        model.to(self.cfg.device)
        opt = make_optimizer(self._trainable(model), self.cfg)
        if self.lora is not None:
            self.lora.load_factors(ck.split_prefix(tensors, "lora"))
        ck.load_optimizer(opt, ck.split_prefix(tensors, "optim"), side["optim_groups"])
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
        return model, opt, int(side["step"]), list(side.get("metrics", []))

    def existing(self) -> dict | None:
        if not (self.run_dir / ck.SIDECAR).is_file():
            return None
        side = ck.read_sidecar(self.run_dir)
        if "task" not in side.get("config", {}):
            raise ConfigError(f"out: {self.run_dir} holds a {side.get('stage')} run in the format of an earlier "
                              f"wrapperlab (before story runs were ordinary runs); delete it or choose another --out "
                              f"to train it again")
        if side.get("run_id") != self.run_id:
            raise ConfigError(f"out: {self.run_dir} holds a different run ({side.get('run_id')}); "
                              f"choose another --out or delete it")
        return side

    def _save(self, model, opt, step, metrics, status, wall) -> dict:
        otensors, groups = ck.optimizer_tensors(opt)
        lora = self.lora
        state = lora.merged_state(model) if lora is not None else model.state_dict()
        tensors = {f"model.{k}": v for k, v in state.items()}
        if lora is not None:
            tensors |= {f"lora.{k}": v for k, v in lora.factors().items()}
        tensors |= {f"optim.{k}": v for k, v in otensors.items()}
        tensors["rng.torch"] = torch.get_rng_state()
        side = {"run_id": self.run_id, "stage": self.cfg.stage, "status": status,
                "config": self.cfg.model_dump(mode="json"), "parent": self.cfg.parent,
                "parent_id": self.parent_id, "optim_groups": groups, "metrics": metrics,
                "wall_s": round(wall, 2), "eval_s": round(self.eval_s, 2), "steps": self.cfg.train.steps}
        if status == "done" and self.stopped is not None and step < self.cfg.train.steps:
            side["stopped"] = self.stopped  # finished by eval.stop_margin, not by train.steps
        return ck.save_checkpoint(self.run_dir, step, tensors, side)

    def _stop_line(self) -> str:
        s = self.stopped
        return (f"accuracy {100 * s['acc']:.1f}% reached the majority rate {100 * s['majority']:.1f}% + "
                f"{100 * s['margin']:g} points; the run is done (eval.stop_margin)")

    # ------------------------------------------------------------------ loop
    def autocast(self):
        """bf16 autocast when ``train.precision=bf16`` (weights, optimizer state and evaluation stay fp32)."""
        dev = "cuda" if self.cfg.device.startswith("cuda") else "cpu"
        return torch.autocast(dev, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16")

    def sample_batch(self, step: int):
        """The training batch of ``step``: a function of ``(train.seed, step)`` alone (exact resumes)."""
        t = self.cfg.train
        wrong = {"answer_operand": t.answer_operand} if t.answer_operand else {}  # randFT (App. E.4)
        rng = np.random.default_rng([t.seed, step])
        n_pt = int(rng.binomial(t.batch_size, t.pt_mix)) if t.pt_mix else 0  # PT data mixed in (App. E.1)
        if not n_pt:
            return self.task.sample(t.batch_size, rng, family=t.family, operand=t.operand, c=t.c_train, **wrong)
        # the parent's own pretraining data: its family mix (or the one family it trained on) and operand prior
        pt = (self.parent or {}).get("config", {}).get("train", {})
        mixed = self.task.sample(n_pt, rng, family=pt.get("family"), operand=pt.get("operand"))
        if n_pt == t.batch_size:
            return mixed
        return self.task.sample(t.batch_size - n_pt, rng, family=t.family, operand=t.operand, c=t.c_train,
                                **wrong).concat(mixed)

    def train_step(self, model: Transformer, opt: torch.optim.Optimizer, step: int, batch=None) -> float:
        """One optimisation step at ``step`` (LR from the schedule, the batch of ``(seed, step)`` unless given,
        loss, clip, update) — exactly the body of ``run``'s loop, which benchmarks time. Returns the loss; a
        non-finite loss changes nothing (the caller stops the run)."""
        t = self.cfg.train
        lr = lr_at(step, t.steps, t.lr, t.warmup, t.min_lr_frac, t.schedule)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = batch if batch is not None else self.sample_batch(step)
        tokens = torch.from_numpy(batch.tokens).to(self.cfg.device)
        answer = torch.from_numpy(batch.answer).to(self.cfg.device)
        with self.autocast():
            loss = compute_loss(model, self.task, tokens, answer, t.loss)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            return loss_value
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_((self.lora or model).parameters(), t.grad_clip)
        opt.step()
        return loss_value

    def run(self, progress: bool = True, log: Callable[[str], None] | None = None,
            stop_after: int | None = None) -> dict:
        """Train to completion (or pause, checkpointed, after ``stop_after`` steps of this call). The run directory
        is locked for the duration, so two processes handed the same run (two grids sharing a store) take turns:
        the second finds it done, or resumes what the first left."""
        from wrapperlab.fileio import DirLock, remove_stale_temps

        lock = DirLock(self.run_dir)
        if not lock.acquire(blocking=False):
            (log or (lambda s: None))(f"{self.run_dir}: another process is training this run; waiting for it")
            lock.acquire()
        try:
            remove_stale_temps(self.run_dir)  # left by a process killed mid-write
            return self._run_locked(progress, log, stop_after)
        finally:
            lock.release()

    def _run_locked(self, progress: bool, log: Callable[[str], None] | None, stop_after: int | None) -> dict:
        cfg, t = self.cfg, self.cfg.train
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        side = self.existing()
        if side and side.get("status") == "done":
            return side
        self.task.attach(self.run_dir, cfg.parent, t.seed, cfg.stage)  # e.g. a story run's tokenizer
        model, opt, step, metrics = self._resume(side) if side else self._fresh()
        wall0 = float(side.get("wall_s", 0.0)) if side else 0.0
        self.eval_s = float(side.get("eval_s", 0.0)) if side else 0.0
        evaluator = make_evaluator(cfg, self.task)
        log = log or (lambda s: None)

        def do_eval(at: int) -> list[dict]:
            te = time.perf_counter()
            rows = evaluator(model, at)
            self.eval_s += time.perf_counter() - te
            for r in rows:
                r["step"] = at
            metrics.extend(rows)
            log(evaluator.line(at, rows))
            return rows

        def reached(rows: list[dict]) -> bool:
            """Whether ``eval.stop_margin`` ends the run at this evaluation."""
            margin = cfg.eval.stop_margin
            if margin is None:
                return False
            row = evaluator.headline(rows)
            if row is None:
                raise ConfigError(f"eval.stop_margin: the evaluation has no O_PT row at the first c_test of "
                                  f"{cfg.eval_family} to stop on")
            self.stopped = {"step": row["step"], "acc": row["acc"], "majority": row["majority"], "margin": margin}
            return row["acc"] >= row["majority"] + margin

        t0 = time.perf_counter()
        if step == 0 and not metrics and reached(do_eval(0)):
            log(f"step 0: {self._stop_line()}")
            return self._save(model, opt, 0, metrics, "done", wall0)
        extra = log_steps(t.steps) if cfg.eval.log_spaced else set()
        start = step
        bar = _Bar(progress, t.steps, step, f"{cfg.stage}")
        model.train()
        status = "running"
        try:
            while step < t.steps:
                loss_value = self.train_step(model, opt, step)
                if not math.isfinite(loss_value):
                    status = "diverged"
                    log(f"step {step}: loss is {loss_value}; stopping (last good checkpoint kept)")
                    break
                step += 1
                bar.update(step, loss_value)
                if step % cfg.eval.every == 0 or step == t.steps or step in cfg.eval.at:
                    stop = reached(do_eval(step))
                    st = "done" if step == t.steps or stop else "running"
                    side = self._save(model, opt, step, metrics, st, wall0 + time.perf_counter() - t0)
                    if stop:
                        log(f"step {step}: {self._stop_line()}")
                        break
                elif step in extra:  # metrics only; redone identically after a resume
                    do_eval(step)
                if stop_after is not None and step - start >= stop_after and step < t.steps:
                    side = self._save(model, opt, step, metrics, "running", wall0 + time.perf_counter() - t0)
                    break
        finally:
            bar.close()
        if status == "diverged":
            side = ck.read_sidecar(self.run_dir) if (self.run_dir / ck.SIDECAR).exists() else {}
            if side:
                side["status"] = "diverged"
                ck.atomic_write_text(self.run_dir / ck.SIDECAR, json.dumps(side, indent=1))
            else:  # diverged before the first checkpoint: nothing on disk to mark
                side = {"status": "diverged", "step": step, "stage": cfg.stage, "metrics": metrics}
        return side


def log_steps(limit: int) -> set[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit``."""
    out, base = set(), 1
    while base <= limit:
        out |= {m * base for m in (1, 2, 5) if m * base <= limit}
        base *= 10
    return out


class _Bar:
    """rich progress bar with ETA (no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, start: int, desc: str):
        self.p = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            self.p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TextColumn("ETA"),
                              TimeRemainingColumn(), transient=False,
                              console=Console(stderr=True))
            self.p.start()
            self.t = self.p.add_task(desc, total=total, completed=start, loss="-")

    def update(self, step: int, loss: float) -> None:
        if self.p is not None:
            self.p.update(self.t, completed=step, loss=f"{loss:.4f}")

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()
