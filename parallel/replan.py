"""Re-planning on restore: the plan a snapshot records, and the plan a job on other devices gets.

Each snapshot of a placed run records its plan and the planner's options in its manifest
(``info["placement"]``, committed with the snapshot). A job that restores it on the same devices
keeps that plan (re-planning on measured figures could flip between near-equal plans, and the
log replays bitwise only on the plan that wrote it); on other devices (a different count, type or
memory) it computes a new plan with the same options and global batch, and says what changed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich import box
from rich.markup import escape
from rich.table import Table

from moai_ckpt.errors import MoaiCkptError
from moai_ckpt.format import Manifest, load_commit, load_record, sha256
from moai_ckpt.layout import commit_key, manifest_key
from moai_ckpt.storage import Storage
from parallel.costmodel import ModelProfile, human
from parallel.inventory import Device, describe
from parallel.plan import Plan, _seconds, _split
from parallel.planner import PlanOptions, make_plan

log = logging.getLogger(__name__)

#: the key of a snapshot manifest's ``info`` that holds its `RecordedPlan`
INFO_KEY = "placement"


class RecordedPlan(BaseModel):
    """What a snapshot records about its placement."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    plan: Plan = Field(description="the plan the snapshot's job ran (its candidates left out)")
    options: PlanOptions = Field(description="what the planner was allowed to choose")
    step: int | None = Field(default=None, description="the snapshot's step (set when read back)")

    @classmethod
    def of(cls, plan: Plan, options: PlanOptions) -> RecordedPlan:
        return cls(plan=plan.model_copy(update={"candidates": ()}), options=options)

    def info(self) -> dict[str, Any]:
        """The manifest ``info`` entry that records it."""
        return {INFO_KEY: self.model_dump(mode="json", exclude={"step"})}


class Replan(BaseModel):
    """The plan a job runs, the one its snapshot recorded, and why they differ (or not)."""

    model_config = ConfigDict(frozen=True)

    plan: Plan
    previous: RecordedPlan | None
    reason: str

    @property
    def changed(self) -> bool:
        return self.previous is not None and _layout(self.previous.plan) != _layout(self.plan)


def _layout(plan: Plan) -> tuple[Any, ...]:
    c = plan.chosen
    return (
        len(plan.devices),
        c.dp,
        c.pp,
        c.data_parallel,
        c.schedule,
        c.micro_batches,
        c.micro_batch_size,
        tuple((s.start, s.stop, s.devices) for s in c.stages),
    )


def recorded_plan(storage: Storage, steps: Sequence[int]) -> RecordedPlan | None:
    """The plan recorded by the newest of ``steps`` (committed snapshots) that records one.

    A snapshot whose marker or manifest cannot be read is skipped (the restore will refuse it
    too); one without a plan ends the search (its job was not placed).
    """
    for step in sorted(steps, reverse=True):
        try:
            marker = load_commit(storage.read_record(commit_key(step)), url=storage.url, step=step)
            data = storage.read_record(manifest_key(step))
            manifest: Manifest = load_record(Manifest, data, url=storage.url, step=step, key=manifest_key(step))
        except (MoaiCkptError, FileNotFoundError) as exc:
            log.debug("no plan from the snapshot of step %d: %s", step, exc)
            continue
        if sha256(data) != marker.body.manifest_sha256:
            log.debug("no plan from the snapshot of step %d: its manifest fails its checksum", step)
            continue
        raw = manifest.info.get(INFO_KEY)
        if raw is None:
            return None
        try:
            return RecordedPlan.model_validate({**raw, "step": step})
        except ValidationError as exc:
            log.warning("the plan recorded with the snapshot of step %d is unreadable: %s", step, exc)
            return None
    return None


def same_devices(a: Sequence[Device], b: Sequence[Device]) -> bool:
    """The same count of the same device types with about the same memory, in rank order.

    Measured speeds are not compared: they vary from one probe to the next.
    """
    return len(a) == len(b) and all(
        x.type == y.type and abs(x.memory_bytes - y.memory_bytes) <= 0.05 * max(x.memory_bytes, y.memory_bytes)
        for x, y in zip(a, b, strict=True)
    )


def replan(
    devices: Sequence[Device],
    profile: ModelProfile,
    global_batch: int,
    options: PlanOptions,
    previous: RecordedPlan | None,
    *,
    force: bool = False,
) -> Replan:
    """The plan for a job on ``devices``: the recorded one if nothing it depends on changed.

    Raises:
        NoFeasiblePlanError: a new plan is needed and nothing fits.
    """
    if previous is not None and not force:
        old = previous.plan
        why = _why_new(old, previous.options, devices, profile, global_batch, options)
        if why is None:
            return Replan(plan=old, previous=previous, reason="devices unchanged: the snapshot's plan is kept")
    else:
        why = "re-planning was asked for" if previous is not None else "no plan recorded"
    return Replan(plan=make_plan(devices, profile, global_batch, options), previous=previous, reason=why)


def _why_new(
    old: Plan,
    old_options: PlanOptions,
    devices: Sequence[Device],
    profile: ModelProfile,
    global_batch: int,
    options: PlanOptions,
) -> str | None:
    if not same_devices(old.devices, devices):
        return f"devices changed: {describe(list(old.devices))} -> {describe(list(devices))}"
    if old.global_batch != global_batch:
        return f"global batch changed: {old.global_batch} -> {global_batch}"
    if old.layer_names != tuple(layer.name for layer in profile.layers):
        return "the model's layers changed"
    if old_options != options:
        return "the planner's options changed"
    return None


def compare(old: Plan, new: Plan, reason: str = "") -> Table:
    """A rich table of two plans side by side: the snapshot's and the one a restore uses."""
    table = Table(
        title=f"re-planned: {escape(reason)}" if reason else "placement",
        title_justify="left",
        box=box.SIMPLE,
        show_edge=False,
        pad_edge=False,
    )
    table.add_column("", style="bold", no_wrap=True)
    table.add_column("snapshot's plan")
    table.add_column("new plan")
    for what, a, b in _rows(old, new):
        style = "" if a == b else "yellow"
        table.add_row(what, escape(a), escape(b), style=style)
    return table


def _rows(old: Plan, new: Plan) -> list[tuple[str, str, str]]:
    def layout(p: Plan) -> str:
        c = p.chosen
        return f"dp{c.dp} x pp{c.pp}, {c.data_parallel if c.dp > 1 else 'no data parallel'}" + (
            f", {c.schedule}" if c.pp > 1 else ""
        )

    def stages(p: Plan) -> str:
        return "; ".join(f"{s.first_layer}..{s.last_layer} on {', '.join(map(str, s.devices))}" for s in p.stages)

    def memory(p: Plan) -> str:
        fullest = max(p.stages, key=lambda s: s.memory_bytes)
        return f"{human(fullest.memory_bytes)} of {human(fullest.memory_available)}"

    return [
        ("devices", describe(list(old.devices)), describe(list(new.devices))),
        ("ranks", str(old.world_size), str(new.world_size)),
        ("layout", layout(old), layout(new)),
        ("global batch", str(old.global_batch), str(new.global_batch)),
        (
            "micro-batches",
            f"{old.chosen.micro_batches} x {old.chosen.micro_batch_size} per replica",
            f"{new.chosen.micro_batches} x {new.chosen.micro_batch_size} per replica",
        ),
        ("layers per stage", _split(old.chosen), _split(new.chosen)),
        ("stages", stages(old), stages(new)),
        ("predicted step", _seconds(old.predicted_step_s), _seconds(new.predicted_step_s)),
        ("peak memory", memory(old), memory(new)),
    ]


def compare_text(old: Plan, new: Plan) -> str:
    """The comparison as plain lines, for logs."""
    return "\n".join(f"  {what}: {a} -> {b}" if a != b else f"  {what}: {a}" for what, a, b in _rows(old, new))
