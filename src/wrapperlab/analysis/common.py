"""What every analysis tool shares: the subject it analyses, the tidy result it returns, and run lineage.

Every tool has the same shape: ``tool(model, task, *, <settings>) -> Result`` for the
tools that only read a model (probe, prune, attention), and ``tool(run_dir, *, <settings>) -> Result`` for the
ones that need a run's history (revival, verdict). A ``Result`` is a tidy table (``rows``: a list of flat dicts,
one observation each), named side tables (``tables``), the settings and provenance (``meta``), and arrays too big
for a table (``arrays``, e.g. attention maps; not written to JSON).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from wrapperlab.tasks.families import JAILBREAK_FAMILIES
from wrapperlab.training import checkpoint as ck


class AnalysisError(ValueError):
    """A problem with an analysis request, reported to the user as one line."""


class Settings(BaseModel):
    """An analysis's settings: typed, validated at construction (a bad value is a one-line ``AnalysisError`` naming
    the field), immutable; ``replace(**changes)`` validates again."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"]) or "settings"
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            raise AnalysisError(f"{loc}: {err['msg'].removeprefix('Value error, ')}{shown}") from None

    def check(self):
        return self

    def replace(self, **changes: Any):
        return type(self)(**{**self.model_dump(), **changes})

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def need(model, component: str):
    """The model's named components (``models.registry``), after checking it has ``component``: an analysis calls
    this before any work, so a model without it fails at once with one line ("lstm has no attention pattern")."""
    from wrapperlab.models.registry import ComponentError, require

    try:
        return require(model, component)
    except ComponentError as e:
        raise AnalysisError(str(e)) from None


@dataclass
class Result:
    tool: str
    rows: list[dict]
    meta: dict = field(default_factory=dict)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def where(self, table: str | None = None, **match: Any) -> list[dict]:
        """Rows (of ``rows`` or of a named side table) whose fields equal every ``match`` value."""
        src = self.rows if table is None else self.tables[table]
        return [r for r in src if all(r.get(k) == v for k, v in match.items())]

    def to_dict(self) -> dict:
        return {"tool": self.tool, "meta": self.meta, "rows": self.rows, "tables": self.tables}

    def save(self, path: str | Path) -> Path:
        """Write the JSON form atomically (a reader never sees a half-written file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ck.atomic_write_text(path, json.dumps(self.to_dict(), indent=1, default=_jsonable))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Result:
        try:
            d = json.loads(Path(path).read_text())
            return cls(d["tool"], d["rows"], d.get("meta", {}), d.get("tables", {}))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AnalysisError(f"{path}: not a readable analysis result ({e})") from None


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def locate_parent(child_dir: str | Path, parent: str, parent_id: str | None) -> Path:
    """Find a parent run recorded as ``parent`` (as the user typed it, possibly relative to the directory the
    child was started from): try it as given, then relative to each directory above the child. When the
    parent's run id is known, only a run with that id is accepted."""
    child = Path(child_dir).resolve()
    tried = [Path(parent)] + [a / parent for a in child.parents]
    for cand in tried:
        if (cand / ck.SIDECAR).is_file():
            try:
                side = ck.read_sidecar(cand)
            except ck.CheckpointError:
                continue
            if parent_id is None or side.get("run_id") == parent_id:
                return cand
    raise AnalysisError(f"{child_dir}: cannot find its parent run {parent!r} (looked relative to the current "
                        f"directory and to every directory above the run)")


def lineage(run_dir: str | Path) -> list[tuple[Path, dict]]:
    """The run and its ancestors, newest first, as (run_dir, sidecar) pairs (follows ``parent`` links)."""
    path = Path(run_dir)
    out = [(path, ck.read_sidecar(path))]
    while out[-1][1].get("parent"):
        here, side = out[-1]
        parent = locate_parent(here, side["parent"], side.get("parent_id"))
        out.append((parent, ck.read_sidecar(parent)))
        if len(out) > 32:
            raise AnalysisError(f"{run_dir}: parent chain longer than 32 runs (a loop?)")
    return out


def ancestor(run_dir: str | Path, stage: str) -> Path | None:
    """The nearest run of ``stage`` in the lineage of ``run_dir`` (itself included), or None."""
    for path, side in lineage(run_dir):
        if side.get("stage") == stage:
            return path
    return None


def protocol(cfg: dict) -> str:
    """The appendix protocol a run's config follows: "randft" (trained on wrong answers, paper App. E.4), "pt-mix"
    (pretraining data mixed in, App. E.1), "jailbreak" (pretrained with the jailbreak task tokens, App. E.2), or
    "" (the main protocol). Each protocol's runs are read by its own claim only."""
    if cfg.get("train", {}).get("answer_operand"):
        return "randft"
    if cfg.get("train", {}).get("pt_mix"):
        return "pt-mix"
    return "jailbreak" if any(f in (cfg.get("task", {}).get("families") or {}) for f in JAILBREAK_FAMILIES) else ""


def metric_at(metrics: list[dict], family: str, operand: str, c_test: float, step: int | None = None,
              key: str = "acc") -> float | None:
    """A stored evaluation value at ``step`` (default: the last evaluated step), or None."""
    rows = [r for r in metrics if r["family"] == family and r["operand"] == operand
            and abs(r["c_test"] - c_test) < 1e-9 and (step is None or r["step"] == step)]
    if not rows:
        return None
    return max(rows, key=lambda r: r["step"]).get(key)
