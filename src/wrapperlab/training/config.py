"""Typed run configuration: preset -> YAML file -> ``key=value`` overrides -> validated ``RunConfig``.

Every bad value fails here, before any work, as a ``ConfigError`` whose message is one line naming the field.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from wrapperlab.models.registry import default_family
from wrapperlab.models.registry import families as model_families
from wrapperlab.models.transformer import ModelConfig
from wrapperlab.tasks.families import FAMILIES
from wrapperlab.tasks.registry import get_task_kind, task_kinds
from wrapperlab.tasks.task import TaskConfig
from wrapperlab.training.presets import STAGES, named_lrs, preset_dict, prior_adjustments, stage_task_keys

SHORTCUTS = {
    "lr": "train.lr", "steps": "train.steps", "c_train": "train.c_train", "c_test": "eval.c_test",
    "prior": "task.prior", "seed": "train.seed", "batch_size": "train.batch_size", "loss": "train.loss",
    "family": "train.family", "operand": "train.operand", "window": "task.window",
}


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(96, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.1, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_frac: float = Field(0.2, ge=0, le=1)
    warmup_steps: int | None = Field(None, ge=0, description="overrides warmup_frac")
    min_lr_frac: float = Field(0.0, ge=0, le=1)
    schedule: Literal["cosine", "constant", "cosine-whole"] = Field(
        "cosine", description="cosine: warmup then cosine to min_lr_frac; constant: warmup then flat; cosine-whole: "
                              "the warmup ramp times one cosine over the whole run (the TinyStories stages')")
    loss: Literal["lm", "answer", "masked"] = Field(
        "answer", description="lm: next-token loss; answer: the answer class at the readout; masked: next-token loss "
                              "on the positions the batch marks (a capability file's answer tokens)")
    grad_clip: float | None = Field(1.0, gt=0)
    family: str | None = Field(None, description="None = the pretraining family mix")
    operand: str | None = Field(None, description="None = drawn from the operand prior")
    c_train: float = Field(0.0, ge=0, le=1)
    answer_operand: str | None = Field(None, description="randFT (paper App. E.4): train on the answer for this "
                                                         "operand, not for the operand the input asks about (a "
                                                         "deliberately wrong answer)")
    pt_mix: float = Field(0.0, ge=0, le=1, description="fine-tuning with pretraining data mixed in (paper App. E.1): "
                                                       "each sample of a batch is drawn with this probability from "
                                                       "the parent's own pretraining data (its family or family "
                                                       "mix, the operand prior, no spurious edit)")
    seed: int = Field(0, ge=0)
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16 = bf16 autocast for the training step's forward and backward (weights, "
                            "optimizer and evaluation stay fp32); see docs/speed.md")
    method: Literal["full", "lora"] = Field(
        "full", description="full: every weight trains; lora: low-rank adapters on lora_targets, the rest frozen")
    lora_rank: int = Field(8, ge=1, description="LoRA rank r")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA scale numerator (ΔW = alpha/r · B A); default r")
    lora_targets: tuple[str, ...] = Field((), description="matrices adapted by LoRA, by the family's matrix names "
                                                          "(attn.qkv, mlp.fc, attn.wq ...); () = its default set")
    # family and operand are checked against the task in RunConfig (PCFG and Tracr tasks differ)

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else int(round(self.warmup_frac * self.steps))


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    every: int = Field(100, ge=1, description="evaluate (and checkpoint) every N steps")
    n: int = Field(1000, ge=1, description="samples per evaluation set")
    c_test: list[float] = Field(default_factory=lambda: [0.0, 1.0])
    family: str | None = Field(None, description="family of the O_PT/O_FT columns (default: the stage's)")
    all_families: bool | None = Field(None, description="also report every family (default: pretrain only)")
    seed: int = Field(12345, ge=0)
    log_spaced: bool = Field(False, description="also evaluate (without checkpointing) at steps 1, 2, 5, 10, 20, "
                                                "50, ... for curves on a log step axis")
    at: list[int] = Field(default_factory=list, description="extra evaluation (and checkpoint) steps, e.g. the reFT "
                                                          "columns of the paper's Table 1")
    stop_margin: float | None = Field(
        None, gt=0, le=1, description="finish the run at the first evaluation whose headline accuracy (O_PT of the "
                                      "stage's family at the first c_test) reaches its majority rate plus this "
                                      "margin: a model stopped at an accuracy rather than a step (the LR schedule "
                                      "still spans train.steps)")

    @field_validator("c_test", mode="before")
    @classmethod
    def _c_test(cls, v: Any) -> list[float]:
        vals = v if isinstance(v, (list, tuple)) else [v]
        out = []
        for x in vals:
            if isinstance(x, bool) or not isinstance(x, (int, float, str)):
                raise ValueError(f"c_test values must be numbers in [0, 1], got {x!r}")
            try:
                x = float(x)
            except ValueError:
                raise ValueError(f"c_test values must be numbers in [0, 1], got {x!r}") from None
            if not 0.0 <= x <= 1.0:
                raise ValueError(f"c_test values must be in [0, 1], got {x}")
            out.append(x)
        return out

    # family is checked against the task in RunConfig


def _task_kind(v: Any) -> str:
    return (v.get("kind") if isinstance(v, dict) else getattr(v, "kind", None)) or "pcfg"


# every registered task kind's config, told apart by ``task.kind``
TaskSpec = Annotated[Union[tuple(Annotated[k.config, Tag(name)] for name, k in task_kinds().items())],  # noqa: UP007
                     Discriminator(_task_kind)]


def _model_family(v: Any) -> str:
    return (v.get("family") if isinstance(v, dict) else getattr(v, "family", None)) or "gpt"


# every registered model family's config, told apart by ``model.family``
ModelSpec = Annotated[Union[tuple(Annotated[f.config, Tag(name)] for name, f in model_families().items())],  # noqa: UP007
                      Discriminator(_model_family)]


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: Literal["pretrain", "finetune", "reft", "scratch", "scratch+ft"]
    preset: str = "cpu"
    task: TaskSpec = Field(default_factory=TaskConfig)
    model: ModelSpec = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    parent: str | None = Field(None, description="run directory this stage starts from")
    init: str | None = Field(None, description="a finished run directory whose weights a parentless stage starts "
                                               "from (its model section must match), e.g. relearning on a capability "
                                               "file")
    device: str = "cpu"
    threads: int = Field(0, ge=0, description="torch threads; 0 = torch's default")

    @field_validator("init")
    @classmethod
    def _init(cls, v: str | None) -> str | None:
        return str(Path(v).resolve()) if v else v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "cpu" and not v.startswith("cuda"):
            raise ValueError(f"device must be cpu or cuda[:N], got {v!r}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_family(cls, data: Any) -> Any:
        """A config that names no model family gets its task kind's default (gpt; tracr for Tracr tasks)."""
        if isinstance(data, dict) and isinstance(data.get("model"), dict) and not data["model"].get("family"):
            data = {**data, "model": {**data["model"], "family": default_family(_task_kind(data.get("task") or {}))}}
        return data

    @property
    def is_tracr(self) -> bool:
        return self.task.kind == "tracr"

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        bad = [s for s in self.eval.at if not 0 < s <= self.train.steps]
        if bad:
            raise ValueError(f"eval.at: steps must be in 1..train.steps={self.train.steps} (got {bad[0]})")
        if self.train.answer_operand is not None and not get_task_kind(self.task.kind).wrong_answers:
            raise ValueError(f"train.answer_operand: a {self.task.kind} task cannot train on another operand's "
                             f"answers (randFT is defined for PCFG tasks)")
        if self.train.pt_mix and not get_task_kind(self.task.kind).pt_mix:
            raise ValueError(f"train.pt_mix: a {self.task.kind} task has no pretraining distribution to mix in "
                             f"(App. E.1 is defined for PCFG tasks)")
        if self.init and self.parent:
            raise ValueError("init: a stage starts from its parent or from init, not both")
        if self.eval.stop_margin is not None:
            from wrapperlab.training.evaluation import evaluator_class

            if not evaluator_class(self.task.kind).stoppable:
                raise ValueError(f"eval.stop_margin: a {self.task.kind} task's evaluation has no accuracy to stop on")
        get_task_kind(self.task.kind).check_run(self.stage, self.parent, self.train, self.eval, self.task)
        if self.train.method == "lora" and self.stage in ("pretrain", "scratch"):
            raise ValueError(f"train.method: lora adapts a trained model; a {self.stage} run trains from scratch "
                             f"(use it on finetune, reft or scratch+ft)")
        return self

    # identity: everything that changes the result (not device/threads, and not where the parent lives: the
    # parent enters the run id through its own run id, so a moved or shared parent keeps its children's ids)
    def identity(self) -> dict:
        d = self.model_dump(mode="json")
        d.pop("device")
        d.pop("threads")
        d.pop("parent")
        if d["init"] is None:
            d.pop("init")
        # fields added later are left out at their defaults, so earlier run ids stay valid
        if not d["eval"]["log_spaced"]:
            d["eval"].pop("log_spaced")
        if not d["eval"]["at"]:
            d["eval"].pop("at")
        if d["eval"]["stop_margin"] is None:
            d["eval"].pop("stop_margin")
        if d["task"].get("kind") == "pcfg":
            d["task"].pop("kind")
        if d["train"].get("precision") == "fp32":
            d["train"].pop("precision")
        if d["train"]["answer_operand"] is None:
            d["train"].pop("answer_operand")
        if not d["train"]["pt_mix"]:
            d["train"].pop("pt_mix")
        if d["train"]["method"] == "full":
            for k in ("method", "lora_rank", "lora_alpha", "lora_targets"):
                d["train"].pop(k)
        if d["model"].get("d_vocab_out") is None:
            d["model"].pop("d_vocab_out", None)
        if d["model"]["family"] == default_family(self.task.kind):
            d["model"].pop("family")
        return d

    def run_id(self, parent_id: str | None = None) -> str:
        blob = json.dumps({"config": self.identity(), "parent": parent_id}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def eval_family(self) -> str:
        return self.eval.family or self.train.family or get_task_kind(self.task.kind).default_family(self.task)

    @property
    def report_all_families(self) -> bool:
        return self.eval.all_families if self.eval.all_families is not None else self.stage == "pretrain"


# ----------------------------------------------------------------------------- building a config
def parse_value(text: str) -> Any:
    """Parse an override value: numbers (1e-5 included), booleans, null, lists, or a plain string."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(v, list):
        return [parse_value(str(x)) if isinstance(x, str) else x for x in v]
    return v


def set_path(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: {k} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def deep_merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(items: list[str]) -> dict:
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. lr=1e-5, task.window=64)")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        set_path(out, SHORTCUTS.get(key, key), parse_value(raw.strip()))
    return out


def parse_overrides_as_values(items: list[str]) -> dict[str, Any]:
    """``key=value`` items as data ({key as given: parsed value}), for ``build_config(values=...)`` and specs."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value (e.g. lr=1e-5, task.window=64)")
        out[key.strip()] = parse_value(raw.strip())
    return out


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        name = f"{prefix}{k}"
        keys.extend(_flat_keys(v, name + ".") if isinstance(v, dict) and v else [name])
    return keys


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    parts = [str(x) for x in err["loc"] if not str(x).startswith("function-after")]
    if len(parts) > 1 and ((parts[0] == "task" and parts[1] in task_kinds())
                           or (parts[0] == "model" and parts[1] in model_families())):
        del parts[1]  # a union's tag is not a field
    loc = ".".join(parts)
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    if not loc and re.match(r"^[a-z_][a-z0-9_.]*: ", msg):  # a whole-config rule that names its field itself
        return f"{msg}{shown}"
    return f"{loc or 'config'}: {msg}{shown}"


def validate(raw: dict) -> RunConfig:
    """Validate a raw config dict (keys starting with '_' are build_config's bookkeeping and are ignored)."""
    fam = (raw.get("model") or {}).get("family") if isinstance(raw.get("model"), dict) else None
    if fam is not None and fam not in model_families():
        raise ConfigError(f"model.family: unknown model family {fam!r}; choose from {', '.join(model_families())}")
    try:
        return RunConfig.model_validate({k: v for k, v in raw.items() if not str(k).startswith("_")})
    except ValidationError as e:
        raise ConfigError(_first_error(e)) from None


def build_config(stage: str, preset: str = "cpu", file: str | None = None, overrides: list[str] = (),
                 extra: dict | None = None, values: dict | None = None) -> dict:
    """Merge preset, file and overrides into a raw dict (named LRs resolved). Validation is separate because
    the child stages first inherit task/model settings from their parent run. ``values`` are overrides already
    parsed ({dotted key or short name: value}, e.g. from an experiment spec), applied after ``overrides``."""
    if stage not in STAGES:
        raise ConfigError(f"stage: unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    try:
        raw = preset_dict(preset, stage)
    except ValueError as e:
        raise ConfigError(f"preset: {e}") from None
    if file:
        filed = load_yaml(file)
        if filed.get("stage", stage) != stage:
            raise ConfigError(f"stage: file {file!r} is for stage {filed['stage']!r}, not {stage!r}")
        raw = deep_merge(raw, filed)
    user = parse_overrides(list(overrides))
    for key, value in (values or {}).items():
        set_path(user, SHORTCUTS.get(key, key), value)
    raw = deep_merge(raw, user)
    if file:
        user = deep_merge(filed, user)
    explicit = _flat_keys(user)
    raw["_explicit"] = sorted(set(explicit) | set(stage_task_keys(raw.get("preset", preset), stage)))
    adjust = prior_adjustments(raw.get("preset", preset), stage, str(raw.get("task", {}).get("prior", "")))
    for key in _flat_keys(adjust):
        if key not in explicit:
            section, field = key.split(".", 1)
            set_path(raw, key, adjust[section][field])
            raw.setdefault("_notes", []).append(f"{key}={adjust[section][field]} (preset default for this prior)")
    if extra:
        raw = deep_merge(raw, extra)
    fam = model_families().get(str((raw.get("model") or {}).get("family")))
    if fam is not None:  # presets are written for the gpt family: drop what another family has no field for
        for key in [k for k in raw["model"] if k not in fam.config.model_fields and f"model.{k}" not in explicit]:
            raw["model"].pop(key)
    lr = raw.get("train", {}).get("lr")
    if isinstance(lr, str):
        table = named_lrs(raw.get("preset", preset))
        if lr not in table:
            raise ConfigError(f"train.lr: {lr!r} is neither a number nor one of {', '.join(table)}")
        raw["train"]["lr"] = table[lr]
    return raw


__all__ = ["FAMILIES", "ConfigError", "EvalConfig", "RunConfig", "TrainConfig", "build_config", "validate"]
