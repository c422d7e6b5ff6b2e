"""Run a function on N real processes joined in a gloo process group, for tests.

Each rank is a fresh ``python -m moai_ckpt.testing.dist`` process (no fork, no pickling of code or
arguments): it joins the group through ``env://`` on a free loopback port, calls
``module:function(**kwargs)`` with JSON keyword arguments, and writes the JSON result to a file.

    results = launch("tests.dist_scenarios:save_fsdp", 4, run_dir=str(tmp_path), step=2)
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any


@dataclass
class RankResult:
    rank: int
    returncode: int
    value: Any
    output: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    target: str, world_size: int, *, timeout: float = 240.0, backend: str = "gloo", **kwargs: Any
) -> list[RankResult]:
    """Start ``world_size`` ranks running ``target`` and wait for all of them (or the timeout).

    With ``backend="nccl"`` rank ``r`` uses CUDA device ``r``.
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="moai-dist-") as scratch:
        procs = []
        for rank in range(world_size):
            env = {
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_RANK": str(rank),
                "OMP_NUM_THREADS": "1",
                "MOAI_TEST_BACKEND": backend,
            }
            out = os.path.join(scratch, f"{rank}.json")
            cmd = [sys.executable, "-m", "moai_ckpt.testing.dist", target, json.dumps(kwargs), out]
            procs.append(
                (rank, out, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            )
        results = []
        for rank, out, proc in procs:
            try:
                output, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for _, _, p in procs:
                    p.kill()
                output, _ = proc.communicate()
                output += f"\n[rank {rank} killed after {timeout} s]"
            value = None
            if os.path.exists(out):
                with open(out) as f:
                    value = json.load(f)
            results.append(RankResult(rank, proc.returncode, value, output))
        return results


def _main() -> None:
    target, raw_kwargs, out = sys.argv[1], sys.argv[2], sys.argv[3]
    import torch.distributed as dist

    world_size = int(os.environ["WORLD_SIZE"])
    backend = os.environ.get("MOAI_TEST_BACKEND", "gloo")
    if backend == "nccl":
        import torch

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if world_size > 1:
        dist.init_process_group(backend, init_method="env://")
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    value = func(**json.loads(raw_kwargs))
    with open(out, "w") as f:
        json.dump(value, f)
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    _main()
