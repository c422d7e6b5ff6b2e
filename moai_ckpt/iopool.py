"""The I/O threads: how many the machine allows, and work handed to them as lists, not futures.

A snapshot of a model has thousands of small arrays. One future per chunk means thousands of
Python objects built, queued and waited on by the thread that coordinates the save, holding the
GIL the training thread needs; more threads than cores only wait in the run queue. So work that
keeps a CPU busy (creating files, copying into the page cache) runs on as many threads as the
cores this process may use (at most `MAX_IO_THREADS`), and `for_each` runs one job per thread,
each taking the next item of a shared list until none is left. Reads of chunks mostly wait on the
storage, so they may keep more in flight (`IOPool.read_width`).
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
    """The storage threads of a `moai_ckpt.Checkpointer`: a thread pool that knows its widths.

    Args:
        width: how many jobs write at once, and read at once (when None: writes get
            `default_io_threads`, reads `MAX_IO_THREADS`, since a read mostly waits on the storage).
    """

    def __init__(self, width: int | None = None) -> None:
        self.width = width or default_io_threads()
        self.read_width = width or MAX_IO_THREADS
        # threads are started as jobs need them: a pool that only writes keeps `width` threads
        super().__init__(max(self.width, self.read_width), thread_name_prefix="moai-io")


def width_of(executor: Executor, *, reads: bool = False) -> int:
    """How many jobs `for_each` runs at once on ``executor`` (``reads``: jobs that read)."""
    if isinstance(executor, IOPool):
        return executor.read_width if reads else executor.width
    return default_io_threads()


def for_each(executor: Executor, items: Sequence[T], fn: Callable[[T], R], *, reads: bool = False) -> list[R]:
    """``fn`` of every item, in item order, on the executor's threads: one job per thread
    (`width_of` the executor; ``reads`` says the jobs mostly wait on the storage).

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

    jobs = [executor.submit(job) for _ in range(min(width_of(executor, reads=reads), len(items)))]
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
