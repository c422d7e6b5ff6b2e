"""Restore into live objects, cold: moai-ckpt against the raw read floor, torch.load and DCP load.

The state is the encoder stack of `encoder.py` with AdamW (on a GPU by default: 3.6 GB, the
objects on the GPU; on a CPU: 8 layers of width 1024, 1.2 GB). Each repetition takes every method
in turn, order rotated: writes the state its way (durably), evicts it from the page cache,
restores it into a second set of live objects built the same way, and compares them with the
saved ones. Writing right before reading gives every method's files the same age when read (a
virtual disk's host may cache recent writes below the guest); the writes are timed too.

- ``raw``: the same bytes read sequentially from one file; on CUDA into preallocated pinned
  buffers, each tensor copied to its live device tensor as soon as it is read (the floor); on
  CPU straight into the live tensors;
- ``torch.load``: ``torch.load(weights_only=True)`` then ``load_state_dict`` of model and optimizer;
- ``DCP``: ``torch.distributed.checkpoint.load`` in place into the live state dicts;
- ``moai-ckpt``: ``Checkpointer.restore`` (every check first, then the objects are loaded).

Cold means: ``--cold drop_caches`` writes 3 to /proc/sys/vm/drop_caches (root on a machine of its
own: page cache, dentries and inodes); ``--cold fadvise`` fsyncs each file and evicts it with
``posix_fadvise(DONTNEED)`` (only this benchmark's files: for shared machines); ``auto`` takes the
first when it is allowed (the output says which was used).

    python benchmarks/restore_cold.py                         # GPU: 3.6 GB into GPU objects
    OMP_NUM_THREADS=1 python benchmarks/restore_cold.py --device cpu --cold fadvise --out docs/results
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
from encoder import EncoderConfig, Trainer, default_config

import moai_ckpt

CPU_RESTORE = EncoderConfig(layers=8, d_model=1024, heads=16, batch=1, seq=8)


def raw_restore(path: str, targets: list[torch.Tensor], pinned: list[torch.Tensor] | None) -> None:
    """Read the file sequentially; into ``pinned`` and then each tensor to its device target, or
    (no ``pinned``) straight into the CPU targets."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        for i, target in enumerate(targets):
            into = pinned[i] if pinned is not None else target
            view = common.byte_view(into)
            done = 0
            while done < len(view):
                n = os.readv(fd, [view[done:]])
                if n == 0:
                    raise EOFError(path)
                done += n
            if pinned is not None:
                target.copy_(into, non_blocking=True)
    finally:
        os.close(fd)
    if pinned is not None:
        torch.cuda.synchronize()


def writers(source: Trainer, paths: dict[str, str]) -> dict[str, Callable[[], object]]:
    """Each method's durable write of the state (raw from a host copy made beforehand)."""
    host = [t.detach().cpu() for t in source.tensors()]

    def torch_save() -> None:
        with open(paths["torch.load"], "wb") as f:
            torch.save(source.state_dict(), f)
            f.flush()
            os.fsync(f.fileno())

    def moai_save() -> None:
        with moai_ckpt.Checkpointer(paths["moai-ckpt"], capture_rng=False) as ckpt:
            ckpt.save(1, source.state())

    return {
        "raw": lambda: common.raw_write(paths["raw"], host),
        "torch.load": torch_save,
        "DCP": lambda: dcp.save(
            source.state_dict(), storage_writer=dcp.FileSystemWriter(paths["DCP"], sync_files=True)
        ),
        "moai-ckpt": moai_save,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cold", choices=("auto", "drop_caches", "fadvise"), default="auto")
    parser.add_argument("--dir", default="bench_out/restore_cold", help="where the files go (a local disk)")
    parser.add_argument("--out", help="write restore_cold_<device>.json and .txt into this directory")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--budget-s", type=float, default=0.0, help="start no repetition after this many seconds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    base_cfg = default_config(device) if cuda else CPU_RESTORE
    cfg = EncoderConfig(
        layers=args.layers or base_cfg.layers,
        d_model=args.d_model or base_cfg.d_model,
        heads=base_cfg.heads,
        batch=1,
        seq=8,
    )
    cold = common.cold_cache_mode(args.cold)
    out = common.Output()
    base = os.path.abspath(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    source = Trainer(cfg, device, seed=0)
    target = Trainer(cfg, device, seed=1)  # other values, same structure: what a restart has built
    nbytes = source.nbytes
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {args.threads} torch thread(s)"
    out(f"# restore_cold, {time.strftime('%Y-%m-%d %H:%M')}: {where}; {common.machine()}")
    out(
        f"state {nbytes / 1e9:.3f} GB ({source.params / 1e6:.1f}M parameters + AdamW, {len(source.tensors())} "
        f"tensors) restored into live {device.type} objects; cold cache by {cold}; {args.reps} repetitions; "
        f"files in {base}; {common.load_average()}"
    )
    paths = {
        "raw": os.path.join(base, "raw.bin"),
        "torch.load": os.path.join(base, "state.pt"),
        "DCP": os.path.join(base, "dcp"),
        "moai-ckpt": os.path.join(base, "moai"),
    }
    write = writers(source, paths)
    expected = source.tensors()
    pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in expected] if cuda else None

    def live() -> list[torch.Tensor]:
        return target.tensors()

    def torch_restore() -> None:
        state = torch.load(paths["torch.load"], weights_only=True)
        target.model.load_state_dict(state["model"])
        target.opt.load_state_dict(state["optim"])

    restores: dict[str, Callable[[], Any]] = {
        "raw": lambda: raw_restore(paths["raw"], live(), pinned),
        "torch.load": torch_restore,
        "DCP": lambda: dcp.load(target.state_dict(), checkpoint_id=paths["DCP"]),
        "moai-ckpt": lambda: moai_ckpt.Checkpointer(paths["moai-ckpt"], capture_rng=False).restore(target.state()),
    }
    times: dict[str, list[float]] = {k: [] for k in restores}
    wrote: dict[str, list[float]] = {k: [] for k in restores}
    bitwise: dict[str, bool] = dict.fromkeys(restores, True)
    names = list(restores)
    used: set[str] = set()
    for rep in range(args.reps):
        if rep and args.budget_s and time.perf_counter() - began > args.budget_s:
            out(f"time budget of {args.budget_s:.0f} s spent: stopped after {rep} repetition(s)")
            break
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            # written right before it is read, so every method's files are the same age when read
            # (a virtual disk's host may cache recent writes below the guest's page cache)
            common.fresh(paths[name])
            wrote[name].append(common.timed(write[name]))
            with torch.no_grad():
                for t in live():
                    t.zero_()  # a restore that does nothing shows as a mismatch
            target.sync()
            used.add(common.make_cold([paths[name]], cold))
            time.sleep(0.5)
            start = time.perf_counter()
            restores[name]()
            target.sync()
            times[name].append(time.perf_counter() - start)
            same = all(torch.equal(a, b) for a, b in zip(live(), expected, strict=True))
            bitwise[name] = bitwise[name] and same
        out(
            f"rep {rep + 1}: "
            + ", ".join(f"{n} written {wrote[n][-1]:.2f} s, restored {times[n][-1]:.3f} s" for n in order)
            + f"; {common.load_average()}"
        )

    out("")
    out(f"cold cache made by: {', '.join(sorted(used))}")
    med = {k: common.median(v) for k, v in times.items()}
    header = ["restore (cold)", "s (median)", "GB/s", "x raw", "x DCP", "x torch.load", "bitwise", "all runs (s)"]
    rows = [
        [
            name,
            f"{m:.3f}",
            f"{nbytes / m / 1e9:.2f}",
            f"{med['raw'] / m:.2f}",
            f"{med['DCP'] / m:.2f}",
            f"{med['torch.load'] / m:.2f}",
            "yes" if bitwise[name] else "NO",
            " ".join(f"{x:.3f}" for x in times[name]),
        ]
        for name, m in med.items()
    ]
    for line in common.markdown_table(header, rows):
        out(line)
    out("")
    out("the writes before them (durable; raw from a host copy made beforehand), seconds:")
    for name, v in wrote.items():
        out(
            f"  {name:<12} median {common.median(v):.3f} ({nbytes / common.median(v) / 1e9:.2f} GB/s); all: {' '.join(f'{x:.2f}' for x in v)}"
        )
    out(common.load_average())
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": where,
        "machine": common.machine(),
        "torch": torch.__version__,
        "state_bytes": nbytes,
        "cold": sorted(used),
        "args": vars(args),
        "write_s": wrote,
        "restore_s": times,
        "bitwise": bitwise,
    }
    name = f"restore_cold_{'gpu' if cuda else 'cpu'}"
    out.write_results(name, result, args.out, args.json)
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
