#!/usr/bin/env python3
"""Thin entry point: `python benchmarks/reproduce.py --help`. The code lives in wrapperlab.bench.reproduce;
`wrapperlab bench` runs every benchmark and prints a table."""

from wrapperlab.bench.reproduce import main

if __name__ == "__main__":
    main()
