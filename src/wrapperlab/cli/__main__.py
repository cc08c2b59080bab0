"""``python -m wrapperlab.cli``: the command line, as the ``wrapperlab`` script runs it."""

from wrapperlab.cli import main

main()
