"""Per-step cost of fault_tolerant's logging, against the same loop without it (CPU).

A small transformer language-model step (examples/quickstart.py's model) runs ``--steps`` times
plainly, then under ``moai_ckpt.fault_tolerant`` (no snapshot inside the window) with the log
flushed every step (the default: each step durable when it ends) and with group commit, each in
a fresh run directory, interleaved over repetitions.

    python benchmarks/log_overhead.py --steps 40 --reps 3 --dir bench_out/log
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import quickstart

import moai_ckpt


def plain(steps: int) -> float:
    run = quickstart.Run(seed=0, steps=steps + 1)
    start = time.perf_counter()
    for _ in range(steps):
        run.step()
    return (time.perf_counter() - start) / steps


def logged(directory: str, steps: int, flush_every: int) -> float:
    shutil.rmtree(directory, ignore_errors=True)
    timings: list[float] = []

    @moai_ckpt.fault_tolerant(storage=directory, snapshot_every=10**9, log_flush_every=flush_every)
    def train(run: moai_ckpt.Run) -> None:
        inner = quickstart.Run(seed=0, steps=steps + 1)
        run.track(model=inner.model, optim=inner.optim)
        start = 0.0
        for step in run.steps(steps + 1):
            if step == 2:
                start = time.perf_counter()  # the first step includes the initial snapshot
            loss = inner.step()
            run.record(loss=loss)
        timings.append((time.perf_counter() - start) / steps)

    train()
    return timings[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default="bench_out/log")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.dir, exist_ok=True)
    results: dict[str, list[float]] = {"no log": [], "log, every step durable": [], "log, group commit of 16": []}
    for _ in range(args.reps):
        results["no log"].append(plain(args.steps))
        results["log, every step durable"].append(logged(os.path.join(args.dir, "r1"), args.steps, 1))
        results["log, group commit of 16"].append(logged(os.path.join(args.dir, "r16"), args.steps, 16))
    base = statistics.median(results["no log"])
    print(f"\nper-step time over {args.steps} steps, median of {args.reps} (torch {torch.__version__}, CPU, 1 thread)")
    print(f"{'method':<28}{'ms/step':>10}{'overhead':>10}   all runs (ms)")
    for name, values in results.items():
        med = statistics.median(values)
        runs = " ".join(f"{v * 1e3:.1f}" for v in values)
        print(f"{name:<28}{med * 1e3:>10.2f}{(med / base - 1) * 100:>9.1f}%   {runs}")


if __name__ == "__main__":
    main()
