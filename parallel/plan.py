"""Plans: what the planner chose, why, and what it predicts; JSON-able, recorded with snapshots.

A `Plan` places a model on a device set as ``dp`` data-parallel replicas of a ``pp``-stage
pipeline. Rank ``r`` of the job plays `Plan.ranks` ``[r]``: a data-parallel rank and a stage.
Every replica processes ``micro_batches`` micro-batches of ``micro_batch_size`` samples per
step, so ``dp * micro_batches * micro_batch_size`` is the global batch, exactly.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich import box
from rich.markup import escape
from rich.table import Table

from parallel.inventory import Device, describe

DataParallel = Literal["none", "ddp", "fsdp"]
Schedule = Literal["none", "gpipe", "1f1b"]


class StepTime(BaseModel):
    """Predicted seconds of one optimizer step, by part."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    total: float = Field(ge=0)
    compute: float = Field(ge=0, description="forward + backward of the bottleneck stage, all micro-batches")
    bubble: float = Field(ge=0, description="pipeline fill and drain: (p-1)/(m+p-1) of the pipeline time")
    pipeline_comm: float = Field(ge=0, description="activation and gradient sends between stages")
    data_parallel_comm: float = Field(ge=0, description="gradient all-reduce, or FSDP all-gather + reduce-scatter")
    optimizer: float = Field(ge=0, description="the optimizer step (memory-bound)")


class Stage(BaseModel):
    """One pipeline stage: its layers, its devices, and what it costs them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(ge=0)
    start: int = Field(ge=0, description="first layer (index into the profile's layers)")
    stop: int = Field(gt=0, description="one past the last layer")
    first_layer: str
    last_layer: str
    devices: tuple[int, ...] = Field(description="the job's device indices of this stage's replicas")
    device_type: str = Field(description="the slowest of them")
    seconds: float = Field(ge=0, description="forward + backward of one micro-batch, with its sends")
    memory_bytes: int = Field(ge=0, description="predicted peak memory per device")
    memory_available: int = Field(ge=0, description="usable memory of the smallest of its devices")

    @property
    def layers(self) -> int:
        return self.stop - self.start


class RankRole(BaseModel):
    """What one rank of the job does under a plan."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int = Field(ge=0)
    device: int = Field(ge=0, description="index into the plan's device list")
    dp_rank: int = Field(ge=0)
    stage: int = Field(ge=0)


class Candidate(BaseModel):
    """One configuration the planner weighed, with its prediction or why it was refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dp: int = Field(ge=1, description="data-parallel degree (replicas)")
    pp: int = Field(ge=1, description="pipeline degree (stages)")
    data_parallel: DataParallel
    schedule: Schedule
    micro_batch_size: int = Field(ge=1)
    micro_batches: int = Field(ge=1, description="per replica per step (gradient accumulation when pp = 1)")
    devices_used: int = Field(ge=1)
    stages: tuple[Stage, ...] = ()
    time: StepTime | None = None
    rejected: str | None = Field(default=None, description="why it cannot run; None when it fits")

    @property
    def fits(self) -> bool:
        return self.rejected is None

    @property
    def peak_memory(self) -> int:
        return max((s.memory_bytes for s in self.stages), default=0)

    @property
    def label(self) -> str:
        """``dp2 x pp2 ddp 1f1b m4 x 8``."""
        return (
            f"dp{self.dp} x pp{self.pp} {self.data_parallel} {self.schedule} "
            f"m{self.micro_batches} x {self.micro_batch_size}"
        )


class Plan(BaseModel):
    """The chosen placement, with the candidates it was chosen from.

    Attributes mirror the chosen `Candidate`; ``candidates`` holds the best feasible ones in rank
    order (the chosen one first) and the closest refused ones.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: int = 1
    global_batch: int = Field(gt=0)
    devices: tuple[Device, ...] = Field(min_length=1, description="every device of the job, in rank order")
    chosen: Candidate
    ranks: tuple[RankRole, ...] = Field(min_length=1, description="rank r plays ranks[r]")
    num_layers: int = Field(gt=0)
    layer_names: tuple[str, ...]
    profile: str = Field(description="the profile's key (device type, model hash, source)")
    candidates: tuple[Candidate, ...] = ()
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        c = self.chosen
        if c.rejected is not None:
            raise ValueError(f"chosen: a plan cannot be a refused candidate ({c.rejected})")
        if c.dp * c.micro_batches * c.micro_batch_size != self.global_batch:
            raise ValueError(
                f"global_batch: dp {c.dp} x micro_batches {c.micro_batches} x micro_batch_size "
                f"{c.micro_batch_size} != {self.global_batch}"
            )
        if len(self.ranks) != c.dp * c.pp or [r.rank for r in self.ranks] != list(range(len(self.ranks))):
            raise ValueError(f"ranks: expected ranks 0..{c.dp * c.pp - 1}, one per (dp rank, stage)")
        if len(c.stages) != c.pp or c.stages[0].start != 0 or c.stages[-1].stop != self.num_layers:
            raise ValueError(f"chosen.stages: {c.pp} contiguous stages must cover the {self.num_layers} layers")
        return self

    # -- the chosen candidate's figures --------------------------------------------------------

    @property
    def dp(self) -> int:
        return self.chosen.dp

    @property
    def pp(self) -> int:
        return self.chosen.pp

    @property
    def world_size(self) -> int:
        return self.chosen.dp * self.chosen.pp

    @property
    def stages(self) -> tuple[Stage, ...]:
        return self.chosen.stages

    @property
    def predicted_step_s(self) -> float:
        assert self.chosen.time is not None
        return self.chosen.time.total

    def role(self, rank: int) -> RankRole:
        """What ``rank`` does (raises IndexError outside the plan's world)."""
        return self.ranks[rank]

    def rank_of(self, dp_rank: int, stage: int) -> int:
        for r in self.ranks:
            if r.dp_rank == dp_rank and r.stage == stage:
                return r.rank
        raise IndexError(f"no rank plays dp rank {dp_rank}, stage {stage}")

    def summary(self) -> str:
        """One line: ``dp2 x pp2 ddp 1f1b m4 x 8 on 4xCPU*: 12.3 ms/step``."""
        used = [self.devices[r.device] for r in self.ranks]
        return f"{self.chosen.label} on {describe(used)}: {_seconds(self.predicted_step_s)}/step"

    def explain(self, top: int = 8) -> Table:
        """A rich table of the best candidates (the chosen one first) and the closest refused ones."""
        return explain(self, top)


def _seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def _split(c: Candidate) -> str:
    return "/".join(str(s.layers) for s in c.stages) if c.stages else "-"


def _short(nbytes: int) -> str:
    """``481K``, ``67G``: bytes in four characters or so (binary units)."""
    value = float(nbytes)
    for unit in ("", "K", "M", "G", "T"):
        if value < 1000:
            return f"{value:.0f}{unit}" if value >= 10 or unit == "" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.0f}P"


def explain(plan: Plan, top: int = 8) -> Table:
    """The candidates table `Plan.explain` returns."""
    devices = describe(list(plan.devices))
    table = Table(
        title=f"placements of {plan.num_layers} layers on {escape(devices)}, global batch {plan.global_batch}",
        title_justify="left",
        box=box.SIMPLE,
        show_edge=False,
        pad_edge=False,
        caption="layout: dp x pp, data-parallel wrapper, schedule; micro: micro-batches x size per replica; "
        "memory: predicted peak per device of the fullest stage / usable. "
        "* measured device; others are nominal datasheet figures",
        caption_justify="left",
    )
    for name, justify in (
        ("#", "right"),
        ("step", "right"),
        ("compute", "right"),
        ("bubble", "right"),
        ("comm", "right"),
        ("layout", "left"),
        ("micro", "right"),
        ("stages", "left"),
        ("memory", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    table.add_column("note", ratio=1, min_width=12)
    feasible = [c for c in plan.candidates if c.fits][:top]
    refused = [c for c in plan.candidates if not c.fits][: max(2, top // 3)]
    for i, c in enumerate(feasible + refused):
        t = c.time
        fullest = max(c.stages, key=lambda s: s.memory_bytes / max(s.memory_available, 1), default=None)
        schedule = c.schedule if c.pp > 1 else ("accum" if c.micro_batches > 1 else "-")
        layout = f"{c.dp}x{c.pp} {c.data_parallel if c.dp > 1 else '-'} {schedule}"
        notes = []
        if c.devices_used < len(plan.devices):
            notes.append(f"{c.devices_used} of {len(plan.devices)} devices")
        notes.append(c.rejected or ("chosen" if c == plan.chosen else _slower(c, plan.chosen)))
        table.add_row(
            str(i + 1) if c.fits else "-",
            _seconds(t.total) if t else "-",
            _seconds(t.compute) if t else "-",
            _seconds(t.bubble) if t else "-",
            _seconds(t.pipeline_comm + t.data_parallel_comm) if t else "-",
            layout,
            f"{c.micro_batches}x{c.micro_batch_size}" if c.stages else "-",
            _split(c),
            f"{_short(fullest.memory_bytes)}/{_short(fullest.memory_available)}" if fullest else "-",
            escape("; ".join(n for n in notes if n)),
            style="bold green" if c == plan.chosen else ("dim" if not c.fits else ""),
        )
    return table


def _slower(c: Candidate, chosen: Candidate) -> str:
    if c.time is None or chosen.time is None or chosen.time.total <= 0:
        return ""
    return f"{c.time.total / chosen.time.total:.2f}x slower"
