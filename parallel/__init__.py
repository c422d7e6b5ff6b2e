"""Placement: device inventory, per-layer cost model, planner, and applying a plan.

    devices = parse_devices("2xH100,1xA100")            # or job_devices(): measured, every rank
    profile = profile_model(model, sample_micro_batch)  # or cached_or_measured(run_url, ...)
    plan = make_plan(devices, profile, global_batch=256)
    rich.print(plan.explain())
    placed = apply_plan(plan, model, loss_fn, sample_micro_batch)   # under torch.distributed

The package uses moai_ckpt's storage layer (profiles are cached in the run directory under
``plans/``) and never its CLI or decorator.
"""

from __future__ import annotations

from moai_ckpt.errors import DeviceSpecError, NoFeasiblePlanError, PlacementError, PlanMismatchError, ProfileError
from parallel.apply import Placed, apply_plan
from parallel.catalog import CATALOG, CatalogEntry
from parallel.costmodel import (
    LayerProfile,
    ModelProfile,
    ProfileOptions,
    analytic_profile,
    cached_or_measured,
    find_layers,
    load_profile,
    profile_model,
    save_profile,
)
from parallel.inventory import Device, job_devices, local_device, parse_devices
from parallel.partition import Split, split_layers
from parallel.plan import Candidate, Plan, RankRole, Stage, StepTime
from parallel.planner import PlanOptions, make_plan, rank_candidates

__all__ = [
    "CATALOG",
    "Candidate",
    "CatalogEntry",
    "Device",
    "DeviceSpecError",
    "LayerProfile",
    "ModelProfile",
    "NoFeasiblePlanError",
    "Placed",
    "PlacementError",
    "Plan",
    "PlanMismatchError",
    "PlanOptions",
    "ProfileError",
    "ProfileOptions",
    "RankRole",
    "Split",
    "Stage",
    "StepTime",
    "analytic_profile",
    "apply_plan",
    "cached_or_measured",
    "find_layers",
    "job_devices",
    "load_profile",
    "local_device",
    "make_plan",
    "parse_devices",
    "profile_model",
    "rank_candidates",
    "save_profile",
    "split_layers",
]
