"""Analysis: open a run, and every analysis behind one call (``analyze(name, run_or_model, ...)``, or
``analyze_pair(name, pair)`` on two models and a capability file): behavioural
evaluation and the Table 5 grid, probes, pruning, attention maps and signatures, revival, the verdict and the story
feature probes. Each returns a ``Result`` (tidy rows, side tables, settings and provenance)."""

from wrapperlab.analysis.common import AnalysisError, Result
from wrapperlab.analysis.evaluate import evaluate_run, load_run, table_grid
from wrapperlab.analysis.probing import ProbeSettings
from wrapperlab.analysis.pruning import PruneSettings
from wrapperlab.analysis.registry import (
    Analysis,
    Context,
    analyses,
    analyze,
    analyze_pair,
    get_analysis,
    pair_analyses,
    register,
)
from wrapperlab.analysis.revival import RevivalSettings
from wrapperlab.analysis.run import Run
from wrapperlab.analysis.verdict import Thresholds

__all__ = ["Analysis", "AnalysisError", "Context", "ProbeSettings", "PruneSettings", "Result", "RevivalSettings",
           "Run", "Thresholds", "analyses", "analyze", "analyze_pair", "evaluate_run", "get_analysis", "load_run",
           "pair_analyses", "register",
           "table_grid"]
