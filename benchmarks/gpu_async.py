"""Asynchronous snapshots on a GPU: the training stall and the background persist, side by side.

Builds a GPT-style stack (default: 24 layers of d_model 1024, about 302M parameters) with AdamW
state on the GPU (about 3.6 GB of training state) and measures, in one run:

- the floor for a stall: a pinned device-to-host copy of every state tensor (preallocated buffers);
- the floor for persisting: raw sequential write+fsync of the same bytes to the same disk;
- moai-ckpt ``save_async``: how long it blocks (first call, which allocates the pinned pool, and
  the steady state), and the background time until the commit marker is durable;
- DCP ``async_save``: its blocking time (first, then steady) and time until its future completes.

    python benchmarks/gpu_async.py --dir /tmp/moai-bench --reps 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

import moai_ckpt


def build(layers: int, d_model: int, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    blocks = [nn.TransformerEncoderLayer(d_model, 16, 4 * d_model, batch_first=True) for _ in range(layers)]
    model = nn.Sequential(*blocks).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return model, opt


def state_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = list(model.state_dict().values())
    for s in opt.state_dict()["state"].values():
        out += [v for v in s.values() if isinstance(v, torch.Tensor)]
    return out


def pinned_copy_floor(tensors: list[torch.Tensor], reps: int) -> tuple[float, list[torch.Tensor]]:
    buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    times = []
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for b, t in zip(buffers, tensors, strict=True):
            b.copy_(t, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), buffers


def moai_runs(base: str, state: dict[str, Any], reps: int) -> list[dict[str, float]]:
    path = os.path.join(base, "moai")
    shutil.rmtree(path, ignore_errors=True)
    ckpt = moai_ckpt.Checkpointer(path, capture_rng=False)
    runs = []
    for rep in range(reps):
        common.settle()
        start = time.perf_counter()
        handle = ckpt.save_async(rep, state)
        blocked = time.perf_counter() - start
        assert handle is not None
        handle.result()
        total = time.perf_counter() - start
        runs.append({"stall": blocked, "total": total, "persist": total - blocked})
        ckpt.prune(keep=1)
    ckpt.close()
    return runs


def dcp_runs(base: str, model: nn.Module, opt: torch.optim.Optimizer, reps: int) -> list[dict[str, float]]:
    runs = []
    for rep in range(reps):
        path = os.path.join(base, f"dcp{rep}")
        shutil.rmtree(path, ignore_errors=True)
        common.settle()
        start = time.perf_counter()
        future = dcp.async_save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=path)
        blocked = time.perf_counter() - start
        future.result()
        total = time.perf_counter() - start
        runs.append({"stall": blocked, "total": total, "persist": total - blocked})
        if rep:
            shutil.rmtree(os.path.join(base, f"dcp{rep - 1}"), ignore_errors=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default="bench_out/gpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    os.makedirs(args.dir, exist_ok=True)
    if not dist.is_initialized():  # DCP's async_save wants a process group; a world of one
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{common_port()}", rank=0, world_size=1)
    device = torch.device("cuda", 0)
    model, opt = build(args.layers, args.d_model, device)
    tensors = state_tensors(model, opt)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    params = sum(p.numel() for p in model.parameters())
    floor, buffers = pinned_copy_floor(tensors, args.reps)
    raws = []
    for _ in range(args.reps):
        common.settle()
        raws.append(common.raw_write(os.path.join(args.dir, "raw.bin"), buffers))
    raw = statistics.median(raws)
    os.unlink(os.path.join(args.dir, "raw.bin"))
    del buffers
    state = {"model": model, "optim": opt}
    moai = moai_runs(args.dir, state, args.reps)
    theirs = dcp_runs(args.dir, model, opt, args.reps)

    check = moai_ckpt.Checkpointer(os.path.join(args.dir, "moai"), capture_rng=False)
    fresh, fresh_opt = build(args.layers, args.d_model, device)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    check.restore({"model": fresh, "optim": fresh_opt})
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))

    gb = nbytes / 1e9
    rows = [
        ("pinned D2H copy (floor)", floor, floor, None, None),
        ("raw write+fsync (floor)", None, None, raw, raw),
        (
            "moai-ckpt save_async",
            moai[0]["stall"],
            steady(moai, "stall"),
            steady(moai, "persist"),
            steady(moai, "total"),
        ),
        (
            "DCP async_save",
            theirs[0]["stall"],
            steady(theirs, "stall"),
            steady(theirs, "persist"),
            steady(theirs, "total"),
        ),
    ]
    print(
        f"\n{torch.cuda.get_device_name(0)}; state {gb:.2f} GB ({params / 1e6:.0f}M parameters + AdamW); {common.machine()}"
    )
    print(f"restored snapshot equals the live state bitwise: {same}")
    header = f"{'method':<26}{'stall first':>12}{'stall steady':>13}{'x floor':>9}{'persist s':>11}{'GB/s':>7}{'x raw':>7}{'total s':>9}"
    print(header)
    print("-" * len(header))
    for name, first, stall, persist, total in rows:
        print(
            f"{name:<26}{fmt(first):>12}{fmt(stall):>13}{fmt(stall / floor if stall else None):>9}"
            f"{fmt(persist):>11}{fmt(gb / persist if persist else None):>7}{fmt(raw / persist if persist else None):>7}{fmt(total):>9}"
        )
    ratio = steady(theirs, "stall") / steady(moai, "stall")
    print(
        f"steady stall: moai-ckpt {steady(moai, 'stall'):.3f} s vs DCP {steady(theirs, 'stall'):.3f} s ({ratio:.1f}x shorter)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name(0),
                    "state_bytes": nbytes,
                    "params": params,
                    "pinned_copy_floor_s": floor,
                    "raw_write_fsync_s": raw,
                    "moai": moai,
                    "dcp": theirs,
                    "bitwise_restore": same,
                    "machine": common.machine(),
                    "date": time.strftime("%Y-%m-%d"),
                },
                f,
                indent=1,
            )
    dist.destroy_process_group()


def steady(runs: list[dict[str, float]], key: str) -> float:
    later = runs[1:] or runs
    return statistics.median(r[key] for r in later)


def fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def common_port() -> int:
    from moai_ckpt.testing.dist import free_port

    return free_port()


if __name__ == "__main__":
    main()
