"""Parallel CPU jobs of one intra-op thread each, for the project's multi-run commands (demo, pre-training).

The tiny models' operations are too small to gain from intra-op threads, and threads that wait for each other
stall whenever another job holds a core (on a shared 2-core machine a demo step went from 0.3 s to 28 s), so
each job gets one thread and one core.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from iedp.logs import quiet_libraries


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def one_thread_per_worker() -> Iterator[None]:
    """Sets ``OMP_NUM_THREADS=1`` for worker processes started inside the block (it is read when a worker imports
    torch, so it must be in the environment they inherit); restores the previous value afterwards."""
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = previous


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Runs the block with ``count`` intra-op threads in this process; restores the previous count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def start_worker(level: int) -> None:
    """Initialiser of a worker process: one intra-op thread and the parent's log level, its lines timed (as the
    CLI's) and tagged with its process id; library chatter kept out below debug level, as in the CLI."""
    torch.set_num_threads(1)
    if level > logging.DEBUG:
        quiet_libraries()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [worker {os.getpid()}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
