"""Validate the placement planner: predicted against measured step time, chosen plan and runner-up.

On this machine's devices (every GPU the job has, or CPU ranks over gloo) the script profiles a
GPT-like model, takes stock of the devices (probes and the link, as a job does), makes the plan,
then trains the model for real under the chosen plan and under the runner-up (the best candidate
with another layout or micro-batching) and reports, for each, the predicted and the measured
step time (median over ``--steps`` optimizer steps after ``--warmup``; forward, backward and
optimizer step), the prediction error, and whether the chosen plan is the faster one measured.

    python benchmarks/plan_validation.py --out results/plan-1gpu                  # one GPU (or CPU)
    torchrun --nproc-per-node 2 benchmarks/plan_validation.py --out results/plan-2gpu
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 benchmarks/plan_validation.py --out /tmp/p --size cpu

Targets (docs/benchmarks.md): prediction error <= 25 % for both plans, and the chosen plan is the
faster of the two measured. Writes ``plan_validation.json`` and ``plan_validation.md`` to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpt import Block, GPTConfig

from moai_ckpt.distributed import current_world
from parallel.apply import apply_plan
from parallel.costmodel import ModelProfile, ProfileOptions, profile_model
from parallel.inventory import job_devices
from parallel.plan import Candidate, Plan
from parallel.planner import PlanOptions, make_plan


@dataclass(frozen=True)
class Size:
    cfg: GPTConfig
    global_batch: int
    profile_batch: int
    dtype: torch.dtype


SIZES = {
    # about 200M parameters; 16 x 1024 tokens per step. The profile is measured at the largest
    # micro-batch a plan may use (and half of it), so the plans' micro-batches interpolate: a GPU
    # far from saturated at 4 samples gives a slope that under-predicts 16 (-38 % on an H100).
    "gpu": Size(GPTConfig(vocab=32768, ctx=1024, dim=1024, layers=12, heads=16), 16, 16, torch.bfloat16),
    "cpu": Size(GPTConfig(vocab=512, ctx=64, dim=128, layers=4, heads=4), 16, 16, torch.float32),
}


class Embed(nn.Module):
    """Token and position embeddings: the first layer of the sequence."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos = nn.Embedding(cfg.ctx, cfg.dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))


class Head(nn.Module):
    """Final LayerNorm and the (untied) vocabulary projection."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


def build(size: Size) -> nn.Sequential:
    torch.manual_seed(0)
    cfg = size.cfg
    model = nn.Sequential(Embed(cfg), *(Block(cfg) for _ in range(cfg.layers)), Head(cfg))
    return model.to(size.dtype)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def tokens(size: Size, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, size.cfg.vocab, (batch, size.cfg.ctx + 1), generator=g)
    return data[:, :-1].to(device), data[:, 1:].to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def runner_up(plan: Plan) -> Candidate | None:
    """The best feasible candidate with another layout or micro-batching than the chosen one.

    Candidates that differ only in the pipeline schedule at the same micro-batching have the same
    prediction; they are not a runner-up worth measuring.
    """
    chosen = plan.chosen

    def shape(c: Candidate) -> tuple[Any, ...]:
        return (c.dp, c.pp, c.data_parallel, c.micro_batches, c.micro_batch_size)

    return next((c for c in plan.candidates if c.fits and shape(c) != shape(chosen)), None)


def plan_of(candidate: Candidate, devices: list[Any], profile: ModelProfile, global_batch: int) -> Plan:
    """A plan whose chosen candidate is ``candidate`` (the planner, held to its layout)."""
    forced = PlanOptions(
        dp=candidate.dp,
        pp=candidate.pp,
        data_parallel=(candidate.data_parallel,) if candidate.dp > 1 else ("ddp", "fsdp"),
        schedules=(candidate.schedule,) if candidate.pp > 1 else ("1f1b", "gpipe"),
        micro_batches=candidate.micro_batches,
        use_all_devices=True,
    )
    plan = make_plan(devices, profile, global_batch, forced)
    assert plan.chosen.label == candidate.label, (plan.chosen.label, candidate.label)
    return plan


def measure(plan: Plan, size: Size, steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds per optimizer step under ``plan`` (the slowest rank's median)."""
    sample = torch.zeros(1, size.cfg.ctx, dtype=torch.long)
    placed = apply_plan(plan, build(size), loss_fn, sample, device=device)
    opt = torch.optim.AdamW(placed.parameters(), lr=1e-4)
    local = placed.local_batch
    x, y = tokens(size, local, placed.device)
    seconds = []
    for i in range(warmup + steps):
        if dist.is_initialized():
            dist.barrier()
        sync(placed.device)
        started = time.perf_counter()
        placed.step(x if placed.is_first else None, y if placed.is_last else None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(placed.device)
        if i >= warmup:
            seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    del placed, opt, x, y
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if dist.is_initialized():
        medians = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
        dist.all_gather(medians, torch.tensor([median], dtype=torch.float64, device=device))
        median = max(float(m) for m in medians)
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for plan_validation.json / .md")
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default: gpu with CUDA, else cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per plan")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--global-batch", type=int, default=None, help="samples per step (default: the size's)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if world_size > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    size = SIZES[args.size or ("gpu" if cuda else "cpu")]
    global_batch = args.global_batch or size.global_batch
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = current_world(timedelta(minutes=10))
    try:
        devices = job_devices(device, cache_dir=os.path.join(args.out, "device-cache"))
        raw = None
        if rank == 0:
            model = build(size).to(device)
            sample = tokens(size, size.profile_batch, device)[0]
            elem = torch.finfo(size.dtype).bits // 8
            options = ProfileOptions(optimizer_bytes_per_param=2 * elem)  # AdamW moments in the parameter dtype
            raw = profile_model(model, sample, options=options).model_dump(mode="json")
            del model
        profile = ModelProfile.model_validate(world.broadcast_json(raw, "the profile"))
        plan = make_plan(devices, profile, global_batch, PlanOptions(use_all_devices=True))
        second = runner_up(plan)
        measured = {"chosen": measure(plan, size, args.steps, args.warmup, device)}
        rows = [("chosen", plan)]
        if second is not None:
            other = plan_of(second, devices, profile, global_batch)
            measured["runner-up"] = measure(other, size, args.steps, args.warmup, device)
            rows.append(("runner-up", other))
    finally:
        world.close()
    if rank == 0:
        report(args.out, plan, rows, measured, profile, size, global_batch, args)
    if dist.is_initialized():
        dist.destroy_process_group()


def report(
    out: str,
    plan: Plan,
    rows: list[tuple[str, Plan]],
    measured: dict[str, float],
    profile: ModelProfile,
    size: Size,
    global_batch: int,
    args: argparse.Namespace,
) -> None:
    os.makedirs(out, exist_ok=True)
    results = []
    for role, p in rows:
        predicted, real = p.predicted_step_s, measured[role]
        results.append(
            {
                "role": role,
                "plan": p.chosen.label,
                "predicted_s": predicted,
                "measured_s": real,
                "error_pct": 100 * (predicted - real) / real,
                "time": p.chosen.time.model_dump() if p.chosen.time else None,
            }
        )
    chosen_faster = len(results) < 2 or results[0]["measured_s"] <= results[1]["measured_s"]
    devices = f"{len(plan.devices)}x {plan.devices[0].name}"
    header = (
        f"plan validation on {devices} (torch {torch.__version__}): GPT-like, {profile.num_layers} layers, "
        f"{profile.params / 1e6:.1f}M parameters, ctx {size.cfg.ctx}, {size.dtype}, global batch {global_batch}; "
        f"median of {args.steps} steps after {args.warmup}"
    )
    lines = [
        header,
        "",
        "| plan | layout | predicted | measured | error | chosen is faster |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        faster = ("yes" if chosen_faster else "NO") if r["role"] == "chosen" else ""
        lines.append(
            f"| {r['role']} | {r['plan']} | {r['predicted_s'] * 1e3:.1f} ms | {r['measured_s'] * 1e3:.1f} ms "
            f"| {r['error_pct']:+.1f} % | {faster} |"
        )
    worst = max(abs(r["error_pct"]) for r in results)
    lines += [
        "",
        f"largest prediction error {worst:.1f} % (target <= 25 %): {'met' if worst <= 25 else 'MISSED'}; "
        f"chosen plan measured faster: {'yes' if chosen_faster else 'NO'}",
    ]
    text = "\n".join(lines)
    print(text, flush=True)
    with open(os.path.join(out, "plan_validation.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "plan_validation.json"), "w") as f:
        json.dump(
            {
                "devices": [d.model_dump() for d in plan.devices],
                "torch": torch.__version__,
                "global_batch": global_batch,
                "params": profile.params,
                "results": results,
                "chosen_faster": chosen_faster,
                "largest_error_pct": worst,
                "plan": json.loads(plan.model_dump_json()),
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
