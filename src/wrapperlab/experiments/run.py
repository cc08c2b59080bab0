"""Run an experiment spec: plan it into a store, start the executor, execute what is missing, report the outcome.

Every grid goes through here: ``wrapperlab run`` and ``reproduce``, the Tracr Table 3 grid and the TinyStories
protocol. So each runs on the local pool or on Ray, resumes after an interruption, and takes a seed axis like any
other grid axis.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from wrapperlab.experiments.plan import Plan, build_plan
from wrapperlab.experiments.spec import ExperimentSpec, SpecError


class ExecutorError(ValueError):
    """The executor could not start (an unreachable Ray cluster, Ray not installed): one line."""


def run_spec(spec: ExperimentSpec, out_dir: str | Path, *, workers: int = 1, threads: int = 0,
             executor: str = "local", address: str | None = None, device: str = "cpu", dry_run: bool = False,
             progress: bool = True, log: Callable[[str], None] | None = None,
             extend: Callable[[Plan], None] | None = None) -> tuple[Plan, dict]:
    """Plan ``spec`` into the store ``out_dir``, run what is missing, and return the plan with the outcome (with
    ``dry_run``, the plan and its nodes, nothing written). ``extend`` adds nodes of its own to the plan before it
    runs (model edits and their fine-tunes, say)."""
    if workers < 1:
        raise SpecError(f"--workers: must be >= 1 (got {workers})")
    if threads < 0:
        raise SpecError(f"--threads: must be >= 0 (got {threads})")
    plan = build_plan(spec, out_dir, threads=threads, device=device)
    if extend is not None:
        extend(plan)
    if dry_run:
        rows = [{"kind": n.kind, "label": n.label, "key": n.key, "done": "yes" if n.complete() else "no"}
                for n in plan.nodes.values()]
        return plan, {"dry_run": True, "nodes": rows}
    return plan, execute_plan(plan, out_dir, workers=workers, threads=threads, executor=executor, address=address,
                              progress=progress, log=log)


def execute_plan(plan: Plan, out_dir: str | Path, *, workers: int = 1, threads: int = 0, executor: str = "local",
                 address: str | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> dict:
    """Run what is missing of ``plan`` into the store ``out_dir``; the outcome. The executor starts before the
    store is touched, so an unreachable cluster leaves the store as it was."""
    from wrapperlab.experiments.executors import make_executor, run_plan
    from wrapperlab.experiments.store import Store

    spec = plan.spec
    try:
        ex = make_executor(executor, workers, threads, address)
    except (ValueError, RuntimeError, ConnectionError) as e:
        raise ExecutorError(str(e)) from None
    try:
        store = Store(out_dir)
        store.add_experiment(spec.name, spec.model_dump(mode="json"), list(plan.nodes))
        outcome = run_plan(plan, ex, store, log=log, progress=progress)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM) or failed: end the workers now, without waiting
        ex.abort()
        raise
    finally:
        ex.shutdown()
    return {"store": str(out_dir), **outcome.to_dict()}


def raise_failures(outcome: dict) -> None:
    """One-line ``ExecutorError`` naming the first failed node of an outcome (for commands that then read every
    run: a table cannot be made of runs that failed)."""
    if outcome.get("failed"):
        key, why = next(iter(outcome["failures"].items()))
        raise ExecutorError(f"{outcome['failed']} node(s) failed, first {key}: {why} (the store keeps what finished; "
                            f"rerun to resume)")
