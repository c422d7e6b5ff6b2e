"""A sharded save on 2 GPUs (NCCL, FSDP2) and a resharded 2 -> 1 restore.

Phase ``save`` runs under ``torchrun --nproc-per-node 2``: every rank shards a GPT-style stack
(default about 302M parameters + AdamW, about 3.6 GB) with ``fully_shard``, saves it with
``Checkpointer.save`` (and, for the stall, ``save_async``), and rank 0 records a sha256 of every
gathered full tensor. Phase ``restore`` runs as one process on one GPU: it restores the snapshot
into an unsharded model and optimizer and compares every tensor's digest with the record.

    torchrun --nproc-per-node 2 benchmarks/gpu_sharded.py --phase save --dir /tmp/sharded
    python benchmarks/gpu_sharded.py --phase restore --dir /tmp/sharded
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import moai_ckpt


def build(layers: int, d_model: int, device: str) -> tuple[nn.Module, list[nn.Module]]:
    torch.manual_seed(0)
    blocks = [nn.TransformerEncoderLayer(d_model, 16, 4 * d_model, batch_first=True) for _ in range(layers)]
    return nn.Sequential(*blocks).to(device), blocks


def populate(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    torch.manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)


def digests(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, str]:
    """sha256 of every full parameter and optimizer-state tensor (collective under FSDP2)."""
    out = {}
    for name, p in model.named_parameters():
        tensors = {"param": p, **{k: v for k, v in opt.state.get(p, {}).items() if isinstance(v, torch.Tensor)}}
        for key, t in sorted(tensors.items()):
            full = t.full_tensor() if hasattr(t, "full_tensor") else t
            out[f"{name}.{key}"] = hashlib.sha256(
                full.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            ).hexdigest()
    return out


def save_phase(args: argparse.Namespace) -> None:
    from torch.distributed.fsdp import fully_shard

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(rank)
    model, blocks = build(args.layers, args.d_model, f"cuda:{rank}" if cuda else "cpu")
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    populate(model, opt)
    run = os.path.join(args.dir, "run")
    ckpt = moai_ckpt.Checkpointer(run, capture_rng=False)
    timings = {}
    for step in (1, 2):
        dist.barrier()
        start = time.perf_counter()
        marker = ckpt.save(step, {"model": model, "optim": opt})
        timings[f"save {step}"] = time.perf_counter() - start
    stalls = []
    for step in (3, 4, 5):
        dist.barrier()
        start = time.perf_counter()
        handle = ckpt.save_async(step, {"model": model, "optim": opt})
        stalls.append(time.perf_counter() - start)
        assert handle is not None
        marker = handle.result()
    ckpt.prune(keep=1)
    record = digests(model, opt)
    ckpt.close()
    local = sum(t.to_local().numel() * t.element_size() for t in list(model.parameters()))
    mine = {"rank": rank, "local_param_bytes": local, "stalls": stalls, **timings}
    gathered = ckpt.world.all_gather_json(mine, "benchmark results")
    if rank == 0:
        with open(os.path.join(args.dir, "digests.json"), "w") as f:
            json.dump(record, f)
        total = marker.body.total_bytes
        name = torch.cuda.get_device_name(0) if cuda else "CPU"
        print(f"\nsharded save on {dist.get_world_size()} x {name}: {total / 1e9:.2f} GB")
        print(f"{'rank':>4} {'save 1 s':>9} {'save 2 s':>9} {'GB/s':>6} {'async stalls s':>22}")
        for g in gathered:
            print(
                f"{g['rank']:>4} {g['save 1']:>9.2f} {g['save 2']:>9.2f} {total / g['save 2'] / 1e9:>6.2f} "
                f"{' '.join(f'{s:.3f}' for s in g['stalls']):>22}"
            )
        written = [r.key for r in ckpt.marker().body.ranks]
        print(f"rank indexes: {written}")
    dist.destroy_process_group()


def restore_phase(args: argparse.Namespace) -> None:
    cuda = args.device == "cuda"
    model, _ = build(args.layers, args.d_model, "cuda:0" if cuda else "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ckpt = moai_ckpt.Checkpointer(os.path.join(args.dir, "run"), capture_rng=False)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    step = ckpt.restore({"model": model, "optim": opt})
    sync()
    elapsed = time.perf_counter() - start
    with open(os.path.join(args.dir, "digests.json")) as f:
        expected = json.load(f)
    actual = digests(model, opt)
    mismatched = sorted(k for k in expected if actual.get(k) != expected[k])
    manifest = ckpt.manifest(step)
    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"\n2 -> 1 restore of step {step} (saved by {manifest.world_size} ranks) on {name}")
    print(f"restore {elapsed:.2f} s; tensors compared {len(expected)}; mismatched {len(mismatched)} {mismatched[:3]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["save", "restore"], required=True)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--dir", default="bench_out/sharded")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: gloo, for a dry run")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    (save_phase if args.phase == "save" else restore_phase)(args)


if __name__ == "__main__":
    main()
