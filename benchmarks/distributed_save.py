"""Distributed save (and restore) throughput of Checkpointer on CPU gloo ranks, against the disk floor and DCP.

Starts ``--ranks`` real processes joined in a gloo group (`moai_ckpt.testing.dist.launch`). Each
rank builds the same MLP stack (Linear 2048x2048 layers; params + AdamW moments of about
``--size-gb`` GB across the whole world), shards it with FSDP2 ``fully_shard`` (every layer, then
the root), and runs one AdamW step on fixed pseudo-random gradients so the moments exist. Each rank
then holds ``1/ranks`` of the state as DTensor shards. In one run, with interleaved repetitions,
the ranks time together:

save:    raw    every rank writes its local shard bytes (params + moments, the bytes moai-ckpt
                writes for that rank) sequentially to a file of its own, then fsync (the floor)
         DCP    torch.distributed.checkpoint.save of {"model": model.state_dict(),
                "optim": opt.state_dict()} (DTensor shards, one .distcp file per rank, fsync on)
         moai-ckpt  Checkpointer(dir, capture_rng=False).save(step, {"model": ..., "optim": ...})
                (fsync and commit included; a fresh directory every time)
restore: raw    every rank reads its own file back into preallocated memory (the floor)
         DCP    torch.distributed.checkpoint.load in place into the same state dicts
         moai-ckpt  Checkpointer.restore into the same FSDP2 model and optimizer (all checks)

Every timed operation starts with ``os.sync`` and a short sleep (a quiet disk), then a
``dist.barrier``; it ends with another barrier, so a time is the slowest rank's (barrier to
barrier). Each repetition runs every method once, in an order rotated from the last (saves first,
then restores), so a noisy disk is spread over all methods alike. Restores read cold data: the
written files are evicted from the page cache first. GB/s is the whole world's state bytes over
that time. A Checkpointer is built inside the timed region, as in ``save_restore.py``; it is given
a gloo group made once up front (what a training job does), so no group is created while timing.
After the runs, the state is zeroed and restored from the last moai-ckpt snapshot, and every rank
checks it got its exact bytes back.

    python benchmarks/distributed_save.py --ranks 2 --size-gb 1.0 --reps 3 --dir bench_out/dist

Rank 0 logs progress to ``<dir>/progress.log`` (echoed here live); ``--json PATH`` keeps every
timing of every rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from rich.console import Console
from rich.table import Table
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
from common import raw_write
from save_restore import raw_read

import moai_ckpt
from moai_ckpt.format import CommitMarker
from moai_ckpt.layout import rank_index_key
from moai_ckpt.testing.dist import launch

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("raw", "DCP", "moai-ckpt")
STEP = 1
WIDTH = 2048

# -- on every rank ------------------------------------------------------------------------------


def build_sharded_state(size_gb: float, width: int = WIDTH) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The MLP stack of ``save_restore.build_state``, FSDP2-sharded, after one AdamW step."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    per_layer = (width * width + width) * 4 * 3  # params, exp_avg, exp_avg_sq
    layers = max(1, round(size_gb * 1e9 / per_layer))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rank = dist.get_rank()
    for i, p in enumerate(model.parameters()):
        assert isinstance(p, DTensor)
        local = p.to_local()
        gen = torch.Generator().manual_seed(1000 * i + rank)
        grad = torch.randn(local.shape, generator=gen) * 1e-3
        p.grad = DTensor.from_local(
            grad, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def local_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """This rank's shards of every parameter and optimizer state tensor (views of the live memory)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    out = [local(p.detach()) for p in model.parameters()]
    for p in model.parameters():
        out.extend(local(v) for _, v in sorted(opt.state[p].items()) if isinstance(v, torch.Tensor))
    return out


def collective_timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(barrier-to-barrier seconds, this rank's own seconds) of ``fn`` run on every rank at once."""
    common.settle()
    dist.barrier()
    start = time.perf_counter()
    fn()
    own = time.perf_counter() - start
    dist.barrier()
    return time.perf_counter() - start, own


def run_rank(size_gb: float, reps: int, base: str, log_path: str) -> dict[str, Any]:
    """The benchmark on one rank (a target of `launch`); rank 0 returns everything gathered."""
    warnings.filterwarnings("ignore")
    rank, world = dist.get_rank(), dist.get_world_size()

    def log(line: str) -> None:
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(line + "\n")

    started = time.perf_counter()
    model, opt = build_sharded_state(size_gb)
    tensors = local_tensors(model, opt)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    buffers = [torch.empty_like(t) for t in tensors]
    del tensors
    per_rank: list[int] = [0] * world
    dist.all_gather_object(per_rank, nbytes)
    total = sum(per_rank)
    group = dist.new_group(backend="gloo")  # the Checkpointer's coordination group, made once
    log(
        f"state: {len(buffers)} tensors per rank, {total / 1e9:.2f} GB over {world} ranks "
        f"({', '.join(f'{b / 1e9:.2f}' for b in per_rank)} GB each), built in {time.perf_counter() - started:.1f} s"
    )

    paths = {
        "raw": os.path.join(base, f"raw.{rank}.bin"),
        "DCP": os.path.join(base, "dcp"),
        "moai-ckpt": os.path.join(base, "moai"),
    }
    markers: list[CommitMarker] = []

    def dcp_state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optim": opt.state_dict()}

    def moai_save() -> None:
        with moai_ckpt.Checkpointer(paths["moai-ckpt"], capture_rng=False, process_group=group) as ckpt:
            markers.append(ckpt.save(STEP, {"model": model, "optim": opt}))

    def moai_restore() -> None:
        with moai_ckpt.Checkpointer(paths["moai-ckpt"], capture_rng=False, process_group=group) as ckpt:
            ckpt.restore({"model": model, "optim": opt}, STEP)

    saves: dict[str, Callable[[], object]] = {
        # the live shards, looked up again: a restore may replace the optimizer's state tensors
        "raw": lambda: raw_write(paths["raw"], local_tensors(model, opt)),
        "DCP": lambda: dcp.save(dcp_state(), checkpoint_id=paths["DCP"]),
        "moai-ckpt": moai_save,
    }
    restores: dict[str, Callable[[], object]] = {
        "raw": lambda: raw_read(paths["raw"], buffers),
        "DCP": lambda: dcp.load(dcp_state(), checkpoint_id=paths["DCP"]),
        "moai-ckpt": moai_restore,
    }

    def fresh(name: str) -> None:
        if name == "raw" or rank == 0:  # shared directories: rank 0 clears them
            common.fresh(paths[name])
        dist.barrier()

    # per method, per repetition: (barrier-to-barrier s, own s) on this rank
    timings: dict[str, dict[str, list[list[float]]]] = {"save": {}, "restore": {}}
    for rep in range(reps):
        order = list(METHODS[rep % len(METHODS) :] + METHODS[: rep % len(METHODS)])
        for name in order:
            fresh(name)
            timings["save"].setdefault(name, []).append(list(collective_timed(saves[name])))
        common.drop_cache(paths["raw"])
        if rank == 0:
            common.drop_cache(paths["DCP"])
            common.drop_cache(paths["moai-ckpt"])
        dist.barrier()
        for name in order:
            timings["restore"].setdefault(name, []).append(list(collective_timed(restores[name])))
        log(
            f"rep {rep + 1}/{reps}: "
            + ", ".join(
                f"{n} save {timings['save'][n][-1][0]:.2f} / restore {timings['restore'][n][-1][0]:.2f}" for n in order
            )
        )

    # correctness: zero the live state, restore the last snapshot, compare bytes
    expected = [t.clone() for t in local_tensors(model, opt)]
    with torch.no_grad():
        for t in local_tensors(model, opt):
            t.zero_()
    zeroed = all(not t.any() for t in local_tensors(model, opt))
    moai_restore()
    exact = zeroed and all(torch.equal(a, b) for a, b in zip(local_tensors(model, opt), expected, strict=True))
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, {"timings": timings, "exact": exact})
    if rank != 0:
        return {}
    written = {name: common.tree_bytes(paths[name]) for name in ("DCP", "moai-ckpt")}
    written["raw"] = sum(common.tree_bytes(os.path.join(base, f"raw.{r}.bin")) for r in range(world))
    rank_bytes = []
    for r in range(world):
        with open(os.path.join(paths["moai-ckpt"], rank_index_key(STEP, r))) as f:
            rank_bytes.append(int(json.load(f)["bytes_written"]))
    return {
        "world_size": world,
        "state_bytes": total,
        "state_bytes_per_rank": per_rank,
        "written_bytes": written,
        "moai_bytes_per_rank": rank_bytes,
        "moai_total_bytes": markers[-1].body.total_bytes,
        "restored_exactly": [e["exact"] for e in everyone],
        # per rank, per method: [[barrier-to-barrier s, own s], ...] one per repetition
        "per_rank": [e["timings"] for e in everyone],
    }


# -- the parent process -------------------------------------------------------------------------


class Tail:
    """Echo the lines a file gains to the console from a background thread, until closed."""

    def __init__(self, path: str, console: Console) -> None:
        self.path, self.console = path, console
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pos = 0
        while True:
            stopping = self._stop.wait(0.5)
            if os.path.exists(self.path):
                with open(self.path) as f:
                    f.seek(pos)
                    chunk = f.read()
                lines = chunk.split("\n")
                pos += len(chunk.encode()) - len(lines[-1].encode())  # keep a partial last line for later
                for line in lines[:-1]:
                    self.console.print(line, markup=False, highlight=False, soft_wrap=True)
            if stopping:
                return

    def __enter__(self) -> Tail:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def slowest(result: dict[str, Any], kind: str, own: bool = False) -> dict[str, common.Series]:
    """Per method, the slowest rank's time of every repetition: barrier to barrier, or its own."""
    ranks = result["per_rank"]
    out = {}
    for name in METHODS:
        runs = zip(*(r[kind][name] for r in ranks), strict=True)
        out[name] = common.Series(name, [max(times[int(own)] for times in run) for run in runs])
    return out


def render(kind: str, series: dict[str, common.Series], result: dict[str, Any], cold: bool) -> Table:
    nbytes = result["state_bytes"]
    floor, dcp_median = series["raw"].median, series["DCP"].median
    table = Table(
        title=f"distributed {kind} of {nbytes / 1e9:.2f} GB over {result['world_size']} gloo ranks "
        f"(median of {len(series['raw'].seconds)}, slowest rank{', cold cache' if cold else ''})"
    )
    for col, justify in [("method", "left"), ("seconds", "right"), ("GB/s", "right"), ("x raw", "right")]:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    table.add_column("x DCP", justify="right")
    if kind == "save":
        table.add_column("GB on disk", justify="right")
    table.add_column("all runs (s)")
    for name, s in series.items():
        row = [
            name,
            f"{s.median:.2f}",
            f"{nbytes / s.median / 1e9:.2f}",
            f"{floor / s.median:.2f}",
            f"{dcp_median / s.median:.2f}",
        ]
        if kind == "save":
            row.append(f"{result['written_bytes'][name] / 1e9:.2f}")
        row.append(" ".join(f"{x:.2f}" for x in s.seconds))
        table.add_row(*row)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2, help="gloo ranks (processes)")
    parser.add_argument("--size-gb", type=float, default=1.0, help="params + AdamW state over all ranks")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default="bench_out/dist")
    parser.add_argument("--json", default=None, help="write the raw timings (every rank) here")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before the ranks are killed")
    args = parser.parse_args()
    if args.ranks < 2:
        parser.error("--ranks must be at least 2")
    console = Console()
    base = os.path.abspath(args.dir)
    os.makedirs(base, exist_ok=True)
    log_path = os.path.join(base, "progress.log")
    common.fresh(log_path)
    # the ranks import this file as a module: put it on their path (launch hands them os.environ)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))
    console.print(f"machine: {common.machine()}", soft_wrap=True)
    console.print(f"{args.ranks} ranks, {args.size_gb} GB, {args.reps} repetitions, in {base}", soft_wrap=True)

    with Tail(log_path, console):
        results = launch(
            "distributed_save:run_rank",
            args.ranks,
            timeout=args.timeout,
            size_gb=args.size_gb,
            reps=args.reps,
            base=base,
            log_path=log_path,
        )
    failed = [r for r in results if r.returncode != 0 or r.value is None]
    if failed:
        for r in failed:
            console.print(f"[red]rank {r.rank} failed (exit {r.returncode}):[/red]")
            console.print(r.output, markup=False, highlight=False)
        sys.exit(1)
    result = results[0].value
    if not all(result["restored_exactly"]):
        console.print(f"[red]moai-ckpt restore was not exact on some rank: {result['restored_exactly']}[/red]")
        sys.exit(1)

    saves, restores = slowest(result, "save"), slowest(result, "restore")
    console.print(render("save", saves, result, cold=False))
    console.print(render("restore", restores, result, cold=True))
    own = slowest(result, "save", own=True)
    console.print(
        "save, slowest rank's own time (no closing barrier): "
        + ", ".join(f"{n} {s.median:.2f} s" for n, s in own.items())
        + f"\nmoai-ckpt bytes written per rank: {', '.join(f'{b / 1e9:.3f} GB' for b in result['moai_bytes_per_rank'])}"
        + f" (commit total_bytes {result['moai_total_bytes'] / 1e9:.3f} GB); restored exactly on every rank",
        soft_wrap=True,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": common.machine(),
                    "date": time.strftime("%Y-%m-%d"),
                    "ranks": args.ranks,
                    "size_gb": args.size_gb,
                    "save": {k: v.seconds for k, v in saves.items()},
                    "restore": {k: v.seconds for k, v in restores.items()},
                    **result,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
