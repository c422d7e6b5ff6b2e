"""Per-rank programs with rank-local state: DDP + BatchNorm (no SyncBatchNorm) and per-rank EMA copies.

Run by `moai_ckpt.testing.dist.launch` (``tests.scenarios.ranklocal_scenarios:<function>``) or, for the
kill tests, under torchrun::

    torchrun --nproc-per-node 2 --max-restarts 3 -m tests.scenarios.ranklocal_scenarios RUN_DIR EVENTS_DIR TOTAL

Each rank updates its BatchNorm running statistics from its own batch, so after every step the
ranks' buffers differ (DDP broadcasts rank 0's only at the next forward).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import moai_ckpt
from moai_ckpt.testing import tensors_of
from moai_ckpt.wrappers import canonical_state_dict

SAMPLES, BATCH, MICRO = 96, 16, 2  # global batch 16: 8 per rank on 2 ranks, in 2 micro-batches


def rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device() -> torch.device:
    """This rank's GPU under ``launch(..., backend="nccl")``, else the CPU."""
    if os.environ.get("MOAI_TEST_BACKEND") == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class SmallCNN(nn.Module):
    """Conv + BatchNorm2d, then Linear + BatchNorm1d, with dropout: buffers every step moves."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(4)
        self.f2 = nn.Linear(4 * 4 * 4, 12)
        self.b2 = nn.BatchNorm1d(12)
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        h = self.drop(torch.relu(self.b2(self.f2(h.flatten(1)))))
        return self.out(h)  # type: ignore[no-any-return]


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(SAMPLES, 1, 8, 8, generator=g), torch.randint(0, 3, (SAMPLES,), generator=g)
    return x.to(device()), y.to(device())


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random horizontal flips drawn from numpy's global RNG, as many training scripts do."""
    flips = torch.from_numpy(np.random.rand(x.shape[0]) < 0.5).to(x.device)
    out = x.clone()
    out[flips] = out[flips].flip(-1)
    return out


def build() -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, Any]:
    """(the module to train: DDP on several ranks, the plain model, optimizer, OneCycleLR)."""
    torch.manual_seed(0)
    np.random.seed(0)
    model = SmallCNN().to(device())
    _, world = rank_and_world()
    ids = [device().index] if device().type == "cuda" else None
    trained = nn.parallel.DistributedDataParallel(model, device_ids=ids) if world > 1 else model
    opt = torch.optim.AdamW(trained.parameters(), lr=3e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=200)
    return trained, model, opt, sched


def train_step(trained: nn.Module, opt: torch.optim.Optimizer, sched: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    """One optimizer step over ``MICRO`` micro-batches (gradients synchronised on the last)."""
    total = 0.0
    for i, (xs, ys) in enumerate(zip(x.chunk(MICRO), y.chunk(MICRO), strict=True)):
        sync = i == MICRO - 1 or not isinstance(trained, nn.parallel.DistributedDataParallel)
        context = trained.no_sync() if not sync else contextlib.nullcontext()  # type: ignore[operator]
        with context:
            loss = nn.functional.cross_entropy(trained(augment(xs)), ys) / MICRO
            loss.backward()
        total += float(loss.detach())
    opt.step()
    opt.zero_grad()
    sched.step()
    return total


def tensor_digests(state: dict[str, Any]) -> dict[str, str]:
    """sha256 of every tensor of a state, by name (what "bitwise equal" compares)."""
    out = {}
    for key, obj in state.items():
        tensors = canonical_state_dict(obj) if isinstance(obj, nn.Module) else tensors_of(obj)
        for name, t in tensors.items():
            name = name.lstrip("/").replace("/", ".")
            data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            out[f"{key}/{name}"] = hashlib.sha256(data).hexdigest()
    return out


def full_state(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, extra: dict[str, Any]) -> dict[str, str]:
    return tensor_digests(
        {"model": model, "optim": opt.state_dict(), "sched": {"last_epoch": torch.tensor(sched.last_epoch)}, **extra}
    )


# -- Checkpointer: save on 2 ranks, restore on 2 and on 1 --------------------------------------------


def ema_of(model: nn.Module) -> torch.optim.swa_utils.AveragedModel:
    """An EMA copy that averages buffers too: each rank's follows its own BatchNorm statistics."""
    return torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=True
    )


def save_rank_local(run_dir: str, steps: int = 3) -> dict[str, Any]:
    """Train DDP + BatchNorm with a per-rank EMA and a per-rank tensor; save; report every tensor's digest."""
    rank, world = rank_and_world()
    trained, model, opt, sched = build()
    ema = ema_of(model)
    local = {"seen": torch.zeros(SAMPLES, dtype=torch.int64, device=device())}
    sampler = moai_ckpt.GlobalSampler(SAMPLES, BATCH, seed=1)
    x, y = dataset()
    for _ in range(steps):
        idx = sampler.next_batch(rank, world)
        train_step(trained, opt, sched, x[idx], y[idx])
        ema.update_parameters(model)
        local["seen"][idx] += 1
    ckpt = moai_ckpt.Checkpointer(run_dir, collective_timeout_s=60)
    # the DDP wrapper itself is saved: its names are stored without the ``module.`` prefix
    ckpt.save(steps, {"model": trained, "ema": ema, "optim": opt, "sched": sched, "local": local, "data": sampler})
    return {"rank": rank, "state": full_state(model, opt, sched, {"ema": ema, "local": local})}


def restore_rank_local(run_dir: str) -> dict[str, Any]:
    """Restore into freshly built objects (DDP on several ranks); report digests and the choice."""
    rank, _ = rank_and_world()
    trained, model, opt, sched = build()
    ema = ema_of(model)
    local: dict[str, Any] = {}
    sampler = moai_ckpt.GlobalSampler(SAMPLES, BATCH, seed=1)
    ckpt = moai_ckpt.Checkpointer(run_dir, collective_timeout_s=60)
    step = ckpt.restore({"model": trained, "ema": ema, "optim": opt, "sched": sched, "local": local, "data": sampler})
    assert ckpt.last_restore is not None
    choice = ckpt.last_restore.rank_local
    return {
        "rank": rank,
        "step": step,
        "state": full_state(model, opt, sched, {"ema": ema, "local": local}),
        "copies": choice.copies,
        "per_rank": choice.per_rank,
        "describe": choice.describe(),
    }


# -- fault_tolerant: the DDP + BatchNorm job --------------------------------------------------------


@moai_ckpt.fault_tolerant(storage="{run_dir}", snapshot_every=5, collective_timeout_s=30)
def train(run: moai_ckpt.Run, run_dir: str, total: int, events: str | None = None) -> dict[str, Any]:
    """DDP + BatchNorm under `fault_tolerant`; the DDP wrapper itself is tracked."""
    torch.set_num_threads(1)
    rank, _ = rank_and_world()
    trained, model, opt, sched = build()
    run.track(model=trained, optim=opt, sched=sched)
    run.sampler(SAMPLES, BATCH, seed=1)
    x, y = dataset()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    log = open(os.path.join(events, f"events-{rank}.jsonl"), "a") if events else None  # noqa: SIM115
    pause = float(os.environ.get("RANKLOCAL_STEP_PAUSE", "0"))
    losses: dict[int, float] = {}
    for step in run.steps(total):
        if log is not None and not losses and run.report is not None:
            report = {"base": run.report.base_step, "rank_local": run.report.rank_local}
            log.write(json.dumps({"attempt": attempt, "pid": os.getpid(), "start": step, **report}) + "\n")
        idx = run.batch()
        loss = train_step(trained, opt, sched, x[idx], y[idx])
        run.record(loss=loss)
        losses[step] = loss
        if log is not None:
            line = {"attempt": attempt, "pid": os.getpid(), "step": step, "loss": loss, "replaying": run.replaying}
            log.write(json.dumps(line) + "\n")
            log.flush()
        time.sleep(pause)  # the kill tests' margin to aim at a step; no result depends on it
    if log is not None:
        log.close()
    report = run.report
    return {
        "rank": rank,
        "state": full_state(model, opt, sched, {}),
        "losses": {s: v for s, v in losses.items()},
        "rank_local": report.rank_local if report is not None else {},
        "base": report.base_step if report is not None else None,
        "strict": report.strict if report is not None else None,
        "replayed": run.replayed,
    }


#: the same job, ending without a snapshot of its last step (the log holds the steps after the last one)
train_open = moai_ckpt.fault_tolerant(
    storage="{run_dir}", snapshot_every=5, snapshot_at_end=False, collective_timeout_s=30
)(train.__wrapped__)


def train_once(run_dir: str, total: int) -> dict[str, Any]:
    return train_open(run_dir=run_dir, total=total)  # type: ignore[no-any-return]


def main() -> None:
    """A torchrun worker: join the job's gloo group, train, write this rank's result."""
    run_dir, events, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dist.init_process_group("gloo")
    try:
        result = train(run_dir=run_dir, total=total, events=events)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(events, f"result-{result['rank']}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
