"""What every zoo workload reports, computed by the workload itself, without moai-ckpt.

Each step a workload prints one progress line, ``zoo step N rank R pid P loss HEX``, the loss as
``float.hex`` (exact). At its end it writes ``<out>.rank<R>.json``: a sha256 digest of every entry
of its full final state (each tensor's dtype, shape and bytes; each other leaf's JSON text) and
the losses of the steps this process ran. The tests (tests/workloads/test_workloads.py) and the chaos
oracle compare these between an uninterrupted run and one killed and restarted.

This file is the tests' instrument, not part of the workloads' training logic: the workloads use
it the way a user would use their own metrics logger.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["digests", "finish", "rank", "report_step", "rng_state"]

_losses: dict[int, str] = {}


def rank() -> int:
    """This process's rank (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def report_step(step: int, loss: float | torch.Tensor) -> None:
    """Print the progress line of ``step`` (live or replayed) and remember its loss."""
    value = float(loss.detach().float()) if isinstance(loss, torch.Tensor) else float(loss)
    _losses[step] = value.hex()
    # one write per line: torchrun's workers share one pipe, and print() writes the end separately
    sys.stdout.write(f"zoo step {step} rank {rank()} pid {os.getpid()} loss {value.hex()}\n")
    sys.stdout.flush()


def _tensor_digest(t: torch.Tensor) -> str:
    if hasattr(t, "to_local"):  # a DTensor: this rank's shard
        t = t.to_local()
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _leaf_digest(value: Any) -> str:
    if isinstance(value, float):
        text = value.hex()
    elif isinstance(value, np.ndarray):
        return hashlib.sha256(f"{value.dtype}{value.shape}".encode() + value.tobytes()).hexdigest()
    else:
        text = json.dumps(value, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def digests(state: Any, prefix: str = "") -> dict[str, str]:
    """``{"model/b1.running_var": sha256, ...}`` for every leaf of a nested state."""
    if isinstance(state, torch.Tensor):
        return {prefix: _tensor_digest(state)}
    if isinstance(state, Mapping):
        items: Any = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return {prefix: _leaf_digest(state)}
    out: dict[str, str] = {}
    for key, value in items:
        out.update(digests(value, f"{prefix}/{key}" if prefix else str(key)))
    return out


def finish(out: str | None, state: Mapping[str, Any]) -> None:
    """Write ``<out>.rank<R>.json``: the digests of ``state`` and the losses this process saw."""
    if out is None:
        return
    result = {"rank": rank(), "digests": digests(state), "losses": {str(s): v for s, v in sorted(_losses.items())}}
    path = f"{out}.rank{rank()}.json"
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
    print(f"zoo done rank {rank()} pid {os.getpid()}: {len(result['digests'])} entries", file=sys.stderr, flush=True)


def rng_state(seeded: tuple[str, ...] = ("torch", "numpy", "python")) -> dict[str, Any]:
    """The states of the global generators the workload seeds (torch CPU, numpy, Python).

    A generator the workload never seeds starts from OS entropy in every process, so it is left
    out: it differs between any two runs, interrupted or not.
    """
    import random

    state: dict[str, Any] = {}
    if "torch" in seeded:
        state["torch"] = torch.get_rng_state()
    if "numpy" in seeded:
        _, keys, pos, *_ = np.random.get_state()
        state["numpy"] = {"keys": keys, "pos": int(pos)}
    if "python" in seeded:
        state["python"] = np.asarray(random.getstate()[1], dtype=np.int64)
    return state
