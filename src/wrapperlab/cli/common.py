"""What every CLI module shares: the consoles, the one-line failure, how Ctrl-C and SIGTERM stop a command, and a
plain table printer."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.table import Table

err = Console(stderr=True, soft_wrap=True)
out = Console(width=None if sys.stdout.isatty() else 240)  # tables stay unwrapped in pipes


class UserError(Exception):
    """What the user must fix: ``cli.main``, the one error handler, prints it as one line and exits 2."""


def _fail(msg: str) -> None:
    """Stop the command: one line on stderr naming what is wrong, exit code 2 (printed by ``cli.main``)."""
    raise UserError(" ".join(str(msg).split()))


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's user-facing errors (bad config, spec, store, checkpoint or analysis request) into one
    line on stderr and exit code 2."""
    from wrapperlab.analysis.common import AnalysisError
    from wrapperlab.experiments.run import ExecutorError
    from wrapperlab.experiments.spec import SpecError
    from wrapperlab.experiments.store import StoreError
    from wrapperlab.models.hf import HFLoadError
    from wrapperlab.tasks.capability import CapabilityError
    from wrapperlab.tasks.stories import StoriesError
    from wrapperlab.tasks.tokenizer import TokenizerError
    from wrapperlab.training.checkpoint import CheckpointError
    from wrapperlab.training.config import ConfigError
    from wrapperlab.training.story_judge import JudgeError

    try:
        yield
    except (AnalysisError, CapabilityError, CheckpointError, ConfigError, ExecutorError, HFLoadError, SpecError,
            StoreError, StoriesError, TokenizerError, JudgeError) as e:
        _fail(str(e))


# ----------------------------------------------------------------------------- stopping
# SIGTERM takes the same path as Ctrl-C: the first SIGINT or SIGTERM raises KeyboardInterrupt wherever the main
# thread is, so every `finally` (worker shutdown, store rows, temporary files) runs once. Further signals while
# that cleanup runs (it is bounded: a few seconds) are ignored, so a second Ctrl-C cannot leave a traceback in the
# middle of it; a third one exits at once. A watchdog makes sure no command outlives the signal by more than
# STOP_DEADLINE_S (a process pool whose `with` block waits for its tasks would otherwise run them all): it ends
# the command's child processes and exits.
STOP_DEADLINE_S = 15.0
_STOP: dict = {"signum": None, "count": 0, "noted": False, "pid": None}


def _on_stop_signal(signum: int, frame) -> None:
    if os.getpid() != _STOP["pid"]:  # a forked worker inherited this handler: behave as Python's defaults
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _STOP["count"] += 1
    if _STOP["signum"] is None:
        _STOP["signum"] = signum
        import threading

        threading.Thread(target=_stop_watchdog, name="wrapperlab-stop-watchdog", daemon=True).start()
        raise KeyboardInterrupt
    if _STOP["count"] >= 3:
        _exit_now("stopped at once; finished work is kept, run the same command again to resume")


def _stop_watchdog() -> None:
    import time

    time.sleep(STOP_DEADLINE_S)
    _exit_now(f"still stopping after {STOP_DEADLINE_S:g} s; ended its child processes")


def _exit_now(msg: str) -> None:
    """End this process's descendants (SIGTERM, then SIGKILL after 1 s) and exit with 128 + the stop signal,
    skipping any cleanup still pending."""
    import time

    kids = _descendants()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in kids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        end = time.monotonic() + 1.0
        while time.monotonic() < end and any(_running(p) for p in kids):
            time.sleep(0.05)
    os.write(2, (" ".join(msg.split()) + "\n").encode())
    os._exit(128 + (_STOP["signum"] or signal.SIGINT))


def _descendants() -> list[int]:
    """Every process below this one (children, their children ...), read from /proc (empty elsewhere)."""
    parent: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for e in entries:
        if e.isdigit():
            try:
                with open(f"/proc/{e}/stat") as f:
                    text = f.read()
                parent[int(e)] = int(text[text.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, frontier = [], [os.getpid()]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
        return text[text.rindex(")") + 2:].split()[0] != "Z"
    except (OSError, ValueError, IndexError):
        return False


def _ignore_late_signals() -> None:
    # Python puts back the default action of handled signals after the atexit functions, and module teardown
    # with torch loaded takes a moment: a second Ctrl-C there would kill the process with SIGINT, not exit 130
    if _STOP["signum"] is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def install_stop_handlers() -> None:
    """Route SIGINT and SIGTERM through ``_on_stop_signal`` (main thread only)."""
    import atexit

    _STOP["pid"] = os.getpid()
    atexit.register(_ignore_late_signals)  # registered first, so it runs after every later atexit function
    signal.signal(signal.SIGINT, _on_stop_signal)
    signal.signal(signal.SIGTERM, _on_stop_signal)


def stop_signal() -> int | None:
    """The signal that is stopping this command (SIGINT, SIGTERM), or None."""
    return _STOP["signum"]


def stop_exit_code() -> int:
    """128 + the signal number: 130 for Ctrl-C (also when KeyboardInterrupt came without a handler), 143 for
    SIGTERM."""
    return 128 + (_STOP["signum"] or signal.SIGINT)


def note_interrupt(msg: str) -> None:
    """Print the one line that says what an interrupted command kept (once per process)."""
    if not _STOP["noted"]:
        _STOP["noted"] = True
        print(" ".join(msg.split()), file=sys.stderr, flush=True)


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
