"""Grid -> DAG of nodes (runs and analyses), and the function that executes one node.

A run node is identified by its run id — the hash of its resolved config plus its parent's run id
(``RunConfig.run_id``) — and lives in ``STORE/runs/<stage>-<run id>``. So a pretraining run shared by a whole
grid is one node, two specs that need the same run share it, and a finished run is reused rather than redone.
Children are resolved before their parents exist: the planner hands ``resolve`` the parent's planned config in
place of its sidecar, and the worker re-resolves against the real parent and checks the id is unchanged.

An analysis node is (tool, settings, run); its result is ``RUN/analysis/<tool>-<settings hash>.json``. A verdict
node depends on the probe / prune / revival nodes the spec plans for the same run. Revival trains its reFT and
baseline runs under the store's ``runs/`` with canonical names, so one Scr.+FT baseline serves every fine-tuned
run with the same task, model and reFT recipe.

``execute(payload)`` is a plain module-level function of plain data, so a process pool or Ray can run it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wrapperlab.analysis.registry import get_analysis
from wrapperlab.experiments.spec import ExperimentSpec, SpecError, group_order, matches
from wrapperlab.training import checkpoint as ck
from wrapperlab.training.config import ConfigError, build_config
from wrapperlab.training.stage import default_run_dir, resolve


@dataclass
class Node:
    key: str  # run id, or "<tool>-<hash>@<run id>"
    kind: str  # "run" | "analysis"
    group: str  # spec group name (run) or tool (analysis)
    label: str
    point: dict[str, Any]  # grid point, ancestors' keys included (nearest wins)
    deps: list[str]
    payload: dict
    cost: float  # estimated work (arbitrary units, for the whole-plan ETA)
    run_id: str = ""
    run_dir: str = ""
    side: dict = field(default_factory=dict)  # planned sidecar stand-in (runs)

    def complete(self) -> bool:
        if self.kind == "analysis":
            return Path(self.payload["result"]).is_file()
        try:
            side = ck.read_sidecar(self.run_dir)
        except ck.CheckpointError:
            return False
        return side.get("status") == "done" and side.get("run_id") == self.run_id


@dataclass
class Plan:
    spec: ExperimentSpec
    root: Path
    nodes: dict[str, Node]  # in a valid execution order (parents first)
    groups: dict[str, list[str]] = field(default_factory=dict)  # spec group -> its run keys (a run two groups
    # reach alike is one node, listed under both)

    def runs(self, group: str | None = None) -> list[Node]:
        return [n for n in self.nodes.values() if n.kind == "run" and (group is None or n.group == group)]

    def analyses(self, tool: str | None = None) -> list[Node]:
        return [n for n in self.nodes.values() if n.kind == "analysis" and (tool is None or n.group == tool)]


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


@functools.lru_cache(maxsize=256)
def _n_params(model_json: str) -> int:
    """Parameters of a model config of any family (built on the meta device: no memory, no init)."""
    import torch

    from wrapperlab.models.registry import get_family

    d = json.loads(model_json)
    fam = get_family(d["family"])
    with torch.device("meta"):
        model = fam.build(fam.config.model_validate(d), max(d.get("vocab_size") or 0, 1), max(d.get("seq_len") or 0, 1))
    return sum(p.numel() for p in model.parameters())


def _run_cost(cfg) -> float:
    """~FLOPs of training and evaluation, in units of 1e9 (6 N tokens for a step, 2 N tokens per eval sample)."""
    m = cfg.model
    n_params = _n_params(json.dumps(m.model_dump(mode="json"), sort_keys=True))
    seq = cfg.task.seq_len  # every task config knows its sequence length
    train = 6 * n_params * cfg.train.steps * cfg.train.batch_size * seq
    n_evals = cfg.train.steps // cfg.eval.every + 1
    n_sets = 2 * len(cfg.eval.c_test) * (5 if cfg.report_all_families else 1)
    # checked against the quick preset on this CPU (1 thread): PCFG fine-tune 8.4K units in 148 s, pretraining
    # 12.2K in 206-267 s, Tracr Counter 4.6K in 84-125 s
    return (train + 2 * n_params * n_evals * n_sets * cfg.eval.n * seq) / 1e9




def build_plan(spec: ExperimentSpec, root: str | Path, *, threads: int = 0, device: str = "cpu") -> Plan:
    """Expand every group's grid below every matching parent run, resolve each config (every error surfaces
    here, before anything trains), and add the analyses."""
    root = Path(root).resolve()
    runs_dir = root / "runs"
    nodes: dict[str, Node] = {}
    by_group: dict[str, list[str]] = {}
    for name in group_order(spec):
        g = spec.runs[name]
        parents = [None] if g.parent is None else [nodes[k] for k in by_group[g.parent]
                                                    if matches(nodes[k].point, g.where)]
        if g.parent is not None and not parents:
            raise SpecError(f"runs.{name}.where: no run of group {g.parent!r} matches {g.where}")
        keys = by_group.setdefault(name, [])
        for pnode in parents:
            for point in g.points(spec.seeds if g.parent is None else ()):
                values = {**_defaults_for(spec.defaults, pnode), **g.set, **point}
                values.setdefault("threads", threads)
                values.setdefault("device", device)
                if pnode is not None:
                    values["parent"] = pnode.run_dir
                try:
                    raw = build_config(g.stage, g.preset, values=values)
                    cfg, _ = resolve(raw, parent_side=pnode.side if pnode else None)
                except ConfigError as e:
                    where = f" (grid point {point})" if point else ""
                    raise SpecError(f"runs.{name}{where}: {e}") from None
                rid = cfg.run_id(pnode.run_id if pnode else None)
                run_dir = default_run_dir(cfg, pnode.run_id if pnode else None, runs_dir)
                full_point = {**(pnode.point if pnode else {}), **point}
                desc = " ".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())
                label = f"{name}{' ' + desc if desc else ''}" + (f" <- {pnode.label}" if pnode else "")
                if rid in nodes:  # the same run reached twice (e.g. a grid axis that changes nothing)
                    if rid not in keys:
                        keys.append(rid)
                    continue
                raw.pop("_notes", None)  # _explicit stays: the worker re-resolves against the real parent with it
                nodes[rid] = Node(rid, "run", name, label, full_point, [pnode.key] if pnode else [],
                                  {"kind": "run", "raw": raw, "run_dir": str(run_dir), "run_id": rid},
                                  _run_cost(cfg), rid, str(run_dir),
                                  {"config": cfg.model_dump(mode="json"), "run_id": rid, "stage": cfg.stage,
                                   "status": "done"})
                keys.append(rid)
    planned: dict[tuple[str, str], str] = {}  # (tool, run id) -> analysis node key, for verdicts
    for i, a in enumerate(spec.analyses):
        targets = [nodes[k] for k in by_group[a.on] if matches(nodes[k].point, a.where)]
        if not targets:
            raise SpecError(f"analyses.{i}.where: no run of group {a.on!r} matches {a.where}")
        tool = get_analysis(a.tool)
        _check_settings(tool, a.settings, f"analyses.{i}.settings")
        h = settings_hash(a.settings)
        for run in targets:
            settings = _settings_for(tool, a.settings, run, f"analyses.{i}.settings")
            key = f"{a.tool}-{h}@{run.run_id}"
            deps = [run.key]
            inputs = {}
            for name in tool.inputs:  # results of other analyses on the same run that this one combines
                if (name, run.run_id) in planned:
                    k = planned[(name, run.run_id)]
                    deps.append(k)
                    inputs[name] = nodes[k].payload["result"]
            h_run = h
            if tool.runs is not None:  # the training runs it needs become nodes of their own
                trained = _training_nodes(nodes, run, tool, settings, runs_dir, f"analyses.{i}")
                deps += trained
                # the result names the runs it read, so a result computed from other runs is never reused for it
                h_run = settings_hash({"settings": a.settings, "runs": trained})
                key = f"{a.tool}-{h_run}@{run.run_id}"
            result = Path(run.run_dir) / "analysis" / f"{a.tool}-{h_run}.json"
            cost = run.cost * tool.cost
            nodes[key] = Node(key, "analysis", a.tool, f"{a.tool} on {run.label}", run.point, deps,
                              {"kind": "analysis", "tool": a.tool, "settings": a.settings, "run_dir": run.run_dir,
                               "run_id": run.run_id, "result": str(result), "inputs": inputs,
                               "runs_root": str(runs_dir), "threads": threads}, cost, run.run_id, run.run_dir)
            planned[(a.tool, run.run_id)] = key
    return Plan(spec, root, nodes, by_group)


def _training_nodes(nodes: dict[str, Node], ft: Node, tool, settings, runs_dir: Path, where: str) -> list[str]:
    """The runs an analysis trains (revival: reFT and its baselines, ``analysis.revival.revival_runs``) as nodes of
    their own, so they run in parallel with the rest of the grid and identical ones (one Scr.+FT baseline for many
    fine-tuned runs) are trained once. Returns their keys; the analysis node then only reads them."""
    from wrapperlab.analysis.common import AnalysisError
    from wrapperlab.training.config import validate

    try:
        runs = tool.runs(validate(ft.side["config"]), settings)
    except AnalysisError as e:
        raise SpecError(f"{where}.settings: {e}") from None
    planned = {"ft": ft}
    keys = []
    for r in runs:
        parent = planned[r.parent] if r.parent else None
        try:
            raw = r.raw(parent.run_dir if parent else None)
            cfg_r, _ = resolve(raw, parent_side=parent.side if parent else None)
        except ConfigError as e:
            raise SpecError(f"{where} ({r.name} of {tool.name} on {ft.label}): {e}") from None
        rid = cfg_r.run_id(parent.run_id if parent else None)
        if rid not in nodes:
            raw.pop("_notes", None)  # _explicit stays: the worker re-resolves against the real parent with it
            run_dir = default_run_dir(cfg_r, parent.run_id if parent else None, runs_dir)
            nodes[rid] = Node(rid, "run", f"{tool.name}:{r.name}", f"{tool.name} {r.name} <- {ft.label}",
                              dict(ft.point), [parent.key] if parent else [],
                              {"kind": "run", "raw": raw, "run_dir": str(run_dir), "run_id": rid},
                              _run_cost(cfg_r), rid, str(run_dir),
                              {"config": cfg_r.model_dump(mode="json"), "run_id": rid, "stage": cfg_r.stage,
                               "status": "done"})
        planned[r.name] = nodes[rid]
        keys.append(rid)
    return keys


def _defaults_for(defaults: dict, parent: Node | None) -> dict:
    """A spec's defaults for one run. A child inherits its parent's model and task shape, so the model keys and
    the task keys it may not change (its task kind's ``inherited_keys``) apply to root groups only."""
    from wrapperlab.tasks.registry import get_task_kind
    from wrapperlab.training.config import SHORTCUTS

    if parent is None:
        return dict(defaults)
    inherited = get_task_kind(parent.side["config"]["task"].get("kind", "pcfg")).inherited_keys
    out = {}
    for k, v in defaults.items():
        path = SHORTCUTS.get(k, k)
        section, _, rest = path.partition(".")
        if section == "model" or (section == "task" and rest.split(".")[0] not in inherited):
            continue
        out[k] = v
    return out


def _check_settings(tool, settings: dict, where: str) -> None:
    bad = sorted(set(settings) - set(tool.setting_names()))
    if bad:
        raise SpecError(f"{where}: unknown setting(s) {', '.join(bad)} for {tool.name}; known: "
                        f"{', '.join(sorted(tool.setting_names()))}")


def _settings_for(tool, settings: dict, run: Node, where: str):
    """The tool's validated settings for a planned run, so a bad value fails at planning, not after hours."""
    from wrapperlab.analysis.common import AnalysisError
    from wrapperlab.training.config import validate

    try:
        return tool.make_settings(_lists_as_tuples(settings), validate(run.side["config"]))
    except AnalysisError as e:
        raise SpecError(f"{where}: {e}") from None


def _lists_as_tuples(settings: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}


# ----------------------------------------------------------------------------- executing one node
def execute(payload: dict) -> dict:
    """Run one node to completion (resuming a run from its last checkpoint). Returns a small summary:
    {status, wall_s, pid, ...}. Raises on failure; the scheduler records it."""
    t0 = time.perf_counter()
    out = EXECUTE[payload["kind"]](payload)
    out.update(wall_s=round(time.perf_counter() - t0, 2), pid=os.getpid())
    return out


def _execute_run(p: dict) -> dict:
    from wrapperlab.training.stage import Stage

    cfg, parent = resolve(dict(p["raw"]))
    rid = cfg.run_id(parent["run_id"] if parent else None)
    if rid != p["run_id"]:
        raise RuntimeError(f"run id changed between planning ({p['run_id']}) and execution ({rid})")
    side = Stage(cfg, parent, p["run_dir"]).run(progress=False)
    return {"status": side.get("status"), "step": side.get("step")}


def _execute_call(p: dict) -> dict:
    """A node that is a function of its payload (``target``: "module:function"), imported in the worker: the model
    edits and pair measures of ``experiments/organisms.py``."""
    import importlib

    module, _, name = p["target"].partition(":")
    return getattr(importlib.import_module(module), name)(p)


def _execute_analysis(p: dict) -> dict:
    import torch

    from wrapperlab.analysis.common import Result
    from wrapperlab.analysis.registry import Context, analyze
    from wrapperlab.fileio import remove_stale_temps

    if p.get("threads"):
        torch.set_num_threads(p["threads"])
    ctx = Context(out=Path(p["result"]).with_suffix(""), runs_root=Path(p["runs_root"]),
                  inputs={k: Result.load(v) for k, v in p["inputs"].items()})
    res = analyze(p["tool"], p["run_dir"], settings=_lists_as_tuples(p["settings"]), context=ctx)
    remove_stale_temps(Path(p["result"]).parent)  # left by an analysis killed mid-write
    res.save(p["result"])
    return {"status": "done", "result": p["result"]}


EXECUTE = {"run": _execute_run, "analysis": _execute_analysis, "call": _execute_call}
