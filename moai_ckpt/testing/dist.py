"""Run a function on N real processes joined in a gloo process group, for tests.

Each rank is a fresh ``python -m moai_ckpt.testing.dist`` process (no fork, no pickling of code or
arguments): it joins the group through ``env://`` on a free loopback port, calls
``module:function(**kwargs)`` with JSON keyword arguments, and writes the JSON result to a file.

    results = launch("tests.scenarios.dist_scenarios:save_fsdp", 4, run_dir=str(tmp_path), step=2)
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
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
    target: str,
    world_size: int,
    *,
    timeout: float = 240.0,
    backend: str = "gloo",
    teardown_after: float = 15.0,
    **kwargs: Any,
) -> list[RankResult]:
    """Start ``world_size`` ranks running ``target`` and wait for all of them (or the timeout).

    As torchrun's agent does, once a rank fails the others get ``teardown_after`` seconds to
    fail too (a rank blocked in an NCCL collective with a dead peer never would), then SIGTERM,
    then SIGKILL. With ``backend="nccl"`` rank ``r`` uses CUDA device ``r``.
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="moai-dist-") as scratch:
        procs = []
        logs = []
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
            log = open(os.path.join(scratch, f"{rank}.log"), "w")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append((rank, out, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)))
        notes = _supervise([p for _, _, p in procs], timeout, teardown_after)
        for log in logs:
            log.close()
        results = []
        for rank, out, proc in procs:
            with open(os.path.join(scratch, f"{rank}.log")) as f:
                output = f.read() + notes.get(proc.pid, "")
            value = None
            if os.path.exists(out):
                with open(out) as f:
                    value = json.load(f)
            results.append(RankResult(rank, proc.returncode, value, output))
        return results


def _supervise(procs: list[subprocess.Popen[str]], timeout: float, teardown_after: float) -> dict[int, str]:
    """Wait for every process; tear the rest down once one fails, or all at the timeout."""
    deadline = time.monotonic() + timeout
    failed_at: float | None = None
    notes: dict[int, str] = {}
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = now
        stop = now > deadline or (failed_at is not None and now - failed_at > teardown_after)
        if stop:
            why = f"after {timeout} s" if now > deadline else "after another rank failed"
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    notes[p.pid] = f"\n[terminated {why}]"
            time.sleep(5)
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    notes[p.pid] = f"\n[killed {why}]"
            break
        time.sleep(0.05)
    return notes


def _main() -> None:
    target, raw_kwargs, out = sys.argv[1], sys.argv[2], sys.argv[3]
    if os.environ.get("MOAI_TEST_DUMP_AFTER"):  # a hung rank prints every thread's stack
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["MOAI_TEST_DUMP_AFTER"]), exit=False)
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
