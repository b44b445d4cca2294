"""torch thread control for a generator replica: the decode thread's intra-op threads per
forward pass, and single-threaded torch work beside it (model loads, stand-in builds).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

logger = logging.getLogger("ray.serve").getChild(__name__)


def one_torch_thread() -> None:
    """Give the calling thread one torch intra-op thread: call it first in every thread other
    than the decode thread that runs torch work (model loads, stand-in builds).

    libgomp gives each thread that runs a parallel region a team of its own, kept for as long
    as that thread lives, and counts every thread of every team. Once they outnumber the CPUs
    it "throttles": at each barrier a waiting thread spins 100 times instead of 300,000 before
    it sleeps on a futex. A forward pass is hundreds of parallel regions, so the decode
    thread's worker then sleeps and is woken at each of them. Measured here (2 cores): batch-1
    `generate()` 1.37 s before and 2.22 s after a live side thread had run one 2-thread matmul,
    1.27 s unchanged when that thread ran on one thread; through the service, fp32 decode steps
    50-54 ms with the bfloat16 and int8 models loaded by a 2-thread loader against 43-46 ms
    with fp32 alone, and 38-44 against 40-41 ms with the loader on one thread.

    torch's process-wide count becomes 1 as well, which threads that first use torch later
    start from: the decode thread sets its own count (`ThreadBudget`).
    """
    torch.get_num_threads()  # torch sets a thread's count on its first use: let it happen now
    torch.set_num_threads(1)  # so that this per-thread setting is the one that stays


def lower_priority(steps: int) -> int | None:
    """Make the calling thread `steps` nicer (capped at 19) and return its niceness, or None
    where threads have no niceness of their own (Linux only) or it could not be changed.

    For the decode thread, called before its first torch work: the OpenMP team it then
    starts inherits the niceness, so the whole forward pass yields the cores to the request
    path (proxy, Ingress) whenever that has work, and takes all of them otherwise. What it
    measured, with Ray's workers at niceness 0: configs/ray.env.
    """
    if steps <= 0 or not sys.platform.startswith("linux"):
        return None
    tid = threading.get_native_id()
    try:
        niceness = min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps)
        os.setpriority(os.PRIO_PROCESS, tid, niceness)  # on Linux: this thread alone
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError as exc:
        logger.warning("could not lower the decode thread's priority: %s", exc)
        return None


def torch_side_executor(name: str) -> ThreadPoolExecutor:
    """One worker thread for torch work beside the decode thread, on one intra-op thread
    (see `one_torch_thread`): the decode thread stays the only owner of a thread team."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=one_torch_thread)


class ThreadBudget:
    """torch intra-op threads for each forward pass of the decode thread.

    Steps over at most `single_thread_max_rows` rows run on one thread, the rest (and every
    prefill) on all `threads`; 0 (the default) runs every step on all threads. One thread for
    small steps leaves a core to the request path, and a step on one thread does not stall at
    barriers when the other core is taken. It paid on one 2-core machine (8 users: 230 vs 142
    tok/s) and cost on another (1 user: step 41-43 vs 37-38 ms, 4 users 77 vs 83 tok/s, 8 users
    equal), so it is a setting, not a rule. Call only from the thread that
    runs the forward passes.
    """

    def __init__(self, threads: int, single_thread_max_rows: int = 0) -> None:
        self.threads = max(1, threads)
        self.single_thread_max_rows = single_thread_max_rows
        self._current = 0

    def for_step(self, rows: int) -> None:
        self._use(1 if rows <= self.single_thread_max_rows else self.threads)

    def for_prefill(self) -> None:
        self._use(self.threads)

    def _use(self, threads: int) -> None:
        if threads != self._current:
            if not self._current:  # as in one_torch_thread: torch's lazy per-thread setup
                torch.get_num_threads()  # first, or it could apply another thread's count later
            torch.set_num_threads(threads)
            self._current = threads
