"""The placement planner: device declarations, stage splits, memory refusals, the global batch."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from rich.console import Console

from moai_ckpt.errors import DeviceSpecError, NoFeasiblePlanError
from parallel.catalog import CATALOG, identify, lookup
from parallel.costmodel import LayerProfile, ModelProfile
from parallel.inventory import describe, parse_devices
from parallel.partition import additive_cost, proportional_shares, split_layers
from parallel.plan import Plan
from parallel.planner import PlanOptions, make_plan, rank_candidates

GIB = 1 << 30


def uniform_profile(
    layers: int = 24, params: int = 50_000_000, flops_per_sample: float = 2e11, act_per_sample: float = 4e6
) -> ModelProfile:
    """An analytic profile of ``layers`` equal transformer-like layers (bf16 params, AdamW)."""
    layer = {
        "kind": "Block",
        "params": params,
        "param_bytes": 2 * params,
        "grad_bytes": 2 * params,
        "optimizer_bytes": 8 * params,
        "activation_bytes": act_per_sample,
        "output_bytes": act_per_sample / 8,
        "input_bytes": act_per_sample / 8,
        "forward_flops": flops_per_sample,
        "backward_flops": 2 * flops_per_sample,
    }
    return ModelProfile(
        model_hash="0" * 16,
        source="analytic",
        device=parse_devices("H100")[0],
        micro_batch=1,
        layers=tuple(LayerProfile(name=f"blocks.{i}", **layer) for i in range(layers)),
    )


# -- declarations and the catalog ---------------------------------------------------------------


def test_a_declaration_reads_counts_aliases_and_memory_overrides() -> None:
    devices = parse_devices("2xH100, 1xA100,cpu:2GiB")
    assert [d.type for d in devices] == ["H100-SXM", "H100-SXM", "A100-80GB", "CPU"]
    assert devices[3].memory_bytes == 2 * GIB
    assert all(d.source == "catalog" for d in devices)
    assert describe(devices) == "2xH100-SXM,1xA100-80GB,1xCPU"


@pytest.mark.parametrize("spec", ["2xH1000", "0xH100", "2xH100:12parsecs", "", "2x"])
def test_a_bad_declaration_is_refused_with_the_known_types(spec: str) -> None:
    with pytest.raises(DeviceSpecError) as info:
        parse_devices(spec)
    assert isinstance(info.value, ValueError)
    if "H1000" in spec:
        assert "H100-SXM" in str(info.value) and "MI300X" in str(info.value)


def test_the_catalog_holds_nominal_datasheet_figures_for_the_common_accelerators() -> None:
    names = {e.type for e in CATALOG}
    expected = {"H100-SXM", "H100-PCIe", "H200", "A100-80GB", "A100-40GB", "L40S", "L4", "A10G", "V100"}
    assert names >= expected | {"MI300X", "B200", "CPU"}
    for entry in CATALOG:
        assert entry.note, entry.type
        assert entry.link_bandwidth < entry.memory_bandwidth or entry.type == "CPU"
    assert lookup("h100").flops == 989e12  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("driver_name", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "H100-SXM"),
        ("NVIDIA H100 PCIe", "H100-PCIe"),
        ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA H200", "H200"),
        ("Tesla V100-SXM2-32GB", "V100"),
    ],
)
def test_driver_names_map_to_catalog_types(driver_name: str, expected: str) -> None:
    entry = identify(driver_name)
    assert entry is not None and entry.type == expected
    assert identify("NVIDIA L40") is None


# -- the planner ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["1xH100,1xA100", "2xH100,1xA100", "1xB200,1xL4,1xA100"])
def test_mixed_devices_get_stages_in_proportion_to_their_speed(spec: str) -> None:
    devices = parse_devices(spec)
    profile = uniform_profile(layers=36)
    plan = make_plan(devices, profile, 64, PlanOptions(pp=len(devices), dp=1))
    assert plan.pp == len(devices)
    speeds = [devices[s.devices[0]].flops for s in plan.stages]
    shares = proportional_shares(speeds, profile.num_layers)
    for stage, share in zip(plan.stages, shares, strict=True):
        assert abs(stage.layers - share) <= 1.5, (spec, [s.layers for s in plan.stages], shares)
    # the fastest device holds the most layers
    assert max(plan.stages, key=lambda s: s.layers).device_type == max(devices, key=lambda d: d.flops).type


def test_a_plan_that_cannot_fit_is_refused_naming_the_stage_device_and_bytes() -> None:
    profile = uniform_profile(layers=8, params=2_000_000_000)  # 8 x 24 GB of state
    with pytest.raises(NoFeasiblePlanError) as info:
        make_plan(parse_devices("2xL4"), profile, 16)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "2xL4" in message and "does not fit" in message
    assert "on L4 (device" in message and "needs" in message and "usable of 24.0 GB" not in message
    assert "GiB" in message and "usable" in message and "optimizer" in message


def test_the_split_moves_layers_off_a_fast_device_that_is_short_of_memory() -> None:
    profile = uniform_profile(layers=12, params=400_000_000)  # 4.8 GB of state per layer
    roomy = make_plan(parse_devices("1xH100,1xA100"), profile, 8, PlanOptions(pp=2, dp=1))
    tight = make_plan(parse_devices("1xH100:40GB,1xA100"), profile, 8, PlanOptions(pp=2, dp=1))
    by_speed = next(s.layers for s in roomy.stages if s.device_type == "H100-SXM")
    short = next(s for s in tight.stages if s.device_type == "H100-SXM")
    assert short.layers < by_speed
    assert all(s.memory_bytes <= s.memory_available for s in tight.stages)


@pytest.mark.parametrize(("spec", "batch"), [("4xH100", 64), ("3xA100", 48), ("2xH100,2xL4", 96), ("8xCPU", 32)])
def test_every_candidate_keeps_the_global_batch(spec: str, batch: int) -> None:
    fitting, refused = rank_candidates(parse_devices(spec), uniform_profile(layers=6), batch)
    assert fitting
    for c in fitting + [c for c in refused if c.stages]:
        assert c.dp * c.micro_batches * c.micro_batch_size == batch, c.label
        assert c.pp == 1 or c.micro_batches >= c.pp


def test_a_global_batch_that_does_not_divide_refuses_that_data_parallel_degree() -> None:
    fitting, refused = rank_candidates(parse_devices("3xH100"), uniform_profile(layers=6), 32)
    assert all(c.dp in (1, 2) for c in fitting)
    assert any("does not split into 3 equal shares" in (c.rejected or "") for c in refused)


def test_1f1b_keeps_fewer_activations_in_flight_than_gpipe_and_the_bubble_follows_the_formula() -> None:
    profile = uniform_profile(layers=8, params=1_000_000, act_per_sample=1e8)
    options = PlanOptions(pp=2, dp=1, max_micro_batches=8, min_micro_batch=4)
    fitting, _ = rank_candidates(parse_devices("2xH100"), profile, 32, options)
    one = next(c for c in fitting if c.schedule == "1f1b" and c.micro_batches == 8)
    gpipe = next(c for c in fitting if c.schedule == "gpipe" and c.micro_batches == 8)
    # one micro-batch of 4 samples on stage 0: its activations and the output it sends
    per_micro_batch = 4 * 1e8 * one.stages[0].layers + 4 * 1e8 / 8
    # GPipe holds all 8 micro-batches, 1F1B's first stage of 2 holds min(2, 8)
    assert gpipe.stages[0].memory_bytes - one.stages[0].memory_bytes == pytest.approx(6 * per_micro_batch, rel=1e-3)
    assert one.stages[1].memory_bytes < one.stages[0].memory_bytes  # stage 1 of 2 holds min(1, m)
    assert one.time is not None
    t_max = max(s.seconds for s in one.stages)
    p, m = one.pp, one.micro_batches
    assert one.time.bubble == pytest.approx((p - 1) / (m + p - 1) * (m + p - 1) * t_max)


def test_a_plan_round_trips_as_json_and_explains_itself() -> None:
    plan = make_plan(parse_devices("2xH100,1xA100"), uniform_profile(layers=12), 64)
    again = Plan.model_validate_json(plan.model_dump_json())
    assert again == plan
    assert again.chosen == plan.candidates[0]
    console = Console(width=160, record=True)
    console.print(plan.explain(top=5))
    text = console.export_text()
    assert "chosen" in text and "global batch 64" in text and "slower" in text
    assert [r.rank for r in plan.ranks] == list(range(plan.world_size))


def test_plan_options_are_checked_when_built_and_name_the_option() -> None:
    with pytest.raises(ValidationError, match="memory_fraction"):
        PlanOptions(memory_fraction=1.5)
    with pytest.raises(ValidationError, match="schedules"):
        PlanOptions(schedules=("1f1b", "1f1b"))
    with pytest.raises(ValidationError, match="data_parallel"):
        PlanOptions(data_parallel=("zero3",))  # type: ignore[arg-type]


def test_a_plan_whose_batch_arithmetic_is_wrong_cannot_be_built() -> None:
    plan = make_plan(parse_devices("2xH100"), uniform_profile(layers=4), 16)
    data = plan.model_dump()
    data["global_batch"] = 17
    with pytest.raises(ValidationError, match="global_batch"):
        Plan.model_validate(data)


# -- the split against brute force ----------------------------------------------------------------


def brute_force(costs: list[list[float]], blocked: set[tuple[int, int, int]], layers: int, stages: int) -> float:
    best = math.inf
    for cuts in itertools.combinations(range(1, layers), stages - 1):
        bounds = (0, *cuts, layers)
        worst = 0.0
        for i in range(stages):
            j, k = bounds[i], bounds[i + 1]
            worst = max(worst, math.inf if (i, j, k) in blocked else sum(costs[i][j:k]))
        best = min(best, worst)
    return best


@st.composite
def split_cases(draw: st.DrawFn) -> tuple[list[list[float]], set[tuple[int, int, int]], int, int]:
    layers = draw(st.integers(1, 8))
    stages = draw(st.integers(1, min(layers, 4)))
    row = st.lists(st.integers(0, 20).map(float), min_size=layers, max_size=layers)
    costs = [draw(row) for _ in range(stages)]
    segments = [(i, j, k) for i in range(stages) for j in range(layers) for k in range(j + 1, layers + 1)]
    blocked = draw(st.sets(st.sampled_from(segments), max_size=len(segments) // 3)) if segments else set()
    return costs, blocked, layers, stages


@settings(max_examples=300, deadline=None)
@given(split_cases())
def test_the_dynamic_program_finds_the_brute_force_optimum(
    case: tuple[list[list[float]], set[tuple[int, int, int]], int, int],
) -> None:
    costs, blocked, layers, stages = case
    additive = additive_cost(costs)

    def cost(i: int, j: int, k: int) -> float:
        return math.inf if (i, j, k) in blocked else additive(i, j, k)

    split = split_layers(layers, stages, cost)
    assert split.bottleneck == brute_force(costs, blocked, layers, stages)
    assert split.bounds[0] == 0 and split.bounds[-1] == layers and len(split.bounds) == stages + 1
    assert all(j < k for j, k in split.stages)
    if split.feasible:  # the split it returns achieves the value it reports
        assert max(cost(i, j, k) for i, (j, k) in enumerate(split.stages)) == split.bottleneck


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 9).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.integers(1, min(n, 4)),
            st.lists(st.lists(st.integers(0, 20).map(float), min_size=n, max_size=n), min_size=4, max_size=4),
            st.lists(st.integers(0, 9).map(float), min_size=n, max_size=n),
            st.integers(0, 60),
        )
    )
)
def test_pruning_with_a_monotone_bound_keeps_the_optimum(
    case: tuple[int, int, list[list[float]], list[float], int],
) -> None:
    """Stage cost = per-stage layer costs + a boundary term (not monotone), infeasible over a capacity."""
    layers, stages, rows, boundary, capacity = case
    additive = additive_cost(rows)

    def cost(i: int, j: int, k: int) -> float:
        if additive(i, j, k) > capacity:
            return math.inf
        return additive(i, j, k) + boundary[j]

    def bound(i: int, j: int, k: int) -> float:
        return math.inf if additive(i, j, k) > capacity else additive(i, j, k)

    assert split_layers(layers, stages, cost, bound).bottleneck == split_layers(layers, stages, cost).bottleneck


@pytest.mark.timeout(60)
def test_a_huge_global_batch_is_answered_at_once_not_searched_divisor_by_divisor() -> None:
    # before: every divisor of the per-replica batch was tried, a loop of 1e12 / dp iterations
    with pytest.raises(NoFeasiblePlanError, match="global batch 1000000000000") as info:
        make_plan(parse_devices("4xH100,4xA100"), uniform_profile(layers=6), 10**12)
    assert "m64 x" in str(info.value)  # the closest candidate has the most micro-batches allowed
    fitting, _ = rank_candidates(parse_devices("2xH100"), uniform_profile(layers=6, act_per_sample=1), 2**40)
    assert fitting and all(c.dp * c.micro_batches * c.micro_batch_size == 2**40 for c in fitting)


def test_device_declarations_and_micro_batch_options_are_bounded() -> None:
    with pytest.raises(DeviceSpecError, match="more than 4096 devices"):
        parse_devices("4000xH100,97xA100")
    with pytest.raises(DeviceSpecError, match="memory"):
        parse_devices("1xH100:1.2.3GB")
    with pytest.raises(ValidationError, match="max_micro_batches"):
        PlanOptions(max_micro_batches=10**12)
