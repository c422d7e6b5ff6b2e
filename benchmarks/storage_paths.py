"""What never following a link costs `LocalStorage`: per-object writes, reads and deletes against plain paths.

`LocalStorage` reaches every key one segment at a time (``openat`` with ``O_NOFOLLOW``) and
checks each file with ``fstat`` before reading or writing it. This times, on the same directory
and in interleaved repetitions, N small objects at a snapshot-like depth
(``snapshots/<step>/model/<array>/c/<i>``), written, read, then deleted:

    plain      os.open / os.read / os.unlink on joined paths (what a path-following store does)
    LocalStorage   storage.write / storage.read / storage.delete_tree (fsync off for both)

and prints the median of each with the ratio to plain. Snapshots write few large chunks (64 MiB
by default), so the per-object cost shows only with many small objects: this is the worst case.
``--baseline FILE`` adds the `LocalStorage` of another module that defines one (an earlier
release's, say ``git show v0.1.0:moai_ckpt/storage.py > /tmp/old_storage.py``; today it lives in
``moai_ckpt/storage/local.py``), timed the same way.

    python benchmarks/storage_paths.py --objects 4000 --size 4096 --reps 5 --dir bench_out/paths
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

from moai_ckpt.storage import LocalStorage


def keys(count: int) -> list[str]:
    return [f"snapshots/000000000100/model/layer{i % 50}.weight/c/{i}" for i in range(count)]


def plain(root: str, names: list[str], payload: bytes) -> dict[str, float]:
    times = {}
    start = time.perf_counter()
    made: set[str] = set()
    for key in names:
        path = os.path.join(root, key)
        parent = os.path.dirname(path)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, payload)
        os.close(fd)
    times["write"] = time.perf_counter() - start
    start = time.perf_counter()
    for key in names:
        fd = os.open(os.path.join(root, key), os.O_RDONLY)
        os.read(fd, len(payload) + 1)
        os.close(fd)
    times["read"] = time.perf_counter() - start
    start = time.perf_counter()
    shutil.rmtree(os.path.join(root, "snapshots/000000000100"))
    times["delete"] = time.perf_counter() - start
    return times


def nofollow(root: str, names: list[str], payload: bytes, cls: type = LocalStorage) -> dict[str, float]:
    storage = cls(root, fsync=False)
    times = {}
    start = time.perf_counter()
    for key in names:
        storage.write(key, payload)
    times["write"] = time.perf_counter() - start
    start = time.perf_counter()
    for key in names:
        storage.read(key)
    times["read"] = time.perf_counter() - start
    start = time.perf_counter()
    getattr(storage, "delete_tree", storage.delete_prefix)("snapshots/000000000100")
    times["delete"] = time.perf_counter() - start
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=4000)
    parser.add_argument("--size", type=int, default=4096, help="bytes per object")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", default="bench_out/paths")
    parser.add_argument("--baseline", default=None, help="another module whose LocalStorage to time too")
    args = parser.parse_args()
    names = keys(args.objects)
    payload = os.urandom(args.size)
    methods: dict[str, Callable[[str, list[str], bytes], dict[str, float]]] = {
        "plain": plain,
        "LocalStorage": nofollow,
    }
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_storage", args.baseline)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        methods["baseline"] = lambda root, names, payload: nofollow(root, names, payload, module.LocalStorage)
    results: dict[str, dict[str, list[float]]] = {m: {"write": [], "read": [], "delete": []} for m in methods}
    order = list(methods)
    for rep in range(args.reps):
        for name in order[rep % len(order) :] + order[: rep % len(order)]:
            root = common.fresh(os.path.join(args.dir, name))
            common.settle(0.2)
            for op, seconds in methods[name](root, names, payload).items():
                results[name][op].append(seconds)
    table = Table(title=f"{args.objects} objects of {args.size} B, median of {args.reps}; {common.machine()}")
    table.add_column("method")
    for op in ("write", "read", "delete"):
        table.add_column(f"{op} (µs/object)", justify="right")
        table.add_column("x plain", justify="right")
    for name in methods:
        row = [name]
        for op in ("write", "read", "delete"):
            median = statistics.median(results[name][op])
            floor = statistics.median(results["plain"][op])
            row += [f"{median / args.objects * 1e6:.1f}", f"{median / floor:.2f}"]
        table.add_row(*row)
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
