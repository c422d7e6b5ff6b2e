"""What checking "replicated" costs a distributed save: digests of the state, against a copy of it.

A distributed save digests every tensor it takes as replicated (`moai_ckpt.digest`), so the ranks
can compare them in the planning all-gather and store per rank those that differ. This times,
in one run with interleaved repetitions, on a state of about ``--size-mb`` MB (Linear layers +
BatchNorm buffers + AdamW moments, as a DDP job holds on every rank):

cpu:   digest   ``digest_tensors(named).wait()`` on CPU tensors (crc32c of the bytes)
       copy     ``torch.empty_like(t).copy_(t)`` of the same tensors (a memory-speed floor)
       save     one single-process ``Checkpointer.save`` of the same state (fsync off; context)
cuda:  digest   device word sums of the same state on the GPU, read back through an event
       d2h      the same state copied to pinned host memory (what a save stages anyway)

    python benchmarks/replicated_check.py --size-mb 512 --reps 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moai_ckpt
from moai_ckpt.digest import digest_tensors


def build_state(size_mb: int, width: int = 1024) -> dict[str, torch.Tensor]:
    """Named tensors of a Linear + BatchNorm stack with AdamW moments, about ``size_mb`` MB."""
    layer_bytes = 3 * (width * width + 5 * width) * 4  # weight, bias, bn buffers, two moments
    layers = max(1, size_mb * (1 << 20) // layer_bytes)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for i in range(layers):
        for name, shape in (("weight", (width, width)), ("bias", (width,))):
            for slot in ("", ".exp_avg", ".exp_avg_sq"):
                state[f"l{i}.{name}{slot}"] = torch.randn(shape, generator=gen)
        state[f"bn{i}.running_mean"] = torch.randn(width, generator=gen)
        state[f"bn{i}.running_var"] = torch.rand(width, generator=gen)
    return state


def best_and_median(fn: Callable[[], object], reps: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    state = build_state(args.size_mb)
    named = list(state.items())
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    scratch = tempfile.mkdtemp(prefix="moai-replicated-")
    rows: list[tuple[str, str, list[float]]] = []

    def save() -> None:
        run = os.path.join(scratch, f"run-{time.monotonic_ns()}")
        with moai_ckpt.Checkpointer(run, fsync=False, capture_rng=False) as ckpt:
            ckpt.save(1, {"model": state})
        shutil.rmtree(run)

    cpu = {
        "digest": lambda: digest_tensors(named).wait(),
        "copy": lambda: [torch.empty_like(t).copy_(t) for t in state.values()],
        "save": save,
    }
    timings: dict[str, list[float]] = {k: [] for k in cpu}
    for rep in range(args.reps):  # interleaved, each repetition in a rotated order
        order = list(cpu)[rep % len(cpu) :] + list(cpu)[: rep % len(cpu)]
        for name in order:
            timings[name] += best_and_median(cpu[name], 1)
    rows += [("cpu", name, times) for name, times in timings.items()]
    if torch.cuda.is_available():
        device = [(n, t.cuda()) for n, t in named]
        pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for _, t in device]

        def d2h() -> None:
            for buf, (_, t) in zip(pinned, device, strict=True):
                buf.copy_(t, non_blocking=True)

        gpu = {"digest": lambda: digest_tensors(device).wait(), "d2h": d2h}
        gpu_times: dict[str, list[float]] = {k: [] for k in gpu}
        for rep in range(args.reps + 1):
            for name in list(gpu)[rep % 2 :] + list(gpu)[: rep % 2]:
                t = best_and_median(gpu[name], 1, torch.cuda.synchronize)
                if rep:  # the first round warms the kernels up
                    gpu_times[name] += t
        rows += [(torch.cuda.get_device_name(), name, times) for name, times in gpu_times.items()]
    shutil.rmtree(scratch, ignore_errors=True)

    table = Table(title=f"checking 'replicated': {nbytes / 1e6:.0f} MB in {len(named)} tensors, {args.reps} reps")
    for column in ("device", "operation", "median s", "best s", "GB/s (best)", "x copy"):
        table.add_column(column, justify="right" if column not in ("device", "operation") else "left")
    floors = {dev: statistics.median(t) for dev, name, t in rows if name in ("copy", "d2h")}
    for dev, name, times in rows:
        median, best = statistics.median(times), min(times)
        table.add_row(
            dev, name, f"{median:.4f}", f"{best:.4f}", f"{nbytes / best / 1e9:.2f}", f"{median / floors[dev]:.2f}"
        )
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
