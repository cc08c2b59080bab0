"""An experiment as data: YAML -> typed ``ExperimentSpec``.

A spec names groups of runs and the analyses to run on them::

    name: low-prior-wrapper
    runs:
      pt:                      # a group name, used by children as their parent
        stage: pretrain
        preset: cpu
        set: {prior: low}      # key=value overrides, exactly as on the command line (dotted paths or short names)
        grid: {seed: [0, 1]}   # one run per combination (the cartesian product of every list)
      ft:
        stage: finetune
        parent: pt             # one child group per parent run: 2 seeds x 3 LRs x 2 c_train = 12 runs
        grid: {lr: [L, M, S], c_train: [0, 1]}
      reft:
        stage: reft
        parent: ft
        where: {c_train: 1}    # only below parents whose grid point matches
    analyses:
      - {tool: prune, on: ft, where: {lr: S}}
      - {tool: verdict, on: ft, where: {lr: S}}

``seeds: [0, 1, 2]`` replicates the whole experiment: every root group (one without a parent) gets that seed
axis, and every run derived from a seeded run inherits its seed (fine-tunes, reFT, revival baselines), so each
seed is an independent replicate with its own baselines.

Grid and ``where`` keys are override keys (``lr``, ``c_train``, ``task.prior``, ``train.steps`` ...), so priors,
learning rates, c_train, pretraining length and seeds are all grid axes. ``where`` matches a parent's grid
point (its own keys and its ancestors'), comparing values as the override parser reads them. A bad spec fails
before anything runs, with one line naming the field (``SpecError``).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from wrapperlab.analysis.registry import get_analysis
from wrapperlab.training.config import SHORTCUTS, parse_value
from wrapperlab.training.presets import PRESETS, STAGES


class SpecError(ValueError):
    """A problem with an experiment spec, reported as one line naming the field."""


def _canon(key: str) -> str:
    return SHORTCUTS.get(key, key)


def _scalar(v: Any) -> Any:
    return parse_value(v) if isinstance(v, str) else v


class RunGroup(BaseModel):
    """Runs of one stage: ``set`` applied to all, one run per point of ``grid`` (per parent run)."""

    model_config = ConfigDict(extra="forbid")

    stage: Literal["pretrain", "finetune", "reft", "scratch", "scratch+ft"]
    preset: str = "cpu"
    parent: str | None = Field(None, description="name of the group whose runs are this group's parents")
    where: dict[str, Any] = Field(default_factory=dict, description="only parents whose grid point matches")
    set: dict[str, Any] = Field(default_factory=dict, description="overrides for every run of the group")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="axis -> values; cartesian product")

    @field_validator("preset")
    @classmethod
    def _preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose from {', '.join(PRESETS)}")
        return v

    @field_validator("grid", mode="before")
    @classmethod
    def _grid(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        out = {}
        for k, vals in v.items():
            vals = vals if isinstance(vals, list) else [vals]
            if not vals:
                raise ValueError(f"grid axis {k!r} has no values")
            out[k] = vals
        return out

    def points(self, seeds: list[int] = ()) -> list[dict[str, Any]]:
        """Every grid point as {canonical key: value}, in the order the YAML lists them (with ``seeds``: each point
        once per seed, seed first)."""
        keys = list(self.grid)
        combos = itertools.product(*(self.grid[k] for k in keys)) if keys else [()]
        points = [{_canon(k): _scalar(v) for k, v in zip(keys, combo)} for combo in combos]
        return [{"train.seed": s, **p} for s in seeds for p in points] if seeds else points


class AnalysisSpec(BaseModel):
    """One analysis on every run of group ``on`` (that matches ``where``)."""

    model_config = ConfigDict(extra="forbid")

    tool: str = Field(description="a registered analysis (wrapperlab.analysis.registry): probe, prune, revival, "
                                  "verdict, attention, attention_signature, feature_probe, story_loss, or one of yours")
    on: str
    where: dict[str, Any] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict, description="the tool's settings (its settings fields)")

    @field_validator("tool")
    @classmethod
    def _tool(cls, v: str) -> str:
        get_analysis(v)  # unknown: one line naming the registered analyses
        return v


class ExperimentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("experiment", min_length=1)
    description: str = ""
    defaults: dict[str, Any] = Field(default_factory=dict, description="overrides applied to every run first")
    seeds: list[int] = Field(default_factory=list, description="replicates: a seed axis on every root group "
                                                               "(derived runs inherit their parent's seed)")
    runs: dict[str, RunGroup]
    analyses: list[AnalysisSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _links(self) -> ExperimentSpec:
        if not self.runs:
            raise ValueError("runs: a spec needs at least one run group")
        if self.seeds:
            if len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
                raise ValueError(f"seeds: distinct non-negative integers, got {self.seeds}")
            if any(_canon(k) == "train.seed" for k in self.defaults):
                raise ValueError("seeds: the defaults set a seed too; give one or the other")
            for name, g in self.runs.items():  # a derived group's own seed would merge the replicates' children
                if any(_canon(k) == "train.seed" for k in (*g.set, *g.grid)):
                    raise ValueError(f"seeds: runs.{name} sets its own seed; give one or the other")
        names = list(self.runs)
        for name, g in self.runs.items():
            if g.parent is not None:
                if g.parent not in self.runs:
                    raise ValueError(f"runs.{name}.parent: no run group named {g.parent!r} (have {', '.join(names)})")
            elif g.where:
                raise ValueError(f"runs.{name}.where: filters parents, but the group has no parent")
        for name in names:  # parent links must not loop
            seen, cur = [name], self.runs[name].parent
            while cur is not None:
                if cur in seen:
                    raise ValueError(f"runs.{name}.parent: the parent links loop ({' -> '.join(seen + [cur])})")
                seen.append(cur)
                cur = self.runs[cur].parent
        for i, a in enumerate(self.analyses):
            if a.on not in self.runs:
                raise ValueError(f"analyses.{i}.on: no run group named {a.on!r} (have {', '.join(names)})")
            tool = get_analysis(a.tool)
            if tool.on_run is None:
                raise ValueError(f"analyses.{i}.tool: {a.tool} runs on a model pair and a capability file "
                                 f"(wrapperlab analyze {a.tool.replace('_', '-')} --base … --finetuned … "
                                 f"--capability …), not on a run of a grid")
            if tool.stages and self.runs[a.on].stage not in tool.stages:
                raise ValueError(f"analyses.{i}.on: {a.tool} needs a {' or '.join(tool.stages)} group, {a.on!r} is "
                                 f"{self.runs[a.on].stage}")
        return self


def group_order(spec: ExperimentSpec) -> list[str]:
    """Group names with every parent before its children (YAML order otherwise)."""
    out: list[str] = []

    def visit(name: str) -> None:
        if name in out:
            return
        parent = spec.runs[name].parent
        if parent is not None:
            visit(parent)
        out.append(name)

    for name in spec.runs:
        visit(name)
    return out


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{loc or 'spec'}: {msg}{shown}"


def parse_spec(data: Any, source: str = "spec") -> ExperimentSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: an experiment spec must be a mapping at the top level")
    analyses = data.get("analyses")
    for a in analyses if isinstance(analyses, list) else []:
        if isinstance(a, dict) and True in a and "on" not in a:  # YAML 1.1 reads a bare `on:` key as true
            a["on"] = a.pop(True)
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_first_error(e)) from None


def load_spec(path: str | Path) -> ExperimentSpec:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"spec file {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_spec(data, str(p))


def matches(point: dict[str, Any], where: dict[str, Any]) -> bool:
    """Does a grid point (canonical keys) satisfy a ``where`` filter (keys may be short names)?"""
    for k, v in where.items():
        want = [_scalar(x) for x in v] if isinstance(v, list) else [_scalar(v)]
        if point.get(_canon(k), object()) not in want:
            return False
    return True


__all__ = ["STAGES", "AnalysisSpec", "ExperimentSpec", "RunGroup", "SpecError", "load_spec", "matches",
           "parse_spec"]
