"""Where the time goes (CPU): a background persist against the training thread, and save/restore
against raw I/O of the same bytes.

Three parts, each with its evidence (no profiler beyond cProfile is assumed):

``loop``: the training loop of `encoder.py` (CPU), with one snapshot in the middle, under
background loads interleaved over ``--reps`` repetitions: none; moai-ckpt ``save_async`` (its
persist in a thread, and with ``persist="process"`` in moai-ckpt's writer process); the
state copied, then written and fsync'ed by a plain thread (``os.write`` releases the GIL); a
pure-Python loop holding the GIL for as long as the moai persist took; a ``crc32c`` pass over the
state's bytes in a thread. For every step the training thread reads its own
``/proc/thread-self/schedstat``: time on a CPU, time runnable but waiting for a CPU (run delay),
and the rest of the wall time, spent asleep: on the GIL (the training thread does no I/O, and with
one torch thread it waits on nothing else). The CPU time of every thread during the moai persist
comes from ``/proc/self/task/*/schedstat`` (and user/system from ``stat``).

``save``: `Checkpointer.save` of a larger state (``--save-layers``), timed by phase (the
library's methods wrapped at run time, nothing changed in it), with counts of what it does per
chunk and per array (files created, directories, writev, fsync, syncfs, crc32c calls, pydantic
models built, JSON documents), then one run under cProfile in every thread; against the same
bytes written to one file + fsync, to one file per array (moai-ckpt's directory layout) + syncfs,
to one file without fsync (the page cache alone), the crc32c pass alone and a memcpy.

``restore``: `Checkpointer.restore` of that snapshot, cold (``posix_fadvise(DONTNEED)``), by phase
with counts and cProfile; against a cold raw read of one file, of one file per array, a warm raw
read, the crc32c pass, first touch of new memory and a memcpy.

``tmpfs``: ``save`` and ``restore`` again in /dev/shm, where no disk takes part: what is left is
each method's CPU work (file and directory creation, copies, checksums).

    OMP_NUM_THREADS=1 python benchmarks/persist_profile.py --out docs/results
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import importlib
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
from encoder import CPU, EncoderConfig, Trainer

import moai_ckpt

# -- per-thread scheduler accounting --------------------------------------------------------------


def schedstat(path: str = "/proc/thread-self/schedstat") -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of a thread so far."""
    with open(path) as f:
        on_cpu, delay, _ = f.read().split()
    return int(on_cpu) / 1e9, int(delay) / 1e9


def threads_cpu() -> dict[int, tuple[float, float, float, float]]:
    """Every thread of this process: tid -> (on CPU, run delay, user, system) in seconds."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            on_cpu, delay = schedstat(f"/proc/self/task/{tid}/schedstat")
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(tid)] = (on_cpu, delay, int(fields[11]) / tick, int(fields[12]) / tick)
        except (OSError, ValueError):
            continue
    return out


def thread_names() -> dict[int, str]:
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    return {tid: names.get(tid, "other (torch / C)") for tid in map(int, os.listdir("/proc/self/task"))}


def name_group(name: str) -> str:
    """Thread names without their pool index: ``moai-io_3`` -> ``moai-io``."""
    return name.split("_")[0] if name.startswith(("moai", "ThreadPoolExecutor")) else name


# -- counting what the library does, by wrapping functions at run time -----------------------------


class Counters:
    """Calls and seconds inside wrapped functions, from every thread (restored on exit)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()
        self._undo: list[Callable[[], None]] = []

    def _add(self, key: str, seconds: float) -> None:
        with self._lock:
            self.calls[key] += 1
            self.seconds[key] += seconds

    def wrap(self, owner: Any, attr: str, key: str | None = None, classify: Callable[..., str] | None = None) -> None:
        """Replace ``owner.attr`` by a counting wrapper (skipped when the library has no such name)."""
        original = getattr(owner, attr, None)
        if original is None:
            return
        label = key or f"{getattr(owner, '__name__', owner)}.{attr}"
        is_static = isinstance(owner, type) and isinstance(owner.__dict__.get(attr), staticmethod)
        is_class = isinstance(owner, type) and isinstance(owner.__dict__.get(attr), classmethod)
        raw = owner.__dict__[attr].__func__ if is_class else original
        own = owner.__dict__.get(attr) if isinstance(owner, type) else None

        @functools.wraps(raw)
        def counted(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return raw(*args, **kwargs)
            finally:
                name = classify(*args, **kwargs) if classify is not None else label
                self._add(name, time.perf_counter() - started)

        if is_class:
            setattr(owner, attr, classmethod(counted))
        elif is_static:
            setattr(owner, attr, staticmethod(counted))
        else:
            setattr(owner, attr, counted)

        def undo() -> None:
            if own is not None:  # the class's own descriptor (function, staticmethod, classmethod)
                setattr(owner, attr, own)
            elif isinstance(owner, type):
                delattr(owner, attr)  # it was inherited
            else:
                setattr(owner, attr, original)

        self._undo.append(undo)

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def snapshot(self) -> dict[str, tuple[int, float]]:
        with self._lock:
            return {k: (self.calls[k], self.seconds[k]) for k in self.calls}


def _open_kind(path: Any, flags: int, *args: Any, **kwargs: Any) -> str:
    return "os.open (O_CREAT: file created)" if flags & os.O_CREAT else "os.open (read)"


def _model_kind(prefix: str) -> Callable[..., str]:
    def kind(first: Any, *args: Any, **kwargs: Any) -> str:
        cls = first if isinstance(first, type) else type(first)
        return f"pydantic {prefix} {cls.__name__}"

    return kind


@contextlib.contextmanager
def counting() -> Iterator[Counters]:
    """Count system calls, checksums, pydantic models and JSON documents while the block runs."""
    import pydantic

    c = Counters()
    c.wrap(os, "open", classify=_open_kind)
    for name in ("writev", "write", "readv", "fsync", "mkdir", "unlink", "rmdir", "posix_fadvise", "stat", "scandir"):
        c.wrap(os, name, f"os.{name}")
    storage = importlib.import_module("moai_ckpt.storage")
    fn = getattr(storage, "_SYNCFS", None)
    if fn is not None:

        def syncfs(fd: int) -> int:
            started = time.perf_counter()
            try:
                return int(fn(fd))
            finally:
                c._add("syncfs", time.perf_counter() - started)

        setattr(storage, "_SYNCFS", syncfs)  # noqa: B010 - a private name that may go away
        c._undo.append(lambda: setattr(storage, "_SYNCFS", fn))
    arrays = importlib.import_module("moai_ckpt.arrays")
    crc: Any = getattr(arrays, "_crc32c", None)
    if crc is not None:

        class CountingCrc:
            def __getattr__(self, name: str) -> Any:
                return getattr(crc, name)

            @staticmethod
            def crc32c(data: Any, value: int = 0) -> int:
                started = time.perf_counter()
                try:
                    return int(crc.crc32c(data, value))
                finally:
                    c._add("crc32c", time.perf_counter() - started)

        setattr(arrays, "_crc32c", CountingCrc())  # noqa: B010 - a private name that may go away
        c._undo.append(lambda: setattr(arrays, "_crc32c", crc))
    c.wrap(pydantic.BaseModel, "__init__", classify=_model_kind("built"))
    c.wrap(pydantic.BaseModel, "model_validate", classify=_model_kind("validated"))
    c.wrap(pydantic.BaseModel, "model_validate_json", classify=_model_kind("validated (json)"))
    c.wrap(pydantic.BaseModel, "model_dump", classify=_model_kind("dumped"))
    c.wrap(pydantic.BaseModel, "model_dump_json", classify=_model_kind("dumped (json)"))
    c.wrap(json, "dumps", "json.dumps")
    c.wrap(json, "loads", "json.loads")
    try:
        yield c
    finally:
        c.restore()


PHASES: list[tuple[str, str, str]] = [
    ("moai_ckpt.checkpointer", "Checkpointer", "_stage"),
    ("moai_ckpt.checkpointer", "Checkpointer", "_persist"),
    ("moai_ckpt.checkpointer", "Checkpointer", "_clear_for_write"),
    ("moai_ckpt.checkpointer", "Checkpointer", "_ensure_run_info"),
    ("moai_ckpt.checkpointer", "Checkpointer", "_prepare"),
    ("moai_ckpt.checkpointer", "Checkpointer", "_resolve"),
    ("moai_ckpt.snapshot_writer", "SnapshotWriter", "write_chunks"),
    ("moai_ckpt.snapshot_writer", "SnapshotWriter", "_write_chunk"),
    ("moai_ckpt.snapshot_writer", "SnapshotWriter", "write_metadata"),
    ("moai_ckpt.snapshot_writer", "SnapshotWriter", "commit"),
    ("moai_ckpt.snapshot", "SnapshotReader", "__init__"),
    ("moai_ckpt.snapshot", "SnapshotReader", "check_metadata"),
    ("moai_ckpt.snapshot", "SnapshotReader", "read_arrays"),
    ("moai_ckpt.snapshot", "SnapshotReader", "_read_chunk"),
    ("moai_ckpt.snapshot", "SnapshotReader", "_allocate"),
    ("moai_ckpt.storage", "Storage", "barrier"),
    ("moai_ckpt.storage", "Storage", "make_dirs"),
    ("moai_ckpt.storage", "Storage", "read_into"),
    ("moai_ckpt.storage", "Storage", "write"),
    ("moai_ckpt.capture", "Restorer", "check"),
    ("moai_ckpt.capture", "Restorer", "apply"),
    ("moai_ckpt.arrays", "", "verify_chunk"),
    ("moai_ckpt.arrays", "", "chunk_crc"),
    ("moai_ckpt.checkpointer", "", "capture"),  # imported by name there
]


@contextlib.contextmanager
def phases() -> Iterator[Counters]:
    """Time the library's phases (thread-seconds: concurrent calls add up)."""
    c = Counters()
    for module_name, cls_name, attr in PHASES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        owner = getattr(module, cls_name, None) if cls_name else module
        if owner is not None:
            c.wrap(owner, attr, f"{cls_name or module_name.rsplit('.', 1)[1]}.{attr}")
    try:
        yield c
    finally:
        c.restore()


@contextlib.contextmanager
def profiled_threads() -> Iterator[list[tuple[str, cProfile.Profile]]]:
    """cProfile in the calling thread and in every thread started inside the block, on each
    thread's CPU clock (time spent waiting for the GIL, a CPU or the disk is not counted);
    yields (thread name, profile) pairs."""
    profiles: list[tuple[str, cProfile.Profile]] = []

    def start(*_: Any) -> None:
        sys.setprofile(None)
        prof = cProfile.Profile(time.thread_time)
        profiles.append((name_group(threading.current_thread().name), prof))
        prof.enable()

    main = cProfile.Profile(time.thread_time)
    profiles.append(("MainThread", main))
    threading.setprofile(start)
    main.enable()
    try:
        yield profiles
    finally:
        main.disable()
        threading.setprofile(None)  # type: ignore[arg-type,unused-ignore]


def top_functions(
    profiles: list[tuple[str, cProfile.Profile]],
    n: int = 18,
    sort: str = "tottime",
    only: str | None = None,
    thread: str | None = None,
) -> list[str]:
    stats: pstats.Stats | None = None
    for name, prof in profiles:
        if thread is not None and name != thread:
            continue
        with contextlib.suppress(TypeError, ValueError):
            prof.create_stats()
            stats = pstats.Stats(prof) if stats is None else stats.add(prof)
    if stats is None:
        return []
    buf = io.StringIO()
    stats.stream = buf  # type: ignore[attr-defined]
    stats.sort_stats(sort).print_stats(*([only] if only else []), n)
    lines = [line for line in buf.getvalue().splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return lines[start:]


# -- part 1: the training thread during a persist ------------------------------------------------


def gil_holder(seconds: float) -> None:
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        for i in range(1000):
            x += i


def loop_part(out: common.Output, args: argparse.Namespace, base: str) -> dict[str, Any]:
    d_model = args.loop_d_model or CPU.d_model
    cfg = EncoderConfig(layers=args.loop_layers, d_model=d_model, heads=CPU.heads, batch=CPU.batch, seq=CPU.seq)
    trainer = Trainer(cfg, torch.device("cpu"))
    tensors = trainer.tensors()
    buffers = [torch.empty_like(t) for t in tensors]
    host_bytes = [common.byte_view(b) for b in buffers]
    ckpt = moai_ckpt.Checkpointer(os.path.join(base, "loop-moai"), capture_rng=False, persist="thread")
    by_process = moai_ckpt.Checkpointer(os.path.join(base, "loop-moai-process"), capture_rng=False, persist="process")
    started = time.perf_counter()
    up = by_process.start_writer(wait=300)
    out(f"writer process {'ready' if up else 'NOT READY'} after {time.perf_counter() - started:.2f} s")
    process_s: dict[int, float] = {}  # step -> its persist through the writer process
    out(f"\n## loop: {trainer.nbytes / 1e6:.0f} MB of state, {cfg}; {common.load_average()}")
    persist_s = [0.5]
    moai_threads: list[dict[str, Any]] = []

    def moai(step: int) -> Callable[[], bool]:
        before = threads_cpu()
        started = time.perf_counter()
        handle = ckpt.save_async(step, trainer.state())
        assert handle is not None

        def done() -> bool:
            if not handle.done():
                return False
            if not moai_threads or moai_threads[-1]["step"] != step:
                handle.result()
                persist_s.append(time.perf_counter() - started)
                after = threads_cpu()
                names = thread_names()
                per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
                for tid, now in after.items():
                    then = before.get(tid, (0.0, 0.0, 0.0, 0.0))
                    group = name_group(names.get(tid, "exited"))
                    for i in range(4):
                        per[group][i] += now[i] - then[i]
                moai_threads.append({"step": step, "wall": persist_s[-1], "threads": dict(per)})
            return True

        return done

    def moai_process(step: int) -> Callable[[], bool]:
        started = time.perf_counter()
        handle = by_process.save_async(step, trainer.state())
        assert handle is not None and handle.persist == "process"

        def done() -> bool:
            if not handle.done():
                return False
            if step not in process_s:
                handle.result()
                process_s[step] = time.perf_counter() - started
            return True

        return done

    def in_thread(fn: Callable[[], object]) -> Callable[[], bool]:
        thread = threading.Thread(target=fn, daemon=True)
        thread.start()
        return lambda: not thread.is_alive()

    def raw(step: int) -> Callable[[], bool]:
        for b, t in zip(buffers, tensors, strict=True):
            b.copy_(t)
        return in_thread(lambda: common.raw_write(os.path.join(base, "loop-raw.bin"), buffers))

    def crc(step: int) -> Callable[[], bool]:
        import crc32c

        return in_thread(lambda: [crc32c.crc32c(v) for v in host_bytes])

    loads: dict[str, Callable[[int], Callable[[], bool]] | None] = {
        "quiet": None,
        "moai-ckpt save_async": moai,
        "moai-ckpt save_async, writer process": moai_process if up else None,
        "copy + raw write+fsync thread": raw,
        "crc32c pass in a thread": crc,
        "pure-Python thread (holds the GIL)": lambda step: in_thread(lambda: gil_holder(statistics.median(persist_s))),
    }
    steps: dict[str, list[dict[str, float]]] = {k: [] for k in loads}
    for _ in range(3):
        trainer.step()
    for rep in range(args.reps):
        names = list(loads)
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            common.settle(0.3)
            start_load = loads[name]
            busy: Callable[[], bool] | None = None
            for step in range(1, args.loop_steps + 1):
                cpu0, delay0 = schedstat()
                wall0 = time.perf_counter()
                running = busy is not None and not busy()
                trainer.step()
                wall1 = time.perf_counter()
                cpu1, delay1 = schedstat()
                if name == "quiet" or running:
                    steps[name].append(
                        {"wall": wall1 - wall0, "cpu": cpu1 - cpu0, "delay": delay1 - delay0, "rep": rep, "step": step}
                    )
                if step == args.loop_steps // 3 and start_load is not None:
                    busy = start_load(1000 * rep + step)
            while busy is not None and not busy():
                time.sleep(0.01)
            ckpt.prune(keep=1)
            by_process.prune(keep=1)
    ckpt.close()
    by_process.close()
    header = [
        "training step while...",
        "steps",
        "wall ms",
        "on CPU ms",
        "waiting for a CPU ms",
        "asleep (GIL) ms",
        "wall x quiet",
    ]
    rows = []
    quiet_wall = statistics.median(s["wall"] for s in steps["quiet"])
    summary = {}
    for name, values in steps.items():
        if not values:
            continue
        wall = statistics.median(v["wall"] for v in values)
        cpu = statistics.median(v["cpu"] for v in values)
        delay = statistics.median(v["delay"] for v in values)
        asleep = statistics.median(max(v["wall"] - v["cpu"] - v["delay"], 0.0) for v in values)
        summary[name] = {"steps": len(values), "wall": wall, "cpu": cpu, "delay": delay, "asleep": asleep}
        rows.append(
            [
                name,
                str(len(values)),
                f"{wall * 1e3:.1f}",
                f"{cpu * 1e3:.1f}",
                f"{delay * 1e3:.1f}",
                f"{asleep * 1e3:.1f}",
                f"{wall / quiet_wall:.2f}",
            ]
        )
    out("per step of the training thread (medians over the steps that began while the load ran):")
    for line in common.markdown_table(header, rows):
        out(line)
    out(f"moai-ckpt persist (save_async call to commit): {', '.join(f'{s:.3f}' for s in persist_s[1:])} s")
    out(f"moai-ckpt persist, writer process: {', '.join(f'{s:.3f}' for s in process_s.values())} s")
    alone = count_python(deadline(1.0))
    stop = threading.Event()

    def crc_loop() -> None:
        import crc32c

        buf = bytearray(64 << 20)
        while not stop.is_set():
            crc32c.crc32c(buf)

    thread = threading.Thread(target=crc_loop, daemon=True)
    thread.start()
    beside = count_python(deadline(1.0))
    stop.set()
    thread.join()
    out(
        f"does crc32c release the GIL? a pure-Python counter alone: {alone[0] / alone[1]:.3g} it/s; beside a thread "
        f"computing crc32c of 64 MiB buffers: {beside[0] / beside[1]:.3g} it/s "
        f"({beside[0] / beside[1] / (alone[0] / alone[1]):.2f}x; asleep {max(beside[1] - beside[2] - beside[3], 0):.3f} s of 1 s)"
    )
    if moai_threads:
        out("CPU seconds per thread group during a moai-ckpt persist (median over persists):")
        groups = sorted({g for m in moai_threads for g in m["threads"]})
        rows = []
        for g in groups:
            vals = [m["threads"].get(g, [0.0] * 4) for m in moai_threads]
            on_cpu, delay, user, system = (statistics.median(v[i] for v in vals) for i in range(4))
            if on_cpu + delay < 0.002:
                continue
            rows.append([g, f"{on_cpu:.3f}", f"{delay:.3f}", f"{user:.2f}", f"{system:.2f}"])
        for line in common.markdown_table(
            ["thread", "on CPU s", "waiting for a CPU s", "user s (ticks)", "system s (ticks)"], rows
        ):
            out(line)
    return {"steps": steps, "summary": summary, "persists": persist_s[1:], "moai_threads": moai_threads}


# -- the per-array cost, and how much of it holds the GIL ------------------------------------------


def deadline(seconds: float) -> Callable[[], bool]:
    end = time.perf_counter() + seconds
    return lambda: time.perf_counter() > end


def count_python(until: Callable[[], bool]) -> tuple[int, float, float, float]:
    """Count a pure-Python loop until ``until()``; (iterations, wall, on CPU, run delay)."""
    cpu0, delay0 = schedstat()
    start = time.perf_counter()
    n = 0
    while not until():
        for _ in range(200):
            n += 1
    wall = time.perf_counter() - start
    cpu1, delay1 = schedstat()
    return n, wall, cpu1 - cpu0, delay1 - delay0


def cpu_by_group(before: dict[int, tuple[float, float, float, float]]) -> dict[str, list[float]]:
    """CPU accounting since ``before`` per thread group: [on CPU, run delay, user, system]."""
    after = threads_cpu()
    names = thread_names()
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for tid, now in after.items():
        then = before.get(tid, (0.0, 0.0, 0.0, 0.0))
        group = name_group(names.get(tid, "exited"))
        for i in range(4):
            out[group][i] += now[i] - then[i]
    return dict(out)


def coordinator_parts(trainer: Trainer) -> str:
    """Two parts of the persist's Python, timed apart: the write plan and the zarr.json documents
    (encoded as the library does, with ``indent=1``, and compactly)."""
    from moai_ckpt import arrays as za
    from moai_ckpt.capture import capture
    from moai_ckpt.dtypes import from_name, stored_dtype
    from moai_ckpt.sharding import Piece, local_piece, plan_writes

    captured = capture(trainer.state())
    pieces = {}
    for name, tensor in captured.tensors.items():
        shape, start, stop, _ = local_piece(tensor)
        pieces[name] = Piece(stored_dtype(tensor.dtype, key=name).logical, shape, start, stop)
    started = time.perf_counter()
    plan = plan_writes([pieces], 64 << 20, {})
    planned = time.perf_counter() - started
    docs = [za.array_metadata(r, from_name(r.dtype)) for r in plan.records.values()]
    started = time.perf_counter()
    for doc in docs:
        json.dumps(doc, indent=1)
    indented = time.perf_counter() - started
    started = time.perf_counter()
    for doc in docs:
        json.dumps(doc)
    compact = time.perf_counter() - started
    return (
        f"the coordinator's Python, timed apart: write plan {planned * 1e3:.1f} ms; {len(docs)} zarr.json documents "
        f"with json.dumps(indent=1) (the pure-Python encoder) {indented * 1e3:.1f} ms, without indent (the C "
        f"encoder) {compact * 1e3:.1f} ms"
    )


def arrays_part(out: common.Output, args: argparse.Namespace, base: str) -> dict[str, Any]:
    """The GPU setup's structure (24 encoder layers: 1152 arrays with AdamW) at width 64, so the
    bytes are negligible and what is left is per-array work. Each repetition persists once with
    the main thread asleep (what the persist costs, thread by thread), and once while the main
    thread runs a pure-Python counter in place of a training thread: the counter's own
    accounting says how long it waited for the GIL."""
    cfg = EncoderConfig(layers=args.array_layers, d_model=64, heads=4, batch=1, seq=4)
    trainer = Trainer(cfg, torch.device("cpu"))
    arrays = len(trainer.tensors())
    out(f"\n## per-array work: {arrays} arrays ({cfg}), {trainer.nbytes / 1e6:.1f} MB; {common.load_average()}")
    ckpt = moai_ckpt.Checkpointer(os.path.join(base, "arrays"), capture_rng=False)
    alone: list[dict[str, Any]] = []
    probed: list[dict[str, float]] = []
    step = 0
    for _ in range(args.reps):
        common.settle(0.3)
        step += 1
        before = threads_cpu()
        started = time.perf_counter()
        handle = ckpt.save_async(step, trainer.state())
        called = time.perf_counter() - started
        assert handle is not None
        handle.result()
        alone.append({"call": called, "persist": time.perf_counter() - started, "threads": cpu_by_group(before)})
        ckpt.prune(keep=1)

        common.settle(0.3)
        free, free_wall, _, _ = count_python(deadline(0.5))
        step += 1
        started = time.perf_counter()
        handle = ckpt.save_async(step, trainer.state())
        assert handle is not None
        done, wall, on_cpu, delay = count_python(handle.done)
        handle.result()
        probed.append(
            {
                "persist": time.perf_counter() - started,
                "probe_wall": wall,
                "probe_lost": wall - done / (free / free_wall),
                "probe_asleep": max(wall - on_cpu - delay, 0.0),
                "probe_delay": delay,
            }
        )
        ckpt.prune(keep=1)
    ckpt.close()

    def med(values: list[float]) -> float:
        return statistics.median(values)

    per = 1e6 / arrays
    rows = [
        [
            "save_async call (blocking)",
            f"{med([a['call'] for a in alone]):.3f}",
            f"{med([a['call'] for a in alone]) * per:.0f}",
        ],
        [
            "persist, main thread asleep",
            f"{med([a['persist'] for a in alone]):.3f}",
            f"{med([a['persist'] for a in alone]) * per:.0f}",
        ],
    ]
    groups = sorted({g for a in alone for g in a["threads"]})
    labels = ("on CPU", "waiting for a CPU", "user (ticks)", "system (ticks)")
    for g in groups:
        if g == "MainThread":
            continue
        for i, label in enumerate(labels):
            v = med([a["threads"].get(g, [0.0] * 4)[i] for a in alone])
            if v > 0.0005:
                rows.append([f"  {g}: {label}", f"{v:.3f}", f"{v * per:.0f}"])
    rows += [
        [
            "persist, main thread running Python",
            f"{med([p['persist'] for p in probed]):.3f}",
            f"{med([p['persist'] for p in probed]) * per:.0f}",
        ],
        [
            "  the Python thread: progress lost",
            f"{med([p['probe_lost'] for p in probed]):.3f}",
            f"{med([p['probe_lost'] for p in probed]) * per:.0f}",
        ],
        [
            "  the Python thread: asleep (GIL)",
            f"{med([p['probe_asleep'] for p in probed]):.3f}",
            f"{med([p['probe_asleep'] for p in probed]) * per:.0f}",
        ],
        [
            "  the Python thread: waiting for a CPU",
            f"{med([p['probe_delay'] for p in probed]):.3f}",
            f"{med([p['probe_delay'] for p in probed]) * per:.0f}",
        ],
    ]
    for line in common.markdown_table(["per save_async (median)", "seconds", "us per array"], rows):
        out(line)
    out("\n" + coordinator_parts(trainer))
    common.settle(0.3)
    with counting() as counter:
        counted = moai_ckpt.Checkpointer(os.path.join(base, "arrays-counted"), capture_rng=False)
        counted.save(1, trainer.state())
        counted.close()
    out("\nwhat one save of these arrays did (calls; seconds summed over threads):")
    rows = [[k, str(n), f"{sec:.3f}"] for k, (n, sec) in sorted(counter.snapshot().items(), key=lambda kv: -kv[1][0])]
    for line in common.markdown_table(["call", "count", "seconds"], rows[:14]):
        out(line)
    common.settle(0.3)
    with profiled_threads() as profiles:
        fresh = moai_ckpt.Checkpointer(os.path.join(base, "arrays-profiled"), capture_rng=False)
        handle = fresh.save_async(1, trainer.state())
        assert handle is not None
        handle.result()
        fresh.close()
    out("\ncProfile (thread CPU time) of one save_async of these arrays, every thread, by own time:")
    for line in top_functions(profiles, 25):
        out("    " + line)
    out("\nthe coordinating thread (moai-save) alone, by cumulative CPU time:")
    for line in top_functions(profiles, 30, sort="cumulative", thread="moai-save"):
        out("    " + line)
    return {"arrays": arrays, "alone": alone, "probed": probed}


# -- part 2 and 3: save and restore against raw I/O ------------------------------------------------


def mirror_write(root: str, names: list[str], tensors: list[torch.Tensor], metadata: bool) -> None:
    """The same bytes in moai-ckpt's layout: a directory per array, one file per array (and a
    small zarr.json beside it), one syncfs at the end."""
    for name, t in zip(names, tensors, strict=True):
        directory = os.path.join(root, name, "c")
        os.makedirs(directory, exist_ok=True)
        fd = os.open(os.path.join(directory, "0"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = common.byte_view(t)
            done = 0
            while done < len(view):
                done += os.writev(fd, [view[done:]])
        finally:
            os.close(fd)
        if metadata:
            with open(os.path.join(root, name, "zarr.json"), "w") as f:
                f.write(json.dumps({"shape": list(t.shape), "dtype": str(t.dtype)}))
    syncfs_root(root)


def syncfs_root(root: str) -> None:
    storage = importlib.import_module("moai_ckpt.storage")
    fn = getattr(storage, "_SYNCFS", None)
    fd = os.open(root, os.O_RDONLY)
    try:
        if fn is not None:
            fn(fd)
        else:
            os.sync()
    finally:
        os.close(fd)


def mirror_read(root: str, names: list[str], buffers: list[torch.Tensor]) -> None:
    for name, b in zip(names, buffers, strict=True):
        fd = os.open(os.path.join(root, name, "c", "0"), os.O_RDONLY)
        try:
            view = common.byte_view(b)
            done = 0
            while done < len(view):
                done += os.readv(fd, [view[done:]])
        finally:
            os.close(fd)


def read_one(path: str, buffers: list[torch.Tensor]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        for b in buffers:
            view = common.byte_view(b)
            done = 0
            while done < len(view):
                done += os.readv(fd, [view[done:]])
    finally:
        os.close(fd)


def write_no_fsync(path: str, tensors: list[torch.Tensor]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t in tensors:
            view = common.byte_view(t)
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def crc_pass(tensors: list[torch.Tensor]) -> None:
    import crc32c

    for t in tensors:
        crc32c.crc32c(common.byte_view(t))


def first_touch(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        torch.empty_like(t).fill_(0)


def io_part(out: common.Output, args: argparse.Namespace, base: str, where: str, detail: bool) -> dict[str, Any]:
    """Save and restore against raw I/O in ``base``; ``detail``: also what moai-ckpt did, and cProfile."""
    cfg = EncoderConfig(layers=args.save_layers, d_model=1024, heads=16, batch=1, seq=8)
    trainer = Trainer(cfg, torch.device("cpu"))
    target = Trainer(cfg, torch.device("cpu"), seed=1)
    tensors = trainer.tensors()
    names = [f"t{i}" for i in range(len(tensors))]
    buffers = [torch.empty_like(t) for t in tensors]
    nbytes = trainer.nbytes
    out(
        f"\n## save and restore, {where}: {nbytes / 1e9:.2f} GB of state, {len(tensors)} tensors; {common.load_average()}"
    )
    paths = {
        "one": os.path.join(base, "raw.bin"),
        "mirror": os.path.join(base, "mirror"),
        "mirror-meta": os.path.join(base, "mirror-meta"),
        "nosync": os.path.join(base, "nosync.bin"),
        "moai": os.path.join(base, "moai"),
    }

    def moai_save() -> None:
        with moai_ckpt.Checkpointer(paths["moai"], capture_rng=False) as ckpt:
            ckpt.save(1, trainer.state(), overwrite=True)

    def moai_restore() -> None:
        with moai_ckpt.Checkpointer(paths["moai"], capture_rng=False) as ckpt:
            ckpt.restore(target.state())

    def fresh(path: str) -> None:
        common.fresh(path)

    saves: dict[str, Callable[[], object]] = {
        "raw: one file + fsync": lambda: common.raw_write(paths["one"], tensors),
        "raw: one file per array (moai-ckpt's directories) + syncfs": lambda: mirror_write(
            paths["mirror"], names, tensors, False
        ),
        "raw: same + a zarr.json per array": lambda: mirror_write(paths["mirror-meta"], names, tensors, True),
        "raw: one file, no fsync (page cache only)": lambda: write_no_fsync(paths["nosync"], tensors),
        "crc32c pass (one thread)": lambda: crc_pass(tensors),
        "memcpy of the bytes": lambda: [b.copy_(t) for b, t in zip(buffers, tensors, strict=True)],
        "moai-ckpt Checkpointer.save": moai_save,
    }
    save_paths = {
        "raw: one file + fsync": paths["one"],
        "raw: one file per array (moai-ckpt's directories) + syncfs": paths["mirror"],
        "raw: same + a zarr.json per array": paths["mirror-meta"],
        "raw: one file, no fsync (page cache only)": paths["nosync"],
        "moai-ckpt Checkpointer.save": paths["moai"],
    }
    restores: dict[str, Callable[[], object]] = {
        "raw: one file, cold": lambda: read_one(paths["one"], buffers),
        "raw: one file per array, cold": lambda: mirror_read(paths["mirror"], names, buffers),
        "raw: one file, warm (page cache)": lambda: read_one(paths["nosync"], buffers),
        "crc32c pass (one thread)": lambda: crc_pass(buffers),
        "first touch of new memory (empty + fill)": lambda: first_touch(tensors),
        "memcpy of the bytes": lambda: [t.copy_(b) for b, t in zip(buffers, target.tensors(), strict=True)],
        "moai-ckpt Checkpointer.restore, cold": moai_restore,
    }
    cold_paths = [paths["one"], paths["mirror"], paths["moai"]]
    save_times: dict[str, list[float]] = {k: [] for k in saves}
    restore_times: dict[str, list[float]] = {k: [] for k in restores}
    save_counts: dict[str, tuple[int, float]] = {}
    restore_counts: dict[str, tuple[int, float]] = {}
    save_phases: list[dict[str, tuple[int, float]]] = []
    restore_phases: list[dict[str, tuple[int, float]]] = []
    for rep in range(args.reps):
        keys = list(saves)
        for name in keys[rep % len(keys) :] + keys[: rep % len(keys)]:
            if name in save_paths and name != "moai-ckpt Checkpointer.save":
                fresh(save_paths[name])
            if name == "moai-ckpt Checkpointer.save":
                fresh(paths["moai"])
            common.settle(0.5)
            if name == "moai-ckpt Checkpointer.save":
                with phases() as timed_phases, counting() as counter:
                    save_times[name].append(common.timed(saves[name]))
                save_phases.append(timed_phases.snapshot())
                save_counts = counter.snapshot()
            else:
                save_times[name].append(common.timed(saves[name]))
        keys = list(restores)
        for name in keys[rep % len(keys) :] + keys[: rep % len(keys)]:
            common.make_cold(cold_paths, "fadvise")
            read_one(paths["nosync"], buffers)  # the warm file stays warm
            time.sleep(0.3)
            if name == "moai-ckpt Checkpointer.restore, cold":
                with phases() as timed_phases, counting() as counter:
                    start = time.perf_counter()
                    restores[name]()
                    restore_times[name].append(time.perf_counter() - start)
                restore_phases.append(timed_phases.snapshot())
                restore_counts = counter.snapshot()
            else:
                start = time.perf_counter()
                restores[name]()
                restore_times[name].append(time.perf_counter() - start)
        out(f"rep {rep + 1} done; {common.load_average()}")
    assert all(torch.equal(a, b) for a, b in zip(trainer.tensors(), target.tensors(), strict=True))

    files = [os.path.join(d, f) for d, _, fs in os.walk(paths["moai"]) for f in fs]
    dirs = sum(1 for _ in os.walk(paths["moai"]))
    out(f"a moai-ckpt snapshot of this state: {len(files)} files, {dirs} directories, {len(tensors)} arrays")
    result: dict[str, Any] = {"state_bytes": nbytes, "files": len(files), "dirs": dirs, "arrays": len(tensors)}
    for kind, times, timed_phases_list, counts in (
        ("save", save_times, save_phases, save_counts),
        ("restore", restore_times, restore_phases, restore_counts),
    ):
        out(f"\n### {kind}: {nbytes / 1e9:.2f} GB, median of {args.reps}")
        ref = statistics.median(times[next(iter(times))])
        rows = [
            [
                name,
                f"{statistics.median(v):.3f}",
                f"{nbytes / statistics.median(v) / 1e9:.2f}",
                f"{ref / statistics.median(v):.2f}",
                " ".join(f"{x:.3f}" for x in v),
            ]
            for name, v in times.items()
        ]
        for line in common.markdown_table(["what", "s", "GB/s", "x first row", "all runs"], rows):
            out(line)
        out(f"\n{kind}: phases of moai-ckpt (thread-seconds, median over repetitions; nested phases overlap):")
        keys = sorted(
            {k for p in timed_phases_list for k in p},
            key=lambda k: -statistics.median(p.get(k, (0, 0.0))[1] for p in timed_phases_list),
        )
        rows = [
            [
                k,
                str(timed_phases_list[-1].get(k, (0, 0.0))[0]),
                f"{statistics.median(p.get(k, (0, 0.0))[1] for p in timed_phases_list):.3f}",
            ]
            for k in keys
        ]
        for line in common.markdown_table(["phase", "calls", "seconds"], rows):
            out(line)
        result[kind] = {"times": times, "phases": timed_phases_list, "counts": counts}
        if not detail:
            continue
        out(f"\n{kind}: what moai-ckpt did (last repetition; seconds summed over threads):")
        rows = [[k, str(n), f"{s:.3f}"] for k, (n, s) in sorted(counts.items(), key=lambda kv: -kv[1][0])]
        for line in common.markdown_table(["call", "count", "seconds"], rows):
            out(line)

    if not detail:
        return result
    # one more of each under cProfile, every thread
    fresh(paths["moai"])
    common.settle(0.5)
    with profiled_threads() as profiles:
        moai_save()
    out("\ncProfile (thread CPU time) of one Checkpointer.save, every thread (top by own time):")
    for line in top_functions(profiles):
        out("    " + line)
    common.make_cold([paths["moai"]], "fadvise")
    with profiled_threads() as profiles:
        moai_restore()
    out("\ncProfile (thread CPU time) of one cold Checkpointer.restore, every thread (top by own time):")
    for line in top_functions(profiles):
        out("    " + line)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="loop,arrays,io,tmpfs", help="of loop, arrays, io, tmpfs")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--loop-layers", type=int, default=CPU.layers)
    parser.add_argument("--loop-d-model", type=int, help=f"width of the loop's model (default {CPU.d_model})")
    parser.add_argument("--loop-steps", type=int, default=24)
    parser.add_argument("--array-layers", type=int, default=24, help="encoder layers of the per-array part")
    parser.add_argument("--save-layers", type=int, default=8, help="encoder layers of width 1024 (8: 1.2 GB)")
    parser.add_argument("--dir", default="bench_out/persist_profile")
    parser.add_argument("--out", help="write persist_profile_cpu.json and .txt into this directory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = common.Output()
    base = os.path.abspath(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    out(f"# persist_profile, {time.strftime('%Y-%m-%d %H:%M')}: {common.machine()}; {common.load_average()}")
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": common.machine()}
    parts = args.parts.split(",")
    if "loop" in parts:
        result["loop"] = loop_part(out, args, base)
    if "arrays" in parts:
        result["arrays"] = arrays_part(out, args, base)
    if "io" in parts:
        result["io"] = io_part(out, args, base, f"on {base}'s disk", detail=True)
    if "tmpfs" in parts and os.path.isdir("/dev/shm"):
        shm = os.path.join("/dev/shm", f"moai-persist-profile-{os.getpid()}")
        os.makedirs(shm, exist_ok=True)
        try:
            where = "on tmpfs (no disk: fsync and syncfs return at once, reads come from memory)"
            result["tmpfs"] = io_part(out, args, shm, where, detail=False)
        finally:
            shutil.rmtree(shm, ignore_errors=True)
    out(f"\n{common.load_average()}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        out.save(os.path.join(args.out, "persist_profile_cpu.txt"))
        with open(os.path.join(args.out, "persist_profile_cpu.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
