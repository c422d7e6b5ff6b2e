"""Save and restore throughput of Checkpointer against the disk floor and the peers, side by side.

Builds a training state of about ``--size-gb`` GB (an MLP stack + AdamW with populated moments)
and, in one run with interleaved repetitions, times on the same directory:

save:    raw sequential write+fsync of the same bytes (the floor), torch.save + fsync,
         DCP save (fsync on), a naive zarr-python write (bytes + crc32c codecs) + fsync,
         Checkpointer.save (fsync on, commit included)
restore: raw sequential read into preallocated memory (the floor), torch.load(weights_only) +
         load_state_dict, DCP load in place, Checkpointer.restore (all checks, then copy in)

Each repetition runs every method once, in an order rotated from the last (saves first, then the
restores): a noisy disk gets spread over all methods alike. Every restore reads cold data: the
written files are evicted from the page cache first (``posix_fadvise(DONTNEED)`` after fsync).

    python benchmarks/save_restore.py --size-gb 1.2 --reps 3 --dir bench_out
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

import moai_ckpt


def build_state(size_gb: float, width: int = 2048) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """An MLP stack whose params + AdamW moments take about ``size_gb`` GB."""
    per_layer = (width * width + width) * 4 * 3  # params, exp_avg, exp_avg_sq
    layers = max(1, round(size_gb * 1e9 / per_layer))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def state_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = list(model.state_dict().values())
    for s in opt.state_dict()["state"].values():
        out.extend(v for v in s.values() if isinstance(v, torch.Tensor))
    return out


def raw_read(path: str, buffers: list[torch.Tensor]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        for t in buffers:
            view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            done = 0
            while done < len(view):
                n = os.readv(fd, [view[done:]])
                if n == 0:
                    raise EOFError(path)
                done += n
    finally:
        os.close(fd)


def torch_save(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    with open(path, "wb") as f:
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())


def torch_restore(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])


def dcp_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def naive_zarr_save(path: str, tensors: list[torch.Tensor]) -> None:
    import zarr
    from zarr.codecs import Crc32cCodec

    group = zarr.open_group(path, mode="w")
    for i, t in enumerate(tensors):
        arr = group.create_array(
            f"t{i}", shape=tuple(t.shape), dtype="float32", chunks=tuple(t.shape), compressors=[Crc32cCodec()]
        )
        arr[...] = t.numpy()
    common.fsync_tree(path)


def moai_save(path: str, state: dict[str, Any]) -> None:
    # closed, so its lease's renewal thread stops: it would write into the directory the next
    # repetition deletes
    with moai_ckpt.Checkpointer(path, capture_rng=False) as ckpt:
        ckpt.save(1, state)


def moai_restore(path: str, state: dict[str, Any]) -> None:
    with moai_ckpt.Checkpointer(path, capture_rng=False) as ckpt:
        ckpt.restore(state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default="bench_out")
    parser.add_argument("--json", default=None, help="write the raw timings here")
    parser.add_argument("--skip", default="", help="comma-separated methods to skip (e.g. zarr-naive)")
    parser.add_argument(
        "--restore-only",
        action="store_true",
        help="only time restores of what an earlier run left in --dir (data written long ago: no "
        "cache anywhere between here and the disk still holds it)",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    console = Console()
    os.makedirs(args.dir, exist_ok=True)
    base = os.path.abspath(args.dir)

    model, opt = build_state(args.size_gb)
    tensors = state_tensors(model, opt)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    target_model, target_opt = build_state(args.size_gb)  # same structure, restored into
    buffers = [torch.empty_like(t) for t in tensors]
    console.print(f"state: {len(tensors)} tensors, {nbytes / 1e9:.2f} GB; machine: {common.machine()}")

    paths = {
        "raw": os.path.join(base, "raw.bin"),
        "torch.save": os.path.join(base, "torch.pt"),
        "DCP": os.path.join(base, "dcp"),
        "zarr-naive": os.path.join(base, "zarr-naive"),
        "moai-ckpt": os.path.join(base, "moai"),
    }
    skip = set(filter(None, args.skip.split(",")))
    state = {"model": model, "optim": opt}
    save_fns = {
        "raw": lambda: common.raw_write(paths["raw"], tensors),
        "torch.save": lambda: torch_save(paths["torch.save"], model, opt),
        "DCP": lambda: dcp.save(dcp_state(model, opt), checkpoint_id=paths["DCP"]),
        "zarr-naive": lambda: naive_zarr_save(paths["zarr-naive"], tensors),
        "moai-ckpt": lambda: moai_save(paths["moai-ckpt"], state),
    }
    restore_fns = {
        "raw": lambda: raw_read(paths["raw"], buffers),
        "torch.save": lambda: torch_restore(paths["torch.save"], target_model, target_opt),
        "DCP": lambda: dcp.load(dcp_state(target_model, target_opt), checkpoint_id=paths["DCP"]),
        "moai-ckpt": lambda: moai_restore(paths["moai-ckpt"], {"model": target_model, "optim": target_opt}),
    }
    saves = {k: common.Series(k) for k in save_fns if k not in skip}
    restores = {k: common.Series(k) for k in restore_fns if k not in skip}
    written: dict[str, int] = {}
    for rep in range(args.reps):
        # interleaved and rotated: every method once per repetition, starting from a different one
        order = list(saves)[rep % len(saves) :] + list(saves)[: rep % len(saves)]
        for name in order:
            if args.restore_only:
                saves[name].seconds.append(float("nan"))
                written[name] = common.tree_bytes(paths[name])
                continue
            common.fresh(paths[name])
            saves[name].seconds.append(common.timed(save_fns[name]))
            written[name] = common.tree_bytes(paths[name])
        for name in order:
            common.drop_cache(paths[name])
        for name in order:
            if name in restores:
                restores[name].seconds.append(common.timed(restore_fns[name]))
        console.print(
            f"rep {rep + 1}/{args.reps}: "
            + ", ".join(
                f"{n} save {saves[n].seconds[-1]:.2f}"
                + (f" / restore {restores[n].seconds[-1]:.2f}" if n in restores else "")
                for n in order
            )
        )
    with moai_ckpt.Checkpointer(paths["moai-ckpt"], capture_rng=False) as ckpt:
        check = ckpt.verify(1)
    assert check.ok, check.faults
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), target_model.state_dict().values(), strict=True)
    )

    if not args.restore_only:
        console.print(render("save", saves, nbytes, written, peers=("DCP",)))
    console.print(render("restore", restores, nbytes, written, peers=("DCP", "torch.save")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": common.machine(),
                    "date": time.strftime("%Y-%m-%d"),
                    "state_bytes": nbytes,
                    "save": {k: v.seconds for k, v in saves.items()},
                    "restore": {k: v.seconds for k, v in restores.items()},
                },
                f,
                indent=1,
            )


def render(
    kind: str, series: dict[str, common.Series], nbytes: int, written: dict[str, int], peers: tuple[str, ...]
) -> Table:
    floor = series["raw"].median
    table = Table(
        title=f"{kind} of {nbytes / 1e9:.2f} GB (median of {len(series['raw'].seconds)}, cold cache for reads)"
    )
    table.add_column("method")
    table.add_column("seconds", justify="right")
    table.add_column("GB/s", justify="right")
    table.add_column("x raw", justify="right")
    for peer in peers:
        if peer in series:
            table.add_column(f"x {peer}", justify="right")
    table.add_column("GB on disk", justify="right")
    table.add_column("all runs (s)")
    for name, s in series.items():
        row = [name, f"{s.median:.2f}", f"{nbytes / s.median / 1e9:.2f}", f"{floor / s.median:.2f}"]
        row += [f"{series[p].median / s.median:.2f}" for p in peers if p in series]
        row.append(f"{written[name] / 1e9:.2f}" if name in written else "")
        row.append(" ".join(f"{x:.2f}" for x in s.seconds))
        table.add_row(*row)
    return table


if __name__ == "__main__":
    main()
