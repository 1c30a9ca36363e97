"""argparse types shared by every `boothkit` subcommand: numbers are checked when the command line is parsed (finite,
in range), so a bad value is a one-line ``boothkit CMD: error: argument --x: ...`` (exit 2) before any work.

    p.add_argument("--steps", type=positive_int, default=30)
    p.add_argument("--alpha", type=finite_float)
    p.add_argument("--strength", type=fraction)             # 0 <= x <= 1
    p.add_argument("--seed", type=int_range(0, 2**32 - 1))
    p.add_argument("--scale", type=float_range(0.0, 10.0))
"""
from __future__ import annotations

import argparse
import math

class Parser(argparse.ArgumentParser):
    """argparse with errors on one line: ``boothkit CMD: error: ...`` (exit 2), the usage left to ``--help``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# upper bounds that no sensible run reaches and that keep a typo from allocating gigabytes
MAX_STEPS = 100_000
MAX_COUNT = 10_000


def _int(text) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def int_range(lo: int | None = None, hi: int | None = None):
    """An argparse type: an integer with lo <= x <= hi (either bound may be None)."""
    def parse(text) -> int:
        v = _int(text)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range, expected {_span(lo, hi)}")
        return v
    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def float_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    """An argparse type: a finite number with lo <= x <= hi (lo < x when ``lo_open``)."""
    def parse(text) -> float:
        v = _float(text)
        if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v:g} is out of range, expected {_span(lo, hi, lo_open)}")
        return v
    parse.__name__ = "number"
    return parse


def _span(lo, hi, lo_open=False) -> str:
    if lo is not None and hi is not None:
        return f"{lo} {'<' if lo_open else '<='} x <= {hi}"
    if lo is not None:
        return f"x {'>' if lo_open else '>='} {lo}"
    return f"x <= {hi}"


positive_int = int_range(1, MAX_STEPS)           # steps, counts: 1 .. 100000
nonneg_int = int_range(0, None)                  # seeds, indices
finite_float = float_range()                     # any finite number
positive_float = float_range(0.0, None, lo_open=True)
nonneg_float = float_range(0.0, None)
fraction = float_range(0.0, 1.0)                 # 0 <= x <= 1
learning_rate = float_range(0.0, 10.0, lo_open=True)  # 0 < x <= 10: above, Adam's step overflows float32
