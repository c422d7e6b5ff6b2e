"""CPU time the training thread spends at a step's boundaries, piece by piece (GPT-2 small on CUDA).

python benchmarks/step_end_profile.py [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt import GPT, SIZES

from replay.stepstate import Hyperparameters, StepValues, parameters_of, rng_components


def timed(name: str, fn: Callable[[], Any], device: torch.device, n: int = 50) -> None:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = 0.0
    for _ in range(n):
        start = time.perf_counter()
        fn()
        total += time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.synchronize()
    print(f"{name:<44}{total / n * 1e6:>10.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", default="gpt2-small")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = GPT(SIZES[args.size]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    tracked = {"model": model, "optim": opt}
    _, params, _ = parameters_of(tracked)
    hp = Hyperparameters.capture(tracked)
    loss, gn = torch.tensor(1.0, device=device), torch.tensor(2.0, device=device)
    print(f"{len(params)} parameters on {device}")
    timed("rng_components", rng_components, device)
    timed("Hyperparameters.capture", lambda: Hyperparameters.capture(tracked), device)
    timed("_foreach_norm(dtype=float32)", lambda: torch._foreach_norm(params, 2, dtype=torch.float32), device)
    timed("_foreach_norm()", lambda: torch._foreach_norm(params, 2), device)
    norms = torch._foreach_norm(params, 2)
    timed("torch.stack(norms)", lambda: torch.stack(norms), device)
    timed("StepValues.capture", lambda: StepValues.capture(params, loss, gn, hp), device)
    timed("StepValues.capture + read", lambda: StepValues.capture(params, loss, gn, hp).read(), device)


if __name__ == "__main__":
    main()
