#!/usr/bin/env python3
"""Thin entry point: `python benchmarks/analysis.py --help`. The code lives in wrapperlab.bench.analysis;
`wrapperlab bench` runs every benchmark and prints a table."""

from wrapperlab.bench.analysis import main

if __name__ == "__main__":
    main()
