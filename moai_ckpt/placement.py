"""`Run.place`: plan a model's placement on the job's devices, re-planning when they changed.

    placed = run.place(model, loss_fn, sample_micro_batch, global_batch=256)
    opt = torch.optim.AdamW(placed.parameters(), lr=3e-4)
    run.track(model=placed.stage_module, optim=opt)
    run.sampler(len(dataset), global_batch_size=256)
    for step in run.steps(total):
        idx = run.batch()                              # this replica's share of the global batch
        loss = placed.step(x[idx] if placed.is_first else None, y[idx] if placed.is_last else None)
        opt.step(); opt.zero_grad()
        run.record(loss=placed.replica_loss(loss))

On start it takes stock of the job's devices (`parallel.job_devices`), profiles the model (cached
in the run directory), and reads the plan the newest snapshot records. Devices unchanged: that
plan is kept. Devices changed (a rank lost, another GPU type): a new plan is made with the same
options and global batch, rank 0 prints the two side by side, and the snapshot is restored onto
it: the placed model and its optimizer are snapshotted by whole-model parameter names
(`parallel.state`), so each rank reads the entries of its own stage, however the layers are split.
Every snapshot records the plan it was taken under (the manifest's ``info["placement"]``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moai_ckpt.errors import NoFeasiblePlanError, PlacementError
from parallel.apply import LossFn, Placed, apply_plan
from parallel.costmodel import ModelProfile, ProfileOptions, as_inputs, cached_or_measured
from parallel.inventory import Device, job_devices, parse_devices
from parallel.plan import Plan
from parallel.planner import PlanOptions
from parallel.replan import RecordedPlan, Replan, compare, compare_text, recorded_plan, replan
from parallel.state import StageModelState, StageOptimizerState

if TYPE_CHECKING:
    from moai_ckpt.run.hooks import RunView

log = logging.getLogger("moai_ckpt.placement")


@dataclass
class RunPlacement:
    """A run's placed model: what its snapshots hold, record and log under the plan."""

    placed: Placed
    decision: Replan
    options: PlanOptions
    param_names: list[str]  # the whole model's parameters, in its order

    @property
    def plan(self) -> Plan:
        return self.placed.plan

    @property
    def label(self) -> str:
        """What the log's placement records: ``dp2 x pp2 ddp 1f1b m4 x 2 on 4 devices``."""
        return f"{self.plan.chosen.label} on {len(self.plan.devices)} devices"

    def snapshot_state(self, tracked: Mapping[str, Any]) -> dict[str, Any]:
        """``tracked`` with the placed module and its optimizer as whole-model-named views."""
        stage = self.placed.stage_module
        owned = {id(p) for p in stage.parameters()}
        out: dict[str, Any] = {}
        for key, obj in tracked.items():
            if obj is stage or obj is self.placed.module:
                out[key] = StageModelState(stage)
            elif isinstance(obj, torch.optim.Optimizer) and all(
                id(p) in owned for group in obj.param_groups for p in group["params"]
            ):
                out[key] = StageOptimizerState(obj, stage)
            else:
                out[key] = obj
        return out

    def info(self) -> dict[str, Any]:
        return RecordedPlan.of(self.plan, self.options).info()

    def parameters(self, key: str) -> tuple[list[str], list[torch.Tensor], list[bool]]:
        """(names, local tensors, combine across ranks?) of every parameter of the whole model.

        Every rank lists all of them, so the log's per-parameter digests do not depend on the
        plan: a rank gives its local tensor for a parameter its stage holds when it is the first
        data-parallel replica (or holds a shard), and an empty tensor otherwise; the recorder
        adds the squares over the ranks.
        """
        placed = self.placed
        mine = dict(placed.stage_module.named_parameters())
        empty = torch.zeros(0, device=placed.device)
        tensors = []
        for name in self.param_names:
            p = mine.get(name)
            sharded = p is not None and any(pl.is_shard() for pl in getattr(p, "placements", ()))
            if p is None or not (sharded or placed.dp_rank == 0):
                tensors.append(empty)
            else:
                tensors.append((p.to_local() if hasattr(p, "to_local") else p).detach())
        return [f"{key}.{n}" for n in self.param_names], tensors, [True] * len(self.param_names)

    def data_rank(self) -> tuple[int, int]:
        """(this rank's data-parallel rank, the data-parallel degree): whose share it takes."""
        return self.placed.dp_rank, self.placed.dp_size


def place(
    run: RunView,
    model: nn.Module,
    loss_fn: LossFn,
    sample: torch.Tensor | Sequence[torch.Tensor],
    *,
    global_batch: int,
    options: PlanOptions | None = None,
    devices: str | Sequence[Device] | None = None,
    layers: Sequence[nn.Module] | None = None,
    profile: ModelProfile | None = None,
    profile_options: ProfileOptions | None = None,
    force_replan: bool = False,
) -> RunPlacement:
    """Plan and apply the placement of ``model`` on the run's ranks (see `moai_ckpt.Run.place`).

    The run has not started yet: it restores its snapshot onto the placement returned here.
    """
    options = (options or PlanOptions()).model_copy(update={"use_all_devices": True})
    found = _devices(run, devices)
    if profile is None:
        profile = _profile(run, model, sample, layers, profile_options)
    decision = _decide(run, found, profile, global_batch, options, force_replan)
    if run.rank == 0:
        _announce(decision)
    placed = apply_plan(decision.plan, model, loss_fn, sample, layers=layers, device=run.device)
    return RunPlacement(
        placed=placed, decision=decision, options=options, param_names=[n for n, _ in model.named_parameters()]
    )


def _devices(run: RunView, devices: str | Sequence[Device] | None) -> list[Device]:
    if devices is None:
        return job_devices(run.device, timeout_s=run.collective_timeout_s)
    found = parse_devices(devices) if isinstance(devices, str) else list(devices)
    if len(found) != run.world_size:
        raise PlacementError(f"devices: {len(found)} declared, the job has {run.world_size} ranks")
    return found


def _profile(
    run: RunView,
    model: nn.Module,
    sample: torch.Tensor | Sequence[torch.Tensor],
    layers: Sequence[nn.Module] | None,
    options: ProfileOptions | None,
) -> ModelProfile:
    """Rank 0 measures (or finds the cached profile) alone; the others get it from rank 0."""
    raw: Any = None
    if run.rank == 0:
        device = run.device
        moved = device.type != "cpu"
        if moved:
            model.to(device)
        try:
            inputs = tuple(t.to(device) for t in as_inputs(sample))
            measured = cached_or_measured(run.storage, model, inputs, layers=layers, options=options)
        finally:
            if moved:
                model.to("cpu")
        raw = measured.model_dump(mode="json")
    return ModelProfile.model_validate(run.world.broadcast_json(raw, "placement: the model's profile"))


def _decide(
    run: RunView,
    devices: list[Device],
    profile: ModelProfile,
    global_batch: int,
    options: PlanOptions,
    force: bool,
) -> Replan:
    """Rank 0 decides; every rank gets its decision (or its refusal)."""
    raw: Any = None
    if run.rank == 0:
        try:
            previous = recorded_plan(run.storage, run.restorable_steps())
            raw = replan(devices, profile, global_batch, options, previous, force=force).model_dump(mode="json")
        except NoFeasiblePlanError as exc:
            raw = {"refused": str(exc)}
    raw = run.world.broadcast_json(raw, "placement: the plan")
    if "refused" in raw:
        raise NoFeasiblePlanError(raw["refused"])
    return Replan.model_validate(raw)


def _announce(decision: Replan) -> None:
    plan = decision.plan
    if decision.previous is not None and decision.changed:
        from rich.console import Console

        old = decision.previous.plan
        Console(file=sys.stderr, width=140).print(compare(old, plan, decision.reason))
        log.warning(
            "re-planned the placement (%s): %s -> %s\n%s",
            decision.reason,
            old.summary(),
            plan.summary(),
            compare_text(old, plan),
        )
    else:
        log.info("placement: %s (%s)", plan.summary(), decision.reason)
