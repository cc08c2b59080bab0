"""What every CLI module shares: the consoles, the one-line failure, and a plain table printer."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.table import Table

err = Console(stderr=True, soft_wrap=True)
out = Console(width=None if sys.stdout.isatty() else 240)  # tables stay unwrapped in pipes


class UserError(Exception):
    pass


def _fail(msg: str) -> None:
    """Exit 2 with one line on stderr naming what is wrong."""
    print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
    raise typer.Exit(2)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's user-facing errors (bad config, spec, store, checkpoint or analysis request) into one
    line on stderr and exit code 2."""
    from wrapperlab.analysis.common import AnalysisError
    from wrapperlab.experiments.spec import SpecError
    from wrapperlab.experiments.store import StoreError
    from wrapperlab.tasks.stories import StoriesError
    from wrapperlab.tasks.tokenizer import TokenizerError
    from wrapperlab.training.checkpoint import CheckpointError
    from wrapperlab.training.config import ConfigError
    from wrapperlab.training.story_judge import JudgeError

    try:
        yield
    except (AnalysisError, CheckpointError, ConfigError, SpecError, StoreError, StoriesError, TokenizerError,
            JudgeError) as e:
        _fail(str(e))


def print_rows(rows: list[dict], columns: dict[str, str], title: str = "") -> None:
    """A rich table of ``rows``; ``columns`` maps row keys to headers. Floats in [0, 1] named acc/majority/mass
    are shown as percentages."""
    t = Table(title=title or None, title_justify="left")
    for header in columns.values():
        t.add_column(header)
    for r in rows:
        cells = []
        for key in columns:
            v = r.get(key)
            if v is None:
                cells.append("—")
            elif isinstance(v, float) and key in ("acc", "majority", "acc_k0", "acc_best", "final_acc",
                                                   "start_acc", "target", "change"):
                cells.append(f"{100 * v:.1f}")
            elif isinstance(v, float):
                cells.append(f"{v:.4g}")
            else:
                cells.append(str(v))
        t.add_row(*cells)
    out.print(t)
