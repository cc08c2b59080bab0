"""Analysis: behavioural evaluation of runs and the Table-5-shaped grid (probing, pruning, attention and
revival arrive with issue 3)."""

from wrapperlab.analysis.evaluate import evaluate_run, load_run, table_grid

__all__ = ["evaluate_run", "load_run", "table_grid"]
