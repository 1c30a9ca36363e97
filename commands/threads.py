"""How many CPU threads torch uses in a `boothkit` command. torch's default is one per core, which on a machine that
other work already keeps busy makes every thread wait for the others: on a 2-core machine under load the demo took
122-214 s with torch's default threads and 24 s with one thread, the same bytes (issue #27). The default here is
the cores that are actually free: the usable cores less the 1-minute load average, at least 1. ``--threads N``
or OMP_NUM_THREADS set by the user win."""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def free_cores() -> tuple[int, int, float]:
    """(free cores, usable cores, 1-minute load average): free = round(usable - load), at least 1."""
    cores = usable_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cores, cores, 0.0
    return max(1, min(cores, round(cores - load))), cores, load


def choose(requested: int | None = None) -> tuple[int, str]:
    """The thread count and why: ``requested``, else OMP_NUM_THREADS, else the free cores."""
    if requested is not None:
        return requested, "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.strip().isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    n, cores, load = free_cores()
    return n, f"{cores} cores, load average {load:.1f}"


def apply(requested: int | None = None) -> int:
    """Set torch's intra-op threads (on the CPU; a GPU run is not affected) and say so in one line."""
    n, why = choose(requested)
    torch.set_num_threads(n)
    log.info("threads: %d (%s; --threads N to change)", n, why)
    return n


def add_argument(parser) -> None:
    from .args import positive_int

    parser.add_argument("--threads", type=positive_int,
                        help="CPU threads for torch (default: the cores that are free, i.e. the usable cores less "
                             "the 1-minute load average, at least 1; or OMP_NUM_THREADS when set). On a busy "
                             "machine fewer threads are faster, not slower")
