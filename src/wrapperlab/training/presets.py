"""Presets: ``paper`` (the paper's scale, exactly as the paper states it) and ``cpu`` (this 2-core machine).

paper (paper App. B.2, C.2): window 250, O' = 40 (count, count-composition, token-value) and 6 (index families),
minGPT 6 layers x 6 heads x d 192; pretraining AdamW 1e-3, 20 % warmup + cosine, full next-token loss, 200K
steps (batch size, betas and weight decay are not given: we use batch 96, betas (0.9, 0.95), weight decay 0.1 —
minGPT's defaults); fine-tuning AdamW, batch 96, 10K steps, 20 % warmup, cosine to max/100, eta_L/M/S =
1e-4/1e-5/1e-6; reFT the same recipe at a smaller LR (eta_S by default).

cpu: chosen by measurement on this machine (docs/calibration.md): window 64; O' = 16 for the count-like
families, 6 for index-of-occurrence and 2 for index-of-composition (at window 64 the doubled operand 'aa'
almost never occurs 6 times, so O' = 6 makes every answer 0 — a 100 % majority class; O' = 2 gives 27 %; at the
paper's window 250, O' = 6 is fine: 8 %); a 0.36M-parameter model (d 96, 3 layers, 4 heads); AdamW 1e-3
(3e-3 stalled at the majority rate). Pretraining uses the answer-only loss: the paper's full next-token loss is
one override away (``train.loss=lm``) but learns the answer more slowly at this size (docs/calibration.md).
Fine-tuning runs 500 steps instead of 10K, so the named LRs are scaled to keep LR x steps (the total distance
Adam can move a weight) equal to the paper's: eta_X(cpu) = eta_X(paper) x 10000 / 500.

A learning rate may be given by name (``lr=L``, ``lr=M``, ``lr=S``, ``lr=VS``); the preset resolves it.
"""

from __future__ import annotations

import copy

STAGES = ("pretrain", "finetune", "reft", "scratch", "scratch+ft")

_FT_COMMON = {"family": "count", "c_train": 0.0, "loss": "answer", "warmup_frac": 0.2, "min_lr_frac": 0.01}

PAPER = {
    "lrs": {"L": 1e-4, "M": 1e-5, "S": 1e-6, "VS": 1e-7},
    "task": {"window": 250},
    "model": {"d_model": 192, "n_layer": 6, "n_head": 6},
    "eval": {"every": 1000, "n": 2000},
    "stages": {
        "pretrain": {"train": {"steps": 200_000, "batch_size": 96, "lr": 1e-3, "loss": "lm",
                               "warmup_frac": 0.2, "min_lr_frac": 0.0}},
        "finetune": {"train": {**_FT_COMMON, "steps": 10_000, "batch_size": 96, "lr": "M"}},
        "reft": {"train": {**_FT_COMMON, "steps": 10_000, "batch_size": 96, "lr": "S"}},
        "scratch": {"train": {"family": "count", "loss": "answer", "steps": 10_000, "batch_size": 96,
                              "lr": 1e-3, "warmup_frac": 0.2, "min_lr_frac": 0.0}},
        "scratch+ft": {"train": {**_FT_COMMON, "steps": 10_000, "batch_size": 96, "lr": "M"}},
    },
}

# bf16 autocast for every paper-scale stage (docs/speed.md): 1.7-1.8x the fp32 step on this CPU's AMX at the paper's
# shape, and the native fast path of the GPUs the paper preset is meant for; weights, optimizer state and
# evaluation stay fp32. tests/test_speed.py checks that trained accuracy holds under it. The cpu preset stays
# fp32: at its d = 96 shape bf16 measured slower (0.56x) on this CPU.
for _stage in PAPER["stages"].values():
    _stage["train"]["precision"] = "bf16"

_CPU_FT_STEPS = 500
_scale = 10_000 / _CPU_FT_STEPS
CPU = {
    "lrs": {k: v * _scale for k, v in PAPER["lrs"].items()},
    "task": {"window": 64, "o2": {"count": 16, "count-composition": 16, "token-value": 16,
                                  "index-of-occurrence": 6, "index-of-composition": 2}},
    "model": {"d_model": 96, "n_layer": 3, "n_head": 4},
    "eval": {"every": 50, "n": 500},
    "stages": {
        "pretrain": {"eval": {"every": 250}, "train": {"steps": 4500, "batch_size": 64, "lr": 1e-3, "loss": "answer",
                               "warmup_frac": 0.05, "min_lr_frac": 0.0}},
        "finetune": {"train": {**_FT_COMMON, "steps": _CPU_FT_STEPS, "batch_size": 96, "lr": "M"}},
        "reft": {"train": {**_FT_COMMON, "steps": _CPU_FT_STEPS, "batch_size": 96, "lr": "S"}},
        "scratch": {"train": {"family": "count", "loss": "answer", "steps": 1500, "batch_size": 64,
                              "lr": 3e-3, "warmup_frac": 0.05, "min_lr_frac": 0.0}, "eval": {"every": 50}},
        "scratch+ft": {"train": {**_FT_COMMON, "steps": _CPU_FT_STEPS, "batch_size": 96, "lr": "M"}},
    },
}

# Pretraining under a prior that puts real mass on a second operand must learn operand-conditioned counting
# (route the operand to the answer position, then count matching tokens). At batch 64 the high prior showed no
# transition within 5,000 steps; at batch 128 it appeared between ~1,500 and ~3,000 steps depending on the run
# (a 4000-step schedule decayed the LR before one run finished it; 6000 steps did: docs/calibration.md). Applied unless
# the user sets these keys; measured for "high", applied to "medium" and "medium-high" by the same reasoning.
_TWO_OPERAND = {"train": {"batch_size": 128, "steps": 6000}}
CPU["pretrain_by_prior"] = {"high": _TWO_OPERAND, "medium-high": _TWO_OPERAND, "medium": _TWO_OPERAND}

# Tracr (paper App. C.1): the compiled program is the pretrained model (no pretrain stage; the model shape comes
# from the program). SGD with momentum 0.9 (the paper gives no value), batch 96, 10K steps, 2K warmup then cosine
# to 1e-2 x max, eta_L/M/S/VS = 1e-1/1e-2/1e-3/1e-4. Gradient clipping at 1.0 as for every wrapperlab stage (the
# paper does not say). tracr-cpu keeps the LRs and the warmup fraction and runs 1K steps (docs/tracr.md).
_TRACR_FT = {"optimizer": "sgd", "momentum": 0.9, "batch_size": 96, "c_train": 0.0, "loss": "answer",
             "min_lr_frac": 0.01, "family": None}
TRACR_PAPER = {
    "lrs": {"L": 1e-1, "M": 1e-2, "S": 1e-3, "VS": 1e-4},
    "task": {"kind": "tracr"},
    "model": {},
    "eval": {"every": 1000, "n": 2000},
    "stages": {s: {"train": {**_TRACR_FT, "steps": 10_000, "warmup_steps": 2000, "lr": "M"}} for s in STAGES},
}
TRACR_CPU = {**TRACR_PAPER, "eval": {"every": 500, "n": 1000},
             "stages": {s: {"train": {**_TRACR_FT, "steps": 1000, "warmup_steps": 200, "lr": "M"}} for s in STAGES}}
for _p in (TRACR_PAPER, TRACR_CPU):
    _p["stages"]["reft"]["train"]["lr"] = "VS"

# TinyStories (paper App. F.1), the defaults of the `wrapperlab stories` stage commands: llama2.c's model at CPU size
# (the paper's 91M model is `stories table --preset paper`), LM loss, AdamW; pretraining warms up over 5 % under one
# cosine, deletion (finetune) and reFT run at a constant LR: η_M / η_S = 1e-4 / 1e-5 and reFT 1e-5, as the paper.
_STORY_TRAIN = {"batch_size": 32, "loss": "lm", "warmup_frac": 0.0, "schedule": "constant", "min_lr_frac": 0.0,
                "family": None, "operand": None, "c_train": 0.0}
STORIES = {
    "lrs": {"M": 1e-4, "S": 1e-5},
    "task": {"kind": "story", "vocab_size": 512, "seq_len": 256},
    "model": {"family": "llama", "d_model": 128, "n_layer": 4, "n_head": 4},
    "eval": {"every": 250},
    "stages": {
        "pretrain": {"train": {**_STORY_TRAIN, "steps": 1500, "lr": 1e-3, "warmup_frac": 0.05,
                               "schedule": "cosine-whole"}, "task": {"dataset": "all"}},
        "finetune": {"train": {**_STORY_TRAIN, "steps": 1500, "lr": "M"}, "task": {"dataset": "F"}},
        "reft": {"train": {**_STORY_TRAIN, "steps": 1500, "lr": "S"}, "task": {"dataset": "recovery"}},
    },
}

PRESETS = {"paper": PAPER, "cpu": CPU, "tracr-paper": TRACR_PAPER, "tracr-cpu": TRACR_CPU, "stories": STORIES}


def preset_dict(preset: str, stage: str) -> dict:
    """The preset's nested config for one stage (without the ``lrs`` table)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    p = PRESETS[preset]
    if stage not in p["stages"]:
        raise ValueError(f"the {preset} preset has no {stage} stage (it has {', '.join(p['stages'])})")
    out = {"stage": stage, "preset": preset, "task": copy.deepcopy(p["task"]),
           "model": copy.deepcopy(p["model"]), "eval": copy.deepcopy(p["eval"])}
    for section, values in copy.deepcopy(p["stages"][stage]).items():
        out.setdefault(section, {}).update(values)
    return out


def prior_adjustments(preset: str, stage: str, prior: str) -> dict:
    """Settings a preset changes for pretraining under a given prior (empty if none)."""
    if stage != "pretrain":
        return {}
    return copy.deepcopy(PRESETS.get(preset, {}).get("pretrain_by_prior", {}).get(prior, {}))


def named_lrs(preset: str) -> dict[str, float]:
    return dict(PRESETS[preset]["lrs"])


def stage_task_keys(preset: str, stage: str) -> list[str]:
    """The task keys a preset sets for one stage (a story finetune's dataset): a child stage takes them over its
    parent's task, like the user's own overrides."""
    return [f"task.{k}" for k in PRESETS.get(preset, {}).get("stages", {}).get(stage, {}).get("task", {})]
