"""A training job whose tracked state holds every kind of entry, with a plantable one-bit change.

    python -m tests.scenarios.state_scenario RUN_DIR TOTAL_STEPS                       (one process)
    launch("tests.scenarios.state_scenario:ranks", 2, run_dir=..., total=...)          (DDP over gloo)

A small MLP with BatchNorm (running statistics and a step counter) and dropout, Adam (``step``,
``exp_avg``, ``exp_avg_sq``), a OneCycleLR schedule, a CPU GradScaler and the run's sampler, so the
exact state digests of the log cover buffers, optimizer state, scheduler, scaler and the data
position. Under DDP without SyncBatchNorm each rank's BatchNorm statistics are its own (rank-local
state, which a snapshot must restore per rank); ``norm="layer"`` trades BatchNorm for LayerNorm,
whose state every rank shares.
Snapshots every 4 steps (synchronous), none at the end, each record durable before the next
step: a run of N steps leaves the steps after the last multiple of 4 in the log.

``MOAI_TEST_FLIP=<entry>@<step>[@<rank>]`` flips the lowest bit of one state entry's first byte
at the end of ``<step>`` (after the optimizer step) when that step is replayed, on ``<rank>`` only
if given: silent corruption of a buffer or optimizer state that leaves the step's loss, grad
norm and parameters as they were. Prints (returns) one JSON object: the final state's sha256,
the first step run, the steps replayed, or the replay divergence (its step and quantities).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import moai_ckpt
from moai_ckpt.run import Run
from moai_ckpt.wrappers import canonical_state_dict

FLIP_ENV = "MOAI_TEST_FLIP"
SAMPLES, BATCH = 96, 12


class Net(nn.Module):
    def __init__(self, norm: str = "batch") -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.b1: nn.Module = nn.BatchNorm1d(16) if norm == "batch" else nn.LayerNorm(16)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.b1(self.fc1(x)))))


def entry_tensor(tracked: dict[str, Any], entry: str) -> torch.Tensor:
    """The live tensor behind a state entry name (``model/b1.running_var``, ``optim/state.2.exp_avg``)."""
    key, _, path = entry.partition("/")
    obj = tracked[key]
    if isinstance(obj, nn.Module):
        return canonical_state_dict(obj)[path]  # type: ignore[no-any-return]
    if isinstance(obj, torch.optim.Optimizer):
        _, index, name = path.split(".")
        params = [p for group in obj.param_groups for p in group["params"]]
        return obj.state[params[int(index)]][name]  # type: ignore[no-any-return]
    if isinstance(obj, torch.amp.GradScaler):
        return {"scale": obj._scale, "_growth_tracker": obj._growth_tracker}[path]  # type: ignore[return-value]
    raise KeyError(entry)


def flip_one_bit(t: torch.Tensor) -> None:
    """Flip the lowest bit of the tensor's first byte, in place."""
    with torch.no_grad():
        data = t.detach().reshape(-1).view(torch.uint8)
        data[0] = data[0] ^ 1


def _planted(step: int, rank: int) -> str | None:
    plan = os.environ.get(FLIP_ENV)
    if not plan:
        return None
    entry, at, *only = plan.split("@")
    if int(at) != step or (only and int(only[0]) != rank):
        return None
    return entry


@moai_ckpt.fault_tolerant(
    storage="{run_dir}",
    snapshot_every=4,
    async_snapshots=False,
    log_sync=True,
    snapshot_at_end=False,
    capture_ops="never",
    collective_timeout_s=30,
)
def train(run: Run, run_dir: str, total: int, norm: str = "batch") -> dict[str, Any]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = Net(norm)
    model: nn.Module = nn.parallel.DistributedDataParallel(net) if run.world_size > 1 else net
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-2, total_steps=100)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
    tracked = {"model": net, "optim": opt, "sched": sched, "scaler": scaler}  # the plain module: any world size
    run.track(**tracked)
    run.sampler(SAMPLES, BATCH, seed=4)
    gen = torch.Generator().manual_seed(9)
    x, y = torch.randn(SAMPLES, 8, generator=gen), torch.randn(SAMPLES, 4, generator=gen)
    first = None
    for step in run.steps(total):
        first = step if first is None else first
        idx = run.batch()
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        sched.step()
        entry = _planted(step, run.rank) if run.replaying else None
        if entry is not None:
            flip_one_bit(entry_tensor(tracked, entry))
        run.record(loss=loss)
    digest = hashlib.sha256()
    for t in [*net.state_dict().values(), *tensors(opt.state_dict()["state"])]:
        digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"digest": digest.hexdigest(), "first_step": first, "replayed": run.replayed}


def tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for key in sorted(tree) for t in tensors(tree[key])]
    return []


def outcome(run_dir: str, total: int, norm: str = "batch") -> dict[str, Any]:
    """The run's result, or the divergence its replay reported."""
    try:
        return train(run_dir=run_dir, total=total, norm=norm)
    except moai_ckpt.ReplayDivergenceError as exc:
        check = exc.check
        assert check is not None
        return {"diverged_at": check.step, "first": check.first, "mismatches": check.mismatches}


def ranks(run_dir: str, total: int, norm: str = "batch") -> dict[str, Any]:
    """One rank of the job under `moai_ckpt.testing.dist.launch`."""
    return {"rank": dist.get_rank() if dist.is_initialized() else 0, **outcome(run_dir, total, norm)}


if __name__ == "__main__":
    print(json.dumps(outcome(sys.argv[1], int(sys.argv[2]))))
