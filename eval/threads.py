"""``--threads`` for every CPU-heavy command (demo, eval, bench, calibrate), with a default that does
not oversubscribe a shared machine.

torch's default is one thread per core, whatever else runs: on a busy 2-core machine that slows tiny
models 10-15x (threads spin waiting for cores another process holds). The default here is the cores
this process may use minus the machine's current load (1-minute load average), at least 1.
"""

from __future__ import annotations

import argparse
import logging
import os

logger = logging.getLogger(__name__)


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Available cores minus the rounded 1-minute load average, clamped to ``[1, available cores]``."""
    cpus = available_cpus()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, min(cpus, cpus - int(load + 0.5)))


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--threads N`` (default: :func:`default_threads` at run time)."""
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: free cores = available cores minus the current load, at least 1; "
        "on a busy machine use 1)",
    )


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to ``threads`` (or the default) and return the number used.

    Raises
    ------
    ValueError
        If ``threads`` is given and is not a positive integer.
    """
    import torch

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"--threads={threads!r}; give a whole number >= 1 (e.g. --threads 1)")
    n = default_threads() if threads is None else threads
    torch.set_num_threads(n)
    logger.info("torch threads: %d", n)
    return n
