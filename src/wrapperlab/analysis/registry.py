"""Every analysis, registered by name with its settings, behind one call: ``analyze(name, target, **settings)``.

``target`` is a run directory, or a model with its task (``analyze("probe", model, task=task)``). An analysis names
the model components it needs (a model without one fails with one line before any work), the results of other
analyses it combines (``inputs``: the verdict reads probe, prune and revival), the training runs it needs (``runs``:
revival's reFT and baselines, which the experiment planner schedules as nodes of their own) and its cost relative to
its run's training (the planner's ETA). The planner, the CLI and the report dispatch through :data:`ANALYSES`;
adding an analysis is its module plus one :func:`register` call (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wrapperlab.analysis.common import AnalysisError, Result, Settings, need
from wrapperlab.registry import Registry

BUILTIN = ("wrapperlab.analysis.builtin",)


@dataclass
class Context:
    """Where an analysis that trains puts its runs, the results it combines, and how it reports progress."""

    out: Path | None = None  # a directory for the analysis's own runs (revival)
    runs_root: Path | None = None  # a store's runs/ directory: runs go there under their canonical names
    inputs: dict[str, Result] = field(default_factory=dict)
    device: str = "cpu"
    progress: bool = False
    log: Callable[[str], None] = lambda _m: None


@dataclass(frozen=True)
class Analysis:
    name: str
    settings: type[Settings]
    on_run: Callable[[Path, Settings, Context], Result] | None = None
    on_model: Callable[[Any, Any, Settings], Result] | None = None
    needs: tuple[str, ...] = ()  # model components (models.registry): residual, attention, matrices
    inputs: tuple[str, ...] = ()  # analyses whose results on the same run it combines
    cost: float = 0.0  # x the training cost of the run it analyses (for the planner's ETA)
    run_defaults: Callable[[Any, dict], dict] | None = None  # (run config, given settings) -> settings to use
    run_settings: tuple[str, ...] = ()  # names run_defaults reads besides the settings' fields (probe: preset)
    runs: Callable[[Any, Settings], list] | None = None  # (run config, settings) -> the training runs it needs
    stages: tuple[str, ...] = ()  # the run stages it applies to (empty: any)
    # the pair form: (capability.Pair: base, fine-tuned and control models on a capability file, settings, context)
    on_pair: Callable[[Any, Settings, Context], Result] | None = None
    pair_settings: type[Settings] | None = None  # the pair form's settings, when they are not ``settings``
    description: str = ""

    def make_settings(self, given: dict | Settings | None = None, cfg=None, *, pair: bool = False) -> Settings:
        """Validated settings from a dict (unknown names and bad values are one-line ``AnalysisError``s); with the
        run's config, the run-dependent defaults apply first. ``pair``: the pair form's settings."""
        if isinstance(given, Settings):
            return given
        cls = (self.pair_settings or self.settings) if pair else self.settings
        given = dict(given or {})
        if cfg is not None and self.run_defaults is not None:
            given = self.run_defaults(cfg, given)
        unknown = sorted(set(given) - set(cls.model_fields))
        if unknown:
            raise AnalysisError(f"unknown setting(s) {', '.join(unknown)} for {self.name}; known: "
                                f"{', '.join(cls.model_fields)}")
        return cls(**given)

    def setting_names(self) -> list[str]:
        return list(self.settings.model_fields) + list(self.run_settings)


ANALYSES: Registry[Analysis] = Registry("analysis", BUILTIN, AnalysisError, group="wrapperlab.analyses")
register, analyses, get_analysis = ANALYSES.register, ANALYSES.all, ANALYSES.get


def analyze(name: str, target, task=None, *, settings: dict | Settings | None = None, context: Context | None = None,
            inputs: dict[str, Result] | None = None, **kw) -> Result:
    """Run analysis ``name`` on a run (a directory or a loaded ``Run``), or on ``(model, task)`` (a model pair:
    :func:`analyze_pair`). Settings come as a
    dict, a settings object or keyword arguments; every one is validated before any work. ``inputs``: results this
    analysis combines (the verdict's probe, prune and revival)."""
    a = get_analysis(name)
    ctx = context or Context()
    if inputs:
        ctx.inputs = {**ctx.inputs, **inputs}
    given = settings if isinstance(settings, Settings) else {**(settings or {}), **kw}
    if hasattr(target, "path") and hasattr(target, "sidecar"):  # a loaded Run
        target = target.path
    if isinstance(target, (str, Path)):
        if a.on_run is None:
            raise AnalysisError(f"{name} works on a model and its task, not on a run directory")
        run = Path(target)
        if not run.is_dir():
            raise AnalysisError(f"run: {run} is not a run directory")
        from wrapperlab.training import checkpoint as ck
        from wrapperlab.training.config import validate

        try:
            cfg = validate(ck.read_sidecar(run)["config"])
        except ck.CheckpointError as e:
            raise AnalysisError(str(e)) from None
        return a.on_run(run, a.make_settings(given, cfg), ctx)
    if a.on_model is None:
        raise AnalysisError(f"{name} needs a run directory (it reads the run's history or trains from it)")
    if task is None:
        raise AnalysisError(f"{name} on a model needs its task: analyze({name!r}, model, task)")
    for comp in a.needs:
        need(target, comp)
    return a.on_model(target, task, a.make_settings(given))


def analyze_pair(name: str, pair, *, settings: dict | Settings | None = None, context: Context | None = None,
                 **kw) -> Result:
    """Run analysis ``name`` on a :class:`~wrapperlab.analysis.capability.Pair` (base and fine-tuned models, and a
    control when given, measured on one capability file); settings as for :func:`analyze`."""
    a = get_analysis(name)
    if a.on_pair is None:
        have = ", ".join(n for n, x in analyses().items() if x.on_pair is not None)
        raise AnalysisError(f"{name} has no pair form; analyses of a model pair: {have}")
    given = settings if isinstance(settings, Settings) else {**(settings or {}), **kw}
    return a.on_pair(pair, a.make_settings(given, pair=True), context or Context())


def pair_analyses() -> list[str]:
    """The analyses that run on any model pair, in registration order."""
    return [n for n, a in analyses().items() if a.on_pair is not None]


def gather_inputs(name: str, run, out_dir: str | Path, *, skip: tuple[str, ...] = (), defaults: dict | None = None,
                  log: Callable[[str], None] = lambda _m: None) -> dict[str, Result]:
    """The results analysis ``name`` combines, for one run: each input is read from ``out_dir/<input>.json`` when
    present, else computed (with ``defaults[input]`` settings) and saved there. ``skip``: inputs to leave out."""
    out_dir = Path(out_dir)
    inputs: dict[str, Result] = {}
    for dep in get_analysis(name).inputs:
        path = out_dir / f"{dep}.json"
        if dep in skip:
            continue
        if path.is_file():
            inputs[dep] = Result.load(path)
            log(f"{dep}: reusing {path}")
            continue
        log(f"{dep}: computing (default settings) -> {path}")
        inputs[dep] = analyze(dep, run, settings=(defaults or {}).get(dep),
                              context=Context(out=out_dir / dep, log=log))
        inputs[dep].save(path)
    return inputs
