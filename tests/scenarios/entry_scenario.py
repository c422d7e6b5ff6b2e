"""Training functions for the tests of what a restore may run (tests/tools/test_security_entry.py).

``train_with_token`` takes a secret argument, as real jobs take API tokens; ``fails`` raises in
the middle of a restore; ``marked`` writes a file each time it is called, so a test can see that
it ran (or did not).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

import moai_ckpt
from moai_ckpt.run import Run
from tests.helpers import TinyNet


def _loop(run: Run, total: int) -> int:
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run.track(model=model, optim=opt)
    run.sampler(32, 4, seed=1)
    tokens = torch.randint(0, 32, (32, 8), generator=torch.Generator().manual_seed(2))
    for _ in run.steps(total):
        batch = tokens[run.batch()]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(batch).reshape(-1, 32), batch.reshape(-1))
        loss.backward()
        opt.step()
        run.record(loss=loss)
    return run.step


@moai_ckpt.fault_tolerant(storage="{run_dir}", snapshot_every=2, snapshot_at_end=False, async_snapshots=False)
def train_with_token(run: Run, run_dir: str, total: int, api_token: str, lr: float = 0.1) -> int:
    """A job that needs a secret: it checks the token a restore passes is the real one."""
    if api_token != os.environ.get("ENTRY_TEST_TOKEN", "tok-3141"):
        raise PermissionError("wrong api_token")
    return _loop(run, total)


@moai_ckpt.fault_tolerant(storage="{run_dir}", snapshot_every=2, snapshot_at_end=False, async_snapshots=False)
def marked(run: Run, run_dir: str, total: int, mark: str) -> int:
    """Appends a line to the file ``mark`` whenever it is called (live, or by a restore)."""
    with open(mark, "a") as f:
        f.write("called\n")
    return _loop(run, total)


def fails(**_: Any) -> None:
    """Not a training function: raises at once (a failure of the training code in a restore)."""
    raise ArithmeticError("planted failure in the training code")
