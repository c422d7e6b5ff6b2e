"""The I/O threads: how many the machine allows, and work handed to them as lists, not futures.

A snapshot of a model has thousands of small arrays. One future per chunk means thousands of
Python objects built, queued and waited on by the thread that coordinates the save, holding the
GIL the training thread needs; more threads than cores only wait in the run queue. So the pool is
as wide as the cores this process may use (at most `MAX_IO_THREADS`), and `for_each` runs one job
per thread, each taking the next item of a shared list until none is left.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: the most I/O threads a pool gets by default
MAX_IO_THREADS = 8


def default_io_threads() -> int:
    """The cores this process may run on, between 2 and `MAX_IO_THREADS`.

    Two at least, so one thread's read or write waits on the storage while another's runs.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(2, min(MAX_IO_THREADS, cores))


class IOPool(ThreadPoolExecutor):
    """The storage threads of a `moai_ckpt.Checkpointer`: a thread pool that knows its width.

    Args:
        width: how many threads (`default_io_threads` when None).
    """

    def __init__(self, width: int | None = None) -> None:
        self.width = width or default_io_threads()
        super().__init__(self.width, thread_name_prefix="moai-io")


def width_of(executor: Executor) -> int:
    """How many jobs `for_each` runs at once on ``executor``."""
    return executor.width if isinstance(executor, IOPool) else default_io_threads()


def for_each(executor: Executor, items: Sequence[T], fn: Callable[[T], R]) -> list[R]:
    """``fn`` of every item, in item order, on the executor's threads: one job per thread.

    The first error stops the jobs (no item starts after it) and is raised once every job has
    ended, so nothing of a failed operation still runs when the caller hears of it. Items start
    in order, so the error raised is the one of the first item that fails.
    """
    results: list[R | None] = [None] * len(items)
    errors: dict[int, Exception] = {}
    order = itertools.count()
    stop = threading.Event()

    def job() -> None:
        while not stop.is_set():
            i = next(order)  # atomic: itertools.count holds the GIL
            if i >= len(items):
                return
            try:
                results[i] = fn(items[i])
            except Exception as exc:  # noqa: BLE001 - raised in the caller's thread below
                errors[i] = exc
                stop.set()

    jobs = [executor.submit(job) for _ in range(min(width_of(executor), len(items)))]
    try:
        wait(jobs)
    finally:
        stop.set()
        wait(jobs)
    if errors:
        raise errors[min(errors)]
    for f in jobs:
        f.result()  # a job that failed outside fn (none should)
    return results  # type: ignore[return-value]
