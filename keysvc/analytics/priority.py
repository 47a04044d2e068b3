"""The flusher's CPU priority: the lowest, except while it holds a lock the request path waits for.

The flusher is background work, so its threads (chDB's included, which inherit it) run at nice 19:
under load the workers win the CPU. But the spool's LMDB writer lock is shared with every worker's
append. A write transaction of the flusher's (marking a batch in flight, landing it, dropping past
the cap) taken at nice 19 can be preempted while it holds that lock, and then the workers wait for
as long as the scheduler keeps the flusher waiting: a priority inversion, seen as p99 spikes and
lost throughput under load. So the flusher makes those transactions in one thread that keeps the
priority the process started with, and waits for them.

Linux keeps a nice value per thread, and a new thread takes its creator's: `start()` creates that
thread first, then lowers the calling (main) thread, and the threads it creates later.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

BACKGROUND_NICE = 19

_locked_work: list[ThreadPoolExecutor] = []


def start() -> None:
    """Start the lock holder's thread at this thread's priority, then lower this thread's."""
    if not _locked_work:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keysvc-spool-writes")
        executor.submit(int).result()  # the thread exists before this one's priority drops
        _locked_work.append(executor)
    try:
        os.nice(BACKGROUND_NICE)
    except OSError:
        pass


def holding_shared_locks(call: Callable[..., T], *args: object) -> T:
    """call(*args), run in the thread at the process's first priority (or here, without start())."""
    if not _locked_work:
        return call(*args)
    return _locked_work[0].submit(call, *args).result()
