"""Executors and the DAG scheduler: local processes or Ray.

An executor only knows how to start ``plan.execute(payload)`` somewhere and hand back a
``concurrent.futures.Future``; the scheduler (``run_plan``) is written once on top of that:
- ``LocalExecutor(workers, threads)``: a pool of ``workers`` processes (spawned, so each has its own torch
  thread pool), each node running with ``threads`` torch threads; ``workers=1`` runs in this process.
- ``RayExecutor(address, threads)``: each node is a Ray task asking for ``threads`` CPUs; Ray decides where it
  runs. The store's directory must be on a filesystem every Ray node sees (as on any shared-disk cluster).

The scheduler submits every node whose dependencies are complete, up to the executor's slots, and records each
outcome in the store. A failed node is reported and its dependants are skipped; everything else continues.
Rerunning after an interruption reuses every complete node (a run whose sidecar says ``done`` with the planned
id, an analysis whose result file exists) and resumes partial runs from their last checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field

from wrapperlab.experiments.plan import Node, Plan, execute
from wrapperlab.experiments.store import Store


class LocalExecutor:
    name = "local"

    def __init__(self, workers: int = 1, threads: int = 0):
        if workers < 1:
            raise ValueError(f"workers: must be >= 1 (got {workers})")
        self.slots, self.threads = workers, threads
        self._pool = None
        if workers > 1:
            import multiprocessing as mp

            self._pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))

    def submit(self, payload: dict) -> Future:
        if self._pool is not None:
            return self._pool.submit(execute, payload)
        fut: Future = Future()
        try:
            fut.set_result(execute(payload))
        except Exception as e:  # noqa: BLE001 - recorded by the scheduler
            fut.set_exception(e)
        return fut

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """Ray tasks (``pip install wrapperlab[ray]``). ``address``: a running cluster ("auto", "HOST:PORT"), or
    None to start a local Ray instance for this process."""

    name = "ray"

    def __init__(self, address: str | None = None, threads: int = 1, workers: int | None = None):
        try:
            import ray
        except ImportError:
            raise RuntimeError("executor ray: Ray is not installed; pip install 'wrapperlab[ray]'") from None
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        self.threads = max(1, threads)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.slots = workers or max(1, cpus // self.threads)
        self._remote = ray.remote(num_cpus=self.threads, max_retries=0)(execute)

    def submit(self, payload: dict) -> Future:
        return self._remote.remote(payload).future()

    def shutdown(self) -> None:
        if self._started:
            self._ray.shutdown()


@dataclass
class Outcome:
    planned: int = 0
    reused: int = 0
    executed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return {"planned": self.planned, "reused": self.reused, "executed": len(self.executed),
                "failed": len(self.failed), "skipped": len(self.skipped), "wall_s": round(self.wall_s, 1),
                "failures": self.failed}


def run_plan(plan: Plan, executor, store: Store, *, log: Callable[[str], None] | None = None,
             progress: bool = True) -> Outcome:
    """Execute every incomplete node of ``plan`` in dependency order; returns what happened."""
    log = log or (lambda _m: None)
    t0 = time.perf_counter()
    nodes = plan.nodes
    out = Outcome(planned=len(nodes))
    stale = store.reap_stale()
    if stale:
        log(f"{len(stale)} run(s) left 'running' by a process that died are marked interrupted and will resume")
    done: set[str] = set()
    for key, n in nodes.items():
        if n.complete():
            done.add(key)
            _record(store, n, None)
    out.reused = len(done)
    todo = [k for k in nodes if k not in done]
    total = sum(nodes[k].cost for k in todo) or 1.0
    log(f"{len(nodes)} nodes planned ({len(plan.runs())} runs, {len(plan.analyses())} analyses): "
        f"{len(done)} already complete, {len(todo)} to execute on {executor.name} "
        f"({executor.slots} slot{'s' if executor.slots > 1 else ''})")
    level = _bottom_levels(nodes)
    bar = _PlanBar(progress, total)
    running: dict[Future, str] = {}
    failed: set[str] = set()
    spent, busy = 0.0, 0.0  # estimated work finished; worker-seconds it took
    try:
        while todo or running:
            # critical path first: among ready nodes, the one with the most estimated work below it (itself plus
            # its longest chain of dependants) starts first, so pretraining and revival do not wait behind
            # short analyses
            for key in sorted(todo, key=lambda k: -level[k]):
                if len(running) >= executor.slots:
                    break
                n = nodes[key]
                if any(d in failed for d in n.deps):
                    todo.remove(key)
                    failed.add(key)
                    out.skipped.append(key)
                    log(f"skipped {n.label}: a dependency failed")
                    continue
                if all(d in done for d in n.deps):
                    todo.remove(key)
                    if n.kind == "run":
                        store.set_status(n.run_id, "running", run_dir=n.run_dir, stage=n.side["stage"],
                                         label=n.label, config=n.side["config"],
                                         parent_id=nodes[n.deps[0]].run_id if n.deps else None)
                    bar.describe(n.label)
                    running[executor.submit(n.payload)] = key
            if not running:
                continue
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                key = running.pop(fut)
                n = nodes[key]
                spent += n.cost
                try:
                    res = fut.result()
                except Exception as e:  # noqa: BLE001 - one failed node must not stop the grid
                    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                    failed.add(key)
                    out.failed[key] = f"{type(e).__name__}: {msg}"
                    if n.kind == "run":
                        store.index_run(n.run_dir)  # what the last checkpoint holds, if any
                        store.set_status(n.run_id, "failed")
                    log(f"FAILED {n.label}: {type(e).__name__}: {msg}")
                    continue
                if n.kind == "run" and res.get("status") != "done":
                    failed.add(key)
                    out.failed[key] = f"status {res.get('status')}"
                    store.index_run(n.run_dir)
                    log(f"FAILED {n.label}: ended with status {res.get('status')}")
                    continue
                done.add(key)
                out.executed.append(key)
                _record(store, n, res)
                el = time.perf_counter() - t0
                busy += float(res.get("wall_s", 0.0))
                # work per worker-second so far, times the slots: robust to which nodes happened to finish first
                eta = (total - spent) * busy / spent / executor.slots if spent > 0 and busy > 0 else float("nan")
                log(f"[{len(out.executed)}/{len(nodes) - out.reused}] {n.label}: done in {res.get('wall_s', 0):.0f} s "
                    f"(elapsed {el:.0f} s, plan ETA {eta:.0f} s)")
                bar.advance(n.cost)
    finally:
        bar.close()
        if running:  # interrupted: let workers stop with their last checkpoint
            for fut in running:
                fut.cancel()
    out.wall_s = time.perf_counter() - t0
    return out


def _bottom_levels(nodes: dict[str, Node]) -> dict[str, float]:
    """Each node's cost plus the costliest chain of nodes that depend on it (nodes are in topological order)."""
    children: dict[str, list[str]] = {k: [] for k in nodes}
    for k, n in nodes.items():
        for d in n.deps:
            children[d].append(k)
    level: dict[str, float] = {}
    for k in reversed(list(nodes)):
        level[k] = nodes[k].cost + max((level[c] for c in children[k]), default=0.0)
    return level


def _record(store: Store, n: Node, res: dict | None) -> None:
    if n.kind == "run":
        store.index_run(n.run_dir, label=n.label)
        return
    store.add_result(n.run_id, n.group, n.key, n.payload["result"], {"settings": n.payload["settings"]})


class _PlanBar:
    """One progress bar for the whole plan, weighted by each node's estimated cost, with ETA."""

    def __init__(self, enabled: bool, total: float):
        self.p = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.p = Progress(TextColumn("[bold]plan"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                              TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                              TextColumn("{task.fields[now]}"), console=Console(stderr=True))
            self.p.start()
            self.t = self.p.add_task("plan", total=total, now="")

    def describe(self, label: str) -> None:
        if self.p is not None:
            self.p.update(self.t, now=label[:60])

    def advance(self, cost: float) -> None:
        if self.p is not None:
            self.p.advance(self.t, cost)

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()


def make_executor(kind: str, workers: int = 1, threads: int = 0, address: str | None = None):
    if kind == "local":
        return LocalExecutor(workers, threads)
    if kind == "ray":
        return RayExecutor(address, threads or 1, workers if workers > 1 else None)
    raise ValueError(f"executor: unknown {kind!r}; choose local or ray")
