"""Per-rank programs and models for the placement tests (run by moai_ckpt.testing.dist.launch)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import moai_ckpt
from moai_ckpt.sampler import GlobalSampler
from parallel.apply import apply_plan
from parallel.inventory import job_devices
from parallel.plan import Plan
from parallel.planner import PlanOptions

SAMPLES, IN, OUT, WIDTH, DEPTH = 256, 16, 4, 64, 6


def build_model() -> nn.Sequential:
    """``DEPTH`` hidden blocks and a head: layers that chain, some without parameters."""
    torch.manual_seed(0)
    blocks: list[nn.Module] = [nn.Linear(IN, WIDTH), nn.Tanh()]
    for _ in range(DEPTH - 1):
        blocks += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    return nn.Sequential(*blocks, nn.Linear(WIDTH, OUT))


def model_and_sample() -> tuple[nn.Module, torch.Tensor]:
    """What ``moai-ckpt plan --model tests.scenarios.parallel_scenarios:model_and_sample`` profiles."""
    return build_model(), torch.randn(16, IN)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(SAMPLES, IN, generator=g)
    return x, torch.tanh(x[:, :OUT] * 2) + 0.1 * torch.randn(SAMPLES, OUT, generator=g)


def reference(global_batch: int, steps: int, lr: float) -> list[float]:
    """The same training in one process on whole global batches: the loss of every step."""
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sampler = GlobalSampler(SAMPLES, global_batch, seed=3)
    x, y = data()
    losses = []
    for _ in range(steps):
        idx = sampler.next_batch()
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def train_plans(plan_paths: list[str], steps: int, lr: float, cache_dir: str) -> dict[str, Any]:
    """Train a fresh model under each plan in turn; each last-stage rank reports its replica's losses.

    First the job's devices are taken stock of (probes and the link measured), for the report.
    """
    devices = job_devices(cache_dir=cache_dir)
    runs = [_train(Plan.model_validate_json(Path(path).read_text()), steps, lr) for path in plan_paths]
    return {"devices": [d.model_dump() for d in devices], "runs": runs}


def _train(plan: Plan, steps: int, lr: float) -> dict[str, Any]:
    placed = apply_plan(plan, build_model(), nn.functional.mse_loss, torch.zeros(1, IN))
    opt = torch.optim.AdamW(placed.module.parameters(), lr=lr)
    sampler = GlobalSampler(SAMPLES, plan.global_batch, seed=3)
    x, y = data()
    losses, seconds = [], []
    for _ in range(steps):
        dist.barrier()
        started = time.perf_counter()
        idx = placed.take(sampler)
        loss = placed.step(x[idx] if placed.is_first else None, y[idx] if placed.is_last else None)
        opt.step()
        opt.zero_grad()
        seconds.append(time.perf_counter() - started)
        if loss is not None:
            losses.append(float(loss))
    return {
        "rank": dist.get_rank(),
        "dp_rank": placed.dp_rank,
        "stage": placed.stage,
        "layers": sorted({int(key.split(".")[0]) for key in placed.stage_module.state_dict()}),
        "losses": losses,
        "step_s": statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0],
    }


def wide_tower_on_meta() -> tuple[nn.Module, torch.Tensor]:
    """A 3.2B-parameter MLP tower (24 blocks) built on the meta device, for analytic plans."""
    with torch.device("meta"):
        blocks = [
            nn.Sequential(nn.LayerNorm(4096), nn.Linear(4096, 16384), nn.GELU(), nn.Linear(16384, 4096))
            for _ in range(24)
        ]
        return nn.Sequential(*blocks), torch.empty(1, 1024, 4096)


# -- placed runs under fault_tolerant: re-planned on restore --------------------------------------

PLACED_LR = 1e-2


@moai_ckpt.fault_tolerant(storage="{run_dir}", snapshot_every=3, collective_timeout_s=30, async_snapshots=False)
def placed_train(
    run: moai_ckpt.Run, run_dir: str, total: int, global_batch: int, options: dict[str, Any]
) -> dict[str, Any]:
    """Train `build_model` on the plan `Run.place` makes for this job (the recorded one if the
    devices are unchanged); every rank reports its role and what the run says about the restore."""
    placed = run.place(
        build_model(),
        nn.functional.mse_loss,
        torch.zeros(4, IN),
        global_batch=global_batch,
        options=PlanOptions(**options),
    )
    opt = torch.optim.AdamW(placed.parameters(), lr=PLACED_LR)
    run.track(model=placed.stage_module, optim=opt)
    run.sampler(SAMPLES, global_batch, seed=3)
    x, y = data()
    first_step, shares = None, {}
    for step in run.steps(total):
        first_step = step if first_step is None else first_step
        idx = run.batch()
        loss = placed.step(x[idx] if placed.is_first else None, y[idx] if placed.is_last else None)
        opt.step()
        opt.zero_grad()
        run.record(loss=placed.replica_loss(loss))
        shares[step] = idx
    report = run.report
    return {
        "rank": run.rank,
        "plan": placed.plan.summary(),
        "dp": placed.plan.dp,
        "pp": placed.plan.pp,
        "dp_rank": placed.dp_rank,
        "stage": placed.stage,
        "layers": sorted({int(key.split(".")[0]) for key in placed.stage_module.state_dict()}),
        "first_step": first_step,
        "replayed": run.replayed,
        "last_step": run.step,
        "shares": shares,
        "placement_changes": report.placement_changes if report is not None else [],
        "max_drift": report.max_drift() if report is not None and report.steps else {},
    }


def placed_run(run_dir: str, total: int, global_batch: int, options: dict[str, Any]) -> dict[str, Any]:
    try:
        return placed_train(run_dir=run_dir, total=total, global_batch=global_batch, options=options)
    except moai_ckpt.MoaiCkptError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
