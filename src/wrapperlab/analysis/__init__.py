"""Analysis: behavioural evaluation of runs and the Table-5-shaped grid, probing, pruning, attention maps,
revival by reverse fine-tuning, TinyStories feature probes and the verdict, one module each."""

from wrapperlab.analysis.evaluate import evaluate_run, load_run, table_grid

__all__ = ["evaluate_run", "load_run", "table_grid"]
