#!/usr/bin/env python3
"""Thin entry point: `python benchmarks/train.py --help`. The code lives in wrapperlab.bench.train;
`wrapperlab bench` runs every benchmark and prints a table."""

from wrapperlab.bench.train import main

if __name__ == "__main__":
    main()
