"""What one `save_async` call costs its caller when nothing else runs: the capture and staging alone.

The end-to-end benchmark (`e2e_snapshot.py`) times calls inside a training loop, where a call may
share the interpreter with the previous snapshot's persist. This one waits for every persist
before the next call, so the figure is the call's own work: capture (walking and encoding the
state), pieces, host buffers, the copies of CPU tensors and the queueing of device copies. Calls
that reuse the capture plan of the previous save (`moai_ckpt.plan`) alternate with calls whose
plan was dropped first (a full capture, as every call made before plans existed), in one process.

Usage: OMP_NUM_THREADS=1 python benchmarks/stage_cost.py --layers 24 --d-model 64 --calls 40
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone

import torch

from benchmarks.encoder import EncoderConfig, Trainer
from moai_ckpt import Checkpointer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--calls", type=int, default=40, help="calls of each kind (planned, full)")
    parser.add_argument("--dir", default=None, help="run directory (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    cfg = EncoderConfig(layers=args.layers, d_model=args.d_model, heads=4, batch=2, seq=8)
    trainer = Trainer(cfg, device)
    tensors = trainer.tensors()
    gb = sum(t.numel() * t.element_size() for t in tensors) / 1e9
    print(
        f"# stage_cost, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, device {device}, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"state: {len(tensors)} tensors, {gb:.3f} GB; {cfg}")
    ckpt = Checkpointer(args.dir or tempfile.mkdtemp(prefix="stage_cost_"), fsync=False)
    times: dict[str, list[tuple[float, float]]] = {"planned": [], "full": []}
    ckpt.save_async(0, trainer.state()).result()  # type: ignore[union-attr]  # first call: the pool
    for i in range(2 * args.calls):
        kind = "full" if i % 2 else "planned"
        trainer.step()
        if kind == "full":
            ckpt._pool.plans.clear()
        wall, cpu = time.perf_counter(), time.thread_time()
        handle = ckpt.save_async(i + 1, trainer.state())
        times[kind].append((time.perf_counter() - wall, time.thread_time() - cpu))
        assert handle is not None
        handle.result()
    print(f"plan hits {ckpt._pool.plans.hits}, full captures {ckpt._pool.plans.misses}")
    print("| calls | n | blocking wall ms: min / median | thread CPU ms: min / median |")
    print("| --- | --- | --- | --- |")
    for kind, rows in times.items():
        walls, cpus = [w * 1e3 for w, _ in rows], [c * 1e3 for _, c in rows]
        print(
            f"| {kind} | {len(rows)} | {min(walls):.1f} / {statistics.median(walls):.1f} | "
            f"{min(cpus):.1f} / {statistics.median(cpus):.1f} |"
        )
    ckpt.close()


if __name__ == "__main__":
    main()
