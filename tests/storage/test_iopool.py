"""The I/O pool: its width follows the machine, and `for_each` runs one job per thread over a list."""

from __future__ import annotations

import os
import threading
import time

import pytest

from moai_ckpt.iopool import MAX_IO_THREADS, IOPool, default_io_threads, for_each


def test_the_default_width_is_the_cores_this_process_may_use_between_2_and_8() -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    assert default_io_threads() == max(2, min(MAX_IO_THREADS, cores))
    with IOPool() as pool:
        assert (pool.width, pool.read_width) == (default_io_threads(), MAX_IO_THREADS)
    with IOPool(3) as pool:
        assert (pool.width, pool.read_width) == (3, 3)


def test_results_come_in_item_order_from_at_most_width_threads() -> None:
    threads: set[str] = set()

    def square(x: int) -> int:
        threads.add(threading.current_thread().name)
        return x * x

    with IOPool(3) as pool:
        assert for_each(pool, list(range(500)), square) == [x * x for x in range(500)]
        assert for_each(pool, [], square) == []
    assert 1 <= len(threads) <= 3
    threads.clear()
    with IOPool() as pool:
        for_each(pool, list(range(500)), square)
        assert len(threads) <= pool.width  # writes: as many threads as cores, no more
        for_each(pool, list(range(500)), square, reads=True)
        assert len(threads) <= pool.read_width


def test_the_first_failing_item_stops_the_rest_and_nothing_runs_after_the_error() -> None:
    started: list[int] = []
    started_at_first_failure: list[int] = []
    running = 0
    lock = threading.Lock()

    def work(i: int) -> int:
        nonlocal running
        with lock:
            started.append(i)
            running += 1
        try:
            time.sleep(0.001)
            if i in (5, 7):
                with lock:
                    started_at_first_failure.append(len(started))
                raise ValueError(f"item {i}")
            return i
        finally:
            with lock:
                running -= 1

    with IOPool(2) as pool, pytest.raises(ValueError, match="item 5"):
        for_each(pool, list(range(100)), work)
    assert running == 0  # every job ended before the error was raised
    # item 5 started before item 7, so its error is the one raised whichever failed first; after
    # the first failure the other thread starts one more item at most (before it sees the stop)
    assert 5 in started and len(started) <= started_at_first_failure[0] + 1
