"""Checking a replayed step against its log record, and the report of a whole replay.

On the placement and device type that wrote the log, a replay must reproduce every record
bitwise; the first quantity that differs (inputs first: samples, hyperparameters, RNG states;
then outputs: loss, grad norm, each rank's exact digest of every state entry, each parameter's
norm) names the divergence, e.g. ``state model/b2.running_var (rank 1)``. On another placement
the numbers may move: each step's drift is measured and reported instead, and the exact state
digests, which depend on the placement, are not compared.
"""

from __future__ import annotations

import math
from array import array

from pydantic import BaseModel, ConfigDict, Field

from replay.log import Placement, StepRecord

#: one rank's state entries: (names, digests), in the same order
RankState = tuple[list[str], list[str]]
MAX_LISTED = 64  # differing parameters, and differing state entries, named per step


def params_array(data: bytes | None) -> list[float]:
    """Per-parameter norms from their blob (float64, little-endian)."""
    if not data:
        return []
    values = array("d")
    values.frombytes(data)
    return values.tolist()


def params_blob(values: list[float]) -> bytes:
    return array("d", values).tobytes()


def rel(a: float | None, b: float | None) -> float | None:
    """|a - b| / |a| (0 when equal; None when either is missing)."""
    if a is None or b is None:
        return None
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    return abs(a - b) / max(abs(a), 1e-30)


class StepCheck(BaseModel):
    """One replayed step against its record."""

    model_config = ConfigDict(extra="forbid")

    step: int
    bitwise: bool
    mismatches: list[str] = Field(default_factory=list, description="quantities that differ, inputs first")
    loss_logged: float | None = None
    loss_replayed: float | None = None
    loss_rel: float | None = None
    grad_norm_rel: float | None = None
    state_entries_differing: int = Field(default=0, description="state entries whose exact digests differ (all ranks)")
    state_rel: float | None = None
    worst_param: str | None = None
    worst_param_rel: float | None = None

    @property
    def first(self) -> str | None:
        return self.mismatches[0] if self.mismatches else None

    def describe(self) -> str:
        if self.bitwise:
            return f"step {self.step}: bitwise equal"
        parts = [f"step {self.step}: first divergent quantity {self.first}"]
        if self.state_entries_differing:
            parts.append(f"{self.state_entries_differing} state entries differ")
        if self.loss_rel:
            parts.append(f"loss {self.loss_logged!r} logged, {self.loss_replayed!r} replayed (rel {self.loss_rel:.3g})")
        if self.state_rel:
            parts.append(f"parameter norm rel {self.state_rel:.3g}")
        if self.worst_param_rel:
            parts.append(f"most moved parameter {self.worst_param} (rel {self.worst_param_rel:.3g})")
        return "; ".join(parts)


def compare(
    logged: StepRecord,
    replayed: StepRecord,
    logged_params: list[float],
    replayed_params: list[float],
    names: list[str],
    state: tuple[list[RankState], list[RankState]] | None = None,
) -> StepCheck:
    """Compare what a replayed step read and produced with what its record holds.

    ``state``: every rank's exact state digests, (logged, replayed), when they are to be
    compared (same placement, both records hold them).
    """
    mismatches: list[str] = []
    if logged.samples is not None and logged.samples != replayed.samples:
        mismatches.append("samples")
    if logged.batch is not None and replayed.batch is not None and logged.batch != replayed.batch:
        mismatches.append("batch")
    for key in sorted(set(logged.hparams) | set(replayed.hparams)):
        if logged.hparams.get(key) != replayed.hparams.get(key):
            mismatches.append(f"hparam {key}")
    for rank in sorted(set(logged.rng) & set(replayed.rng)):
        for gen in sorted(set(logged.rng[rank]) & set(replayed.rng[rank])):
            if logged.rng[rank][gen] != replayed.rng[rank][gen]:
                mismatches.append(f"rng {rank}.{gen}")
    a, b = logged.digests, replayed.digests
    if a.loss != b.loss:
        mismatches.append("loss")
    if a.grad_norm != b.grad_norm:
        mismatches.append("grad_norm")
    differing = state_mismatches(*state) if state is not None else []
    mismatches.extend(differing[:MAX_LISTED])
    worst, worst_rel = None, None
    if len(logged_params) == len(replayed_params) == len(names):
        listed: set[str] = set()
        for name, x, y in zip(names, logged_params, replayed_params, strict=True):
            r = rel(x, y)
            if r and (worst_rel is None or r > worst_rel):
                worst, worst_rel = name, r
            if x != y and name not in listed and len(listed) < MAX_LISTED:
                listed.add(name)
                mismatches.append(f"param {name}")
    elif a.state != b.state:
        mismatches.append("state")
    state_rel = rel(_unhex(a.state), _unhex(b.state))
    return StepCheck(
        step=logged.step,
        bitwise=not mismatches,
        mismatches=mismatches,
        loss_logged=a.loss,
        loss_replayed=b.loss,
        loss_rel=rel(a.loss, b.loss),
        grad_norm_rel=rel(a.grad_norm, b.grad_norm),
        state_entries_differing=len(differing),
        state_rel=state_rel,
        worst_param=worst,
        worst_param_rel=worst_rel,
    )


def state_mismatches(logged: list[RankState], replayed: list[RankState]) -> list[str]:
    """``state <entry> (rank <r>)`` for every entry whose digest differs, rank by rank, in entry order.

    An entry only one side holds differs too; so does every rank when the rank counts differ.
    """
    if len(logged) != len(replayed):
        return [f"state of {len(replayed)} ranks against {len(logged)} logged"]
    out: list[str] = []
    for rank, ((logged_names, logged_digests), (names, digests)) in enumerate(zip(logged, replayed, strict=True)):
        if logged_names == names:
            out.extend(
                f"state {n} (rank {rank})" for n, x, y in zip(names, logged_digests, digests, strict=True) if x != y
            )
            continue
        before, now = dict(zip(logged_names, logged_digests, strict=True)), dict(zip(names, digests, strict=True))
        for name in [*logged_names, *(n for n in names if n not in before)]:
            if before.get(name) != now.get(name):
                out.append(f"state {name} (rank {rank})")
    return out


def _unhex(value: str | None) -> float | None:
    return float.fromhex(value) if value else None


class RecoveryPhases(BaseModel):
    """Where the time of one restart went, from the previous incarnation's last sign of life to live training.

    Each phase is measured on the rank that writes the report (rank 0); a phase that cannot be
    measured is None.
    """

    model_config = ConfigDict(extra="forbid")

    detection_s: float | None = Field(
        default=None,
        description="the previous incarnation's last sign of life (its last log record or lease renewal) "
        "to this process's start",
    )
    start_s: float | None = Field(default=None, description="this process's start to moai_ckpt's run package imported")
    process_group_s: float | None = Field(
        default=None, description="imported to the run's process groups built (the job's init_process_group included)"
    )
    setup_s: float | None = Field(default=None, description="the run built to its restore beginning (model, track)")
    restore_s: float = Field(default=0.0, description="choosing, reading, checking and loading the snapshot")
    restore_tier: str = Field(
        default="persistent", description="where this rank's snapshot came from: local or persistent"
    )
    restore_bytes: int = Field(default=0, ge=0, description="the restored snapshot's size")
    replay_s: float = 0.0
    replayed_steps: int = 0
    total_s: float | None = Field(default=None, description="this process's start to live training")


class ReplayReport(BaseModel):
    """What a replay did: the steps it checked and how they compared with the log."""

    model_config = ConfigDict(extra="forbid")

    base_step: int = Field(description="the snapshot the replay started from")
    first_step: int
    last_step: int = Field(description="the last step replayed")
    logged_last_step: int = Field(description="the last step the log holds")
    strict: bool = Field(description="same placement and device type: every step must be bitwise equal")
    placement_logged: Placement | None = None
    placement_now: Placement
    placement_changes: list[str] = Field(default_factory=list)
    steps: list[StepCheck] = Field(default_factory=list)
    rng_not_restored: list[str] = Field(default_factory=list, description="logged generators this process lacks")
    log_problem: str | None = Field(default=None, description="why the log ends early (damage), if it does")
    from_initial_state: bool = Field(
        default=False, description="no snapshot was usable: replayed from the state the training function built"
    )
    rank_local: dict[str, str] = Field(
        default_factory=dict,
        description="rank-local arrays of the restored snapshot -> which copy the ranks restored",
    )
    restore_s: float = 0.0
    replay_s: float = 0.0
    snapshot_s: float = 0.0
    recovery: RecoveryPhases | None = Field(default=None, description="the restart's phases (None: a new run)")

    @property
    def replayed(self) -> int:
        return len(self.steps)

    @property
    def bitwise(self) -> bool:
        return all(s.bitwise for s in self.steps)

    def first_divergence(self) -> StepCheck | None:
        return next((s for s in self.steps if not s.bitwise), None)

    def max_drift(self) -> dict[str, float]:
        """The largest relative drift of loss, grad norm and parameter norm over the replay."""
        out = {}
        for field in ("loss_rel", "grad_norm_rel", "state_rel", "worst_param_rel"):
            values = [getattr(s, field) for s in self.steps if getattr(s, field) is not None]
            out[field] = max(values, default=0.0)
        return out
