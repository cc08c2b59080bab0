#!/usr/bin/env python3
"""Thin entry point: `python benchmarks/sampling.py --help`. The code lives in wrapperlab.bench.sampling;
`wrapperlab bench` runs every benchmark and prints a table."""

from wrapperlab.bench.sampling import main

if __name__ == "__main__":
    main()
