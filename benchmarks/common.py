"""Shared helpers for the benchmark scripts: page-cache control, timing, tables."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def drop_cache(path: str) -> None:
    """Evict a file tree from the page cache (written data must already be fsync'ed)."""
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file and directory below ``path`` (for writers that do not)."""
    for d, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        fd = os.open(d, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def tree_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def fresh(path: str) -> str:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)
    return path


def settle(seconds: float = 1.0) -> None:
    """Let earlier writes drain so that each timed operation starts on a quiet disk."""
    os.sync()
    time.sleep(seconds)


def timed(fn: Callable[[], object]) -> float:
    settle()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class Series:
    name: str
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, torch {torch.__version__}, Python {platform.python_version()}"


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def raw_write(path: str, tensors: list[torch.Tensor]) -> float:
    """The floor for persisting: the tensors' bytes written sequentially to one file, then fsync."""
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t in tensors:
            view = byte_view(t)
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def load_average() -> str:
    """The 1/5/15-minute load averages and the core count (other jobs share small machines)."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def cold_cache_mode(requested: str = "auto") -> str:
    """How `make_cold` evicts data: ``drop_caches`` (the whole page cache, dentries and inodes;
    root on a machine of its own) or ``fadvise`` (``posix_fadvise(DONTNEED)`` per file, after an
    fsync: only this benchmark's files, for machines other jobs share). ``auto`` takes
    ``drop_caches`` when /proc/sys/vm/drop_caches can be written."""
    if requested != "auto":
        return requested
    return "drop_caches" if os.access("/proc/sys/vm/drop_caches", os.W_OK) else "fadvise"


def make_cold(paths: list[str], mode: str) -> str:
    """Evict ``paths`` (files or trees) from the page cache the way ``mode`` says; returns the
    way it was done (``fadvise`` where drop_caches turned out not to be allowed)."""
    if mode == "drop_caches":
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return mode
        except OSError:
            pass  # not allowed after all (a read-only /proc/sys in a container): file by file
    for path in paths:
        if os.path.exists(path):
            drop_cache(path)
    return "fadvise"


def init_single_process_group() -> None:
    """A gloo world of one: DCP's async modes want a process group (a CPU one)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    from moai_ckpt.testing.dist import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # DCP's process mode looks it up
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


class Output:
    """Lines printed as they come and kept, to be written to a text file at the end."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, *parts: object) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.lines.append(line)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            f.write("\n".join(self.lines) + "\n")

    def write_results(self, name: str, result: dict[str, Any], out_dir: str | None, json_path: str | None) -> None:
        """``name``.txt (these lines) and ``name``.json (``result``) into ``out_dir``, if given;
        the JSON to ``json_path`` instead when that is given."""
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            json_path = json_path or os.path.join(out_dir, f"{name}.json")
            self.save(os.path.join(out_dir, f"{name}.txt"))
        if json_path:
            with open(json_path, "w") as f:
                json.dump(result, f, indent=1)


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table (it also reads well as plain text)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(header), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, rows)]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Marks:
    """Iteration boundaries: CUDA events on the training stream, or the CPU clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def replace_last(self) -> None:
        self.marks.pop()
        self.mark()

    def durations(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]
