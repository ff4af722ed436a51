"""The command-line options the two step benchmarks share (``train_step.py``, ``distill_step.py``)."""

from __future__ import annotations

import argparse


def step_parser(description: str, dtypes: list[str]) -> argparse.ArgumentParser:
    """A parser with ``--device``, ``--dtype`` (one of ``dtypes``), ``--quick`` and ``--repeats``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the shapes differ: see SHAPES)")
    parser.add_argument("--dtype", default="fp32", choices=dtypes, help="the models' and inputs' dtype")
    parser.add_argument("--quick", action="store_true", help="the small CPU shape, about a minute")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant after one warm-up; the "
                        "median is reported")
    return parser
