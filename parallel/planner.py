"""The placement planner: data / pipeline degrees, stage split, micro-batching and schedule.

For a device set, a model profile and a fixed global batch ``B``, `make_plan` weighs every

- data-parallel degree ``dp`` (DDP, or FSDP2 when it saves memory) and pipeline degree ``pp``
  with ``dp * pp`` devices (all of them, or the fastest ``k`` when fewer run faster),
- micro-batch size ``b`` and count ``m`` with ``dp * m * b == B`` exactly (``m`` is gradient
  accumulation when ``pp == 1``),
- schedule: GPipe (all ``m`` micro-batches' activations in flight) or 1F1B (stage ``i`` of ``p``
  holds ``min(p - i, m)``),

splits the layers over the stages by dynamic programming (`parallel.partition`) on the stage
devices' own layer times (a faster device gets more layers) and memory (a split that does not
fit is never chosen), predicts the step time, and ranks the candidates. The prediction:

    pipeline  = (m + p - 1) * t_max          t_max: the slowest stage's time per micro-batch
    compute   = m * (its forward + backward)  pipeline_comm = m * (its activation sends)
    bubble    = (p - 1) * t_max  =  (p - 1) / (m + p - 1) of the pipeline time
    dp_comm   = ring all-reduce 2 (dp-1)/dp * grads / link (DDP), or all-gather of parameters and
                reduce-scatter of gradients (FSDP; per micro-batch when pp == 1), not overlapped
                (``comm_overlap`` hides a fraction behind backward)
    optimizer = bytes the optimizer step reads and writes / memory bandwidth
    step      = compute + bubble + pipeline_comm + dp_comm + optimizer
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from itertools import accumulate, permutations
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moai_ckpt.errors import DeviceSpecError, NoFeasiblePlanError
from parallel.costmodel import ModelProfile, human
from parallel.inventory import MAX_DEVICES, Device, describe
from parallel.partition import Split, split_layers
from parallel.plan import Candidate, DataParallel, Plan, RankRole, Schedule, Stage, StepTime

#: micro-batch counts the search tries per replica, at most (with `MAX_DEVICES`, the search stays
#: finite whatever the request)
MAX_MICRO_BATCHES = 4096


class PlanOptions(BaseModel):
    """What the planner may choose from, and how it accounts memory and communication."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data_parallel: tuple[Literal["ddp", "fsdp"], ...] = Field(
        default=("ddp", "fsdp"), min_length=1, description="data-parallel wrappers to consider"
    )
    schedules: tuple[Literal["1f1b", "gpipe"], ...] = Field(
        default=("1f1b", "gpipe"), min_length=1, description="pipeline schedules to consider"
    )
    dp: int | None = Field(default=None, ge=1, description="only this data-parallel degree (default: any)")
    pp: int | None = Field(default=None, ge=1, description="only this pipeline degree (default: any)")
    max_pipeline: int | None = Field(default=None, ge=1, description="largest pipeline degree (default: any)")
    micro_batches: int | None = Field(
        default=None, ge=1, description="only this many micro-batches per replica per step (default: any)"
    )
    max_micro_batches: int = Field(
        default=64, ge=1, le=MAX_MICRO_BATCHES, description="most micro-batches per replica per step"
    )
    min_micro_batch: int = Field(default=1, ge=1, description="smallest micro-batch size")
    memory_fraction: float = Field(
        default=0.9, gt=0, le=1, description="share of each device's memory the plan may fill"
    )
    reserve_bytes: int = Field(default=0, ge=0, description="memory kept free per device (runtime, allocator)")
    comm_overlap: float = Field(
        default=0.0, ge=0, lt=1, description="fraction of data-parallel communication hidden behind backward"
    )
    use_all_devices: bool = Field(default=False, description="only plans that use every device")
    max_orders: int = Field(default=24, ge=1, description="stage orders tried for mixed device types")
    keep: int = Field(default=12, ge=1, description="feasible candidates recorded in the plan")
    keep_refused: int = Field(default=6, ge=0, description="closest refused candidates recorded in the plan")

    @model_validator(mode="after")
    def _distinct(self) -> PlanOptions:
        for name in ("data_parallel", "schedules"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name}: repeated entries {values}")
        return self


class _Refused(BaseModel):
    """A refused candidate and how far it was from fitting (for choosing which to report)."""

    candidate: Candidate
    overflow: float


class _Column:
    """The devices of one stage across the replicas, and what one micro-batch costs on them."""

    def __init__(self, indices: list[int], devices: Sequence[Device], profile: ModelProfile, mb: int) -> None:
        self.indices = indices
        members = [devices[i] for i in indices]
        self.slowest = min(members, key=lambda d: d.flops)
        self.memory = min(d.memory_bytes for d in members)
        self.link = min(d.link_bandwidth for d in members)
        self.latency = max(d.link_latency for d in members)
        self.bandwidth = min(d.memory_bandwidth for d in members)
        times = profile.layer_times(self.slowest, mb)
        self.prefix = [0.0, *accumulate(f + b for f, b in times)]
        self.signature = tuple(sorted(devices[i].type for i in indices))


class _Model:
    """Prefix sums and range maxima of the profile's per-layer figures."""

    def __init__(self, profile: ModelProfile) -> None:
        layers = profile.layers
        self.n = len(layers)
        self.params = [0, *accumulate(x.param_bytes for x in layers)]
        self.grads = [0, *accumulate(x.grad_bytes for x in layers)]
        self.optim = [0, *accumulate(x.optimizer_bytes for x in layers)]
        self.acts = [0.0, *accumulate(x.activation_bytes for x in layers)]
        self.outputs = [x.output_bytes for x in layers]
        self.inputs = [x.input_bytes for x in layers]
        self.largest = _RangeMax([x.param_bytes + x.grad_bytes for x in layers])

    def state(self, j: int, k: int) -> tuple[int, int, int]:
        return self.params[k] - self.params[j], self.grads[k] - self.grads[j], self.optim[k] - self.optim[j]


class _RangeMax:
    """O(1) maxima over index ranges (a sparse table)."""

    def __init__(self, values: list[int]) -> None:
        self.table = [values]
        width = 1
        while 2 * width <= len(values):
            prev = self.table[-1]
            self.table.append([max(prev[i], prev[i + width]) for i in range(len(values) - 2 * width + 1)])
            width *= 2

    def __call__(self, j: int, k: int) -> int:
        level = (k - j).bit_length() - 1
        row = self.table[level]
        return max(row[j], row[k - (1 << level)])


class _Config(BaseModel):
    """One point of the search: degrees, wrapper, schedule, micro-batching."""

    model_config = ConfigDict(frozen=True)

    dp: int
    pp: int
    data_parallel: DataParallel
    schedule: Schedule
    micro_batch_size: int
    micro_batches: int
    devices_used: int


class _Search:
    def __init__(
        self, devices: Sequence[Device], profile: ModelProfile, global_batch: int, options: PlanOptions
    ) -> None:
        self.devices = devices
        self.profile = profile
        self.global_batch = global_batch
        self.options = options
        self.model = _Model(profile)
        self.fitting: list[Candidate] = []
        self.refused: list[_Refused] = []
        self._splits: dict[tuple[tuple[tuple[int, ...], ...], int], Split] = {}

    # -- memory and time of one stage ----------------------------------------------------------

    def _in_flight(self, cfg: _Config, stage: int) -> int:
        if cfg.schedule == "gpipe":
            return cfg.micro_batches
        if cfg.schedule == "1f1b":
            return min(cfg.pp - stage, cfg.micro_batches)
        return 1

    def memory(self, cfg: _Config, stage: int, j: int, k: int) -> int:
        """Predicted peak bytes per device of ``stage`` holding layers [j, k)."""
        return int(sum(self._memory_parts(cfg, stage, j, k))) + self.options.reserve_bytes

    def _memory_parts(self, cfg: _Config, stage: int, j: int, k: int) -> tuple[float, float, float]:
        """(state, activations, boundary buffers) bytes per device."""
        m = self.model
        params, grads, optim = m.state(j, k)
        if cfg.data_parallel == "fsdp" and cfg.pp == 1:
            # sharded state, plus the unsharded parameters and gradients of about two layers at a time
            state = (params + grads + optim) / cfg.dp + 2 * m.largest(j, k)
        elif cfg.data_parallel == "fsdp":
            # in a pipeline, parameters stay unsharded and gradients accumulate unsharded over the
            # micro-batches; only the optimizer state (and the shards) stay divided
            state = params + grads + (params + grads + optim) / cfg.dp
        elif cfg.data_parallel == "ddp":
            state = params + 2 * grads + optim  # DDP copies gradients into its communication buckets
        else:
            state = params + grads + optim
        flight = self._in_flight(cfg, stage)
        acts = flight * cfg.micro_batch_size * (m.acts[k] - m.acts[j])
        buffers = flight * cfg.micro_batch_size * ((m.outputs[k - 1] if k < m.n else 0) + (m.inputs[j] if j else 0))
        return state, acts, buffers

    def memory_detail(self, cfg: _Config, stage: int, j: int, k: int) -> str:
        """What the predicted memory is made of, for a refusal."""
        params, grads, optim = self.model.state(j, k)
        acts = self._memory_parts(cfg, stage, j, k)[1]
        flight = self._in_flight(cfg, stage)
        return (
            f"parameters {human(params)}, gradients {human(grads)}, optimizer {human(optim)}"
            + (f" ({cfg.data_parallel} over {cfg.dp})" if cfg.data_parallel == "fsdp" else "")
            + f", activations {human(acts)} for {flight} micro-batch{'es' if flight > 1 else ''} in flight"
        )

    def usable(self, column: _Column) -> int:
        return int(column.memory * self.options.memory_fraction)

    def stage_cost(self, cfg: _Config, columns: list[_Column], i: int, j: int, k: int) -> tuple[float, float]:
        """(compute, sends) seconds of stage ``i`` on layers [j, k) for one micro-batch."""
        col = columns[i]
        compute = col.prefix[k] - col.prefix[j]
        sends = 0.0
        b = cfg.micro_batch_size
        if i < cfg.pp - 1:
            sends += self.model.outputs[k - 1] * b / min(col.link, columns[i + 1].link) + col.latency
        if i > 0:
            sends += self.model.inputs[j] * b / min(col.link, columns[i - 1].link) + col.latency
        return compute, sends

    def dp_comm(self, cfg: _Config, column: _Column, j: int, k: int) -> float:
        if cfg.dp == 1:
            return 0.0
        params, grads, _ = self.model.state(j, k)
        share = (cfg.dp - 1) / cfg.dp
        steps = cfg.dp - 1
        if cfg.data_parallel == "ddp":
            seconds = 2 * share * grads / column.link + 2 * steps * column.latency
        elif cfg.pp == 1:  # FSDP re-gathers every micro-batch and reduce-scatters its gradients
            seconds = cfg.micro_batches * (
                share * (2 * params + grads) / column.link + 3 * steps * (k - j) * column.latency
            )
        else:
            seconds = share * (params + grads) / column.link + 2 * steps * (k - j) * column.latency
        return seconds * (1 - self.options.comm_overlap)

    def optimizer_time(self, cfg: _Config, column: _Column, j: int, k: int) -> float:
        params, grads, optim = self.model.state(j, k)
        shard = cfg.dp if cfg.data_parallel == "fsdp" else 1
        return (2 * params + grads + 2 * optim) / shard / column.bandwidth

    # -- one configuration ---------------------------------------------------------------------

    def split(self, cfg: _Config, columns: list[_Column], memory_aware: bool) -> Split:
        # the time-optimal split depends only on the stage devices and the micro-batch size
        key = (tuple(tuple(c.indices) for c in columns), cfg.micro_batch_size)
        if not memory_aware and key in self._splits:
            return self._splits[key]

        def cost(i: int, j: int, k: int) -> float:
            if memory_aware and self.memory(cfg, i, j, k) > self.usable(columns[i]):
                return math.inf
            return sum(self.stage_cost(cfg, columns, i, j, k))

        def bound(i: int, j: int, k: int) -> float:
            # compute time and the state + activation bytes only grow with the stage (sends and
            # boundary buffers need not), so they bound the cost from below
            if memory_aware:
                state, acts, _ = self._memory_parts(cfg, i, j, k)
                if state + acts + self.options.reserve_bytes > self.usable(columns[i]):
                    return math.inf
            return columns[i].prefix[k] - columns[i].prefix[j]

        split = split_layers(self.model.n, cfg.pp, cost, bound)
        if not memory_aware:
            self._splits[key] = split
        return split

    def evaluate(self, cfg: _Config, columns: list[_Column], split: Split) -> tuple[Candidate, float]:
        """The candidate of one split, and how far its fullest stage overflows (0 when it fits)."""
        stages, rejected = [], None
        worst_overflow = 0.0
        s, compute = [], []
        dp_comm = opt = 0.0
        names = [layer.name for layer in self.profile.layers]
        for i, (j, k) in enumerate(split.stages):
            col = columns[i]
            need = self.memory(cfg, i, j, k)
            usable = self.usable(col)
            c, sends = self.stage_cost(cfg, columns, i, j, k)
            s.append(c + sends)
            compute.append(c)
            dp_comm = max(dp_comm, self.dp_comm(cfg, col, j, k))
            opt = max(opt, self.optimizer_time(cfg, col, j, k))
            stages.append(
                Stage(
                    index=i,
                    start=j,
                    stop=k,
                    first_layer=names[j],
                    last_layer=names[k - 1],
                    devices=tuple(col.indices),
                    device_type=col.slowest.label,
                    seconds=c + sends,
                    memory_bytes=need,
                    memory_available=usable,
                )
            )
            if need > usable and need / max(usable, 1) > worst_overflow:
                worst_overflow = need / max(usable, 1)
                where = f"stage {i}" if cfg.pp > 1 else "the model"
                rejected = (
                    f"does not fit: {where} (layers {names[j]}..{names[k - 1]}) on {col.slowest.label} "
                    f"(device{'s' if len(col.indices) > 1 else ''} {', '.join(map(str, col.indices))}) needs "
                    f"{human(need)} ({self.memory_detail(cfg, i, j, k)}), {human(usable)} usable of {human(col.memory)}"
                )
        m, p = cfg.micro_batches, cfg.pp
        bottleneck = max(range(p), key=lambda i: s[i])
        t_max = s[bottleneck]
        time = StepTime(
            total=m * t_max + (p - 1) * t_max + dp_comm + opt,
            compute=m * compute[bottleneck],
            bubble=(p - 1) * t_max,
            pipeline_comm=m * (t_max - compute[bottleneck]),
            data_parallel_comm=dp_comm,
            optimizer=opt,
        )
        return Candidate(**cfg.model_dump(), stages=tuple(stages), time=time, rejected=rejected), worst_overflow

    def configure(self, cfg: _Config, orders: list[list[_Column]]) -> None:
        """The best stage order and split of one configuration, kept or refused."""
        best: Candidate | None = None
        closest: _Refused | None = None
        for columns in orders:
            candidate, overflow = self.evaluate(cfg, columns, self.split(cfg, columns, memory_aware=False))
            if not candidate.fits and cfg.pp > 1:
                aware = self.split(cfg, columns, memory_aware=True)
                if aware.feasible:
                    candidate, overflow = self.evaluate(cfg, columns, aware)
            if candidate.fits:
                if best is None or _rank_key(candidate) < _rank_key(best):
                    best = candidate
            elif closest is None or overflow < closest.overflow:
                closest = _Refused(candidate=candidate, overflow=overflow)
        if best is not None:
            self.fitting.append(best)
        elif closest is not None:
            self.refused.append(closest)

    # -- the search ------------------------------------------------------------------------------

    def run(self) -> None:
        n, options = len(self.devices), self.options
        by_speed = sorted(range(n), key=lambda i: (-self.devices[i].flops, -self.devices[i].memory_bytes, i))
        for k in [n] if options.use_all_devices else range(n, 0, -1):
            chosen = by_speed[:k]
            for pp in _divisors(k):
                dp = k // pp
                if pp > self.model.n or (options.max_pipeline is not None and pp > options.max_pipeline):
                    continue
                if (options.dp is not None and dp != options.dp) or (options.pp is not None and pp != options.pp):
                    continue
                if self.global_batch % dp:
                    self._refuse_shape(
                        dp, pp, k, f"global batch {self.global_batch} does not split into {dp} equal shares"
                    )
                    continue
                for mb, configs in self._configs(dp, pp, k):
                    orders = self._orders(chosen, dp, pp, mb)
                    for cfg in configs:
                        self.configure(cfg, orders)

    def _configs(self, dp: int, pp: int, k: int) -> Iterator[tuple[int, list[_Config]]]:
        """Per micro-batch size, the configurations of ``dp`` x ``pp`` on ``k`` devices."""
        options = self.options
        local = self.global_batch // dp
        modes: tuple[DataParallel, ...] = options.data_parallel if dp > 1 else ("none",)
        schedules: tuple[Schedule, ...] = options.schedules if pp > 1 else ("none",)
        # micro-batch counts, not sizes, are enumerated: at most max_micro_batches of them, however
        # large the global batch (largest count first: the smallest micro-batches come first)
        counts = (
            [options.micro_batches] if options.micro_batches is not None else range(options.max_micro_batches, 0, -1)
        )
        for m in counts:
            if local % m or m > options.max_micro_batches:
                continue
            mb = local // m
            if mb < options.min_micro_batch:
                continue
            if pp > 1 and m < pp:
                continue  # PyTorch's pipeline schedules need at least one micro-batch per stage
            configs = [
                _Config(
                    dp=dp,
                    pp=pp,
                    data_parallel=mode,
                    schedule=schedule,
                    micro_batch_size=mb,
                    micro_batches=m,
                    devices_used=k,
                )
                for mode in modes
                for schedule in schedules
                # with one micro-batch GPipe and 1F1B are the same schedule
                if not (schedule == "gpipe" and m == 1 and "1f1b" in schedules)
            ]
            yield mb, configs

    def _orders(self, chosen: list[int], dp: int, pp: int, mb: int) -> list[list[_Column]]:
        """Stage orders worth trying: the device columns in distinct orders of their types."""
        columns = [_Column(chosen[c * dp : (c + 1) * dp], self.devices, self.profile, mb) for c in range(pp)]
        orders, seen = [], set()
        for perm in _bounded_permutations(columns, self.options.max_orders * 8):
            signature = tuple(c.signature for c in perm)
            if signature not in seen:
                seen.add(signature)
                orders.append(list(perm))
                if len(orders) >= self.options.max_orders:
                    break
        return orders

    def _refuse_shape(self, dp: int, pp: int, k: int, why: str) -> None:
        cfg = Candidate(
            dp=dp,
            pp=pp,
            data_parallel="ddp" if dp > 1 else "none",
            schedule="1f1b" if pp > 1 else "none",
            micro_batch_size=1,
            micro_batches=1,
            devices_used=k,
            rejected=why,
        )
        self.refused.append(_Refused(candidate=cfg, overflow=math.inf))


def _bounded_permutations(items: list[_Column], limit: int) -> Iterator[tuple[_Column, ...]]:
    if len({c.signature for c in items}) == 1:
        yield tuple(items)
        return
    for i, perm in enumerate(permutations(items)):
        if i >= limit:
            return
        yield perm


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


_MODE_ORDER = {"none": 0, "ddp": 1, "fsdp": 2}
_SCHEDULE_ORDER = {"none": 0, "1f1b": 1, "gpipe": 2}


def _rank_key(c: Candidate) -> tuple[float, int, int, int, int, int]:
    """Faster first; then fewer devices, less memory, DDP before FSDP, 1F1B before GPipe."""
    assert c.time is not None
    return (
        round(c.time.total, 12),
        c.devices_used,
        c.peak_memory,
        _MODE_ORDER[c.data_parallel],
        _SCHEDULE_ORDER[c.schedule],
        -c.micro_batch_size,
    )


def rank_candidates(
    devices: Sequence[Device], profile: ModelProfile, global_batch: int, options: PlanOptions | None = None
) -> tuple[list[Candidate], list[Candidate]]:
    """Every feasible candidate, best first, and the refused ones, closest to fitting first."""
    if global_batch <= 0:
        raise ValueError(f"global_batch must be positive, got {global_batch}")
    if not devices:
        raise ValueError("devices: at least one device is needed")
    if len(devices) > MAX_DEVICES:
        raise DeviceSpecError(f"devices: {len(devices)} devices, the planner plans for at most {MAX_DEVICES}")
    search = _Search(devices, profile, global_batch, options or PlanOptions())
    search.run()
    fitting = sorted(search.fitting, key=_rank_key)
    refused = [r.candidate for r in sorted(search.refused, key=lambda r: r.overflow)]
    return fitting, refused


def make_plan(
    devices: Sequence[Device], profile: ModelProfile, global_batch: int, options: PlanOptions | None = None
) -> Plan:
    """The fastest predicted placement of ``profile``'s model on ``devices`` at ``global_batch``.

    Args:
        devices: the job's devices in rank order (`parallel.inventory.parse_devices` or
            `parallel.inventory.job_devices`).
        profile: the model's per-layer profile (`parallel.costmodel.profile_model`).
        global_batch: samples per optimizer step; every candidate keeps it exactly.
        options: what to consider (`PlanOptions`).

    Returns:
        The chosen `Plan`, holding the ranked candidates and the closest refused ones.

    Raises:
        NoFeasiblePlanError: nothing fits; the message names the closest candidate, the stage and
            device, and the bytes needed and available.
    """
    options = options or PlanOptions()
    fitting, refused = rank_candidates(devices, profile, global_batch, options)
    if not fitting:
        closest = next((c for c in refused if c.stages), refused[0] if refused else None)
        why = f"; closest: {closest.label}: {closest.rejected}" if closest else ""
        raise NoFeasiblePlanError(
            f"no placement of the {profile.num_layers}-layer model on {describe(list(devices))} "
            f"at global batch {global_batch} fits{why}"
        )
    chosen = fitting[0]
    return Plan(
        global_batch=global_batch,
        devices=tuple(devices),
        chosen=chosen,
        ranks=_roles(chosen),
        num_layers=profile.num_layers,
        layer_names=tuple(layer.name for layer in profile.layers),
        profile=profile.key,
        candidates=tuple(fitting[: options.keep]) + tuple(refused[: options.keep_refused]),
    )


def _roles(c: Candidate) -> tuple[RankRole, ...]:
    """Ranks numbered in the order of the devices they use (all of them: rank = device index)."""
    placed = {device: (dp_rank, stage.index) for stage in c.stages for dp_rank, device in enumerate(stage.devices)}
    return tuple(
        RankRole(rank=r, device=device, dp_rank=placed[device][0], stage=placed[device][1])
        for r, device in enumerate(sorted(placed))
    )
