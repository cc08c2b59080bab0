"""wrapperlab command line. Thin: it parses, calls the library and prints; one module per command group.

Every command that prints results takes ``--json``. Configuration errors and unreadable files exit with
code 2 and one line on stderr naming what is wrong; nothing is written before the configuration is valid.
"""

from __future__ import annotations

import sys

import typer

from wrapperlab.cli import analyze, bench, data, experiments, export, measures, organisms, stories, tracr, train  # noqa: F401
from wrapperlab.cli.common import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="wrapperlab: did fine-tuning remove a capability, or only wrap it? "
                       "Pretrain on PCFG tasks, fine-tune under the paper's protocols, reverse-fine-tune, evaluate.")
train.register(app)
app.add_typer(data.data_app, name="data")
app.add_typer(analyze.analyze_app, name="analyze")
app.add_typer(tracr.tracr_app, name="tracr")
app.add_typer(stories.stories_app, name="stories")
app.add_typer(organisms.organisms_app, name="organisms")
experiments.register(app)
bench.register(app)
export.register(app)


def main() -> None:
    """The console entry point. SIGTERM stops a command the way Ctrl-C does (cleanup runs, one line on stderr),
    with exit code 143 (130 for Ctrl-C)."""
    import signal

    from wrapperlab.cli.common import install_stop_handlers, note_interrupt, stop_exit_code, stop_signal
    from wrapperlab.registry import PluginError

    install_stop_handlers()
    try:
        app()
    except (UserError, PluginError) as e:  # the one error path: _fail and user_errors() raise UserError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # raised outside the command (typer turns one inside it into exit 130)
        pass
    except SystemExit as e:
        if stop_signal() is None or e.code in (0, None):
            raise
    else:
        return
    note_interrupt(f"interrupted by {signal.Signals(stop_signal() or signal.SIGINT).name}")
    sys.exit(stop_exit_code())


if __name__ == "__main__":
    main()
