"""Plans applied on real gloo processes: pipelines and data-parallel replicas train like one process."""

from __future__ import annotations

from pathlib import Path

import pytest

from moai_ckpt.testing.dist import RankResult, launch
from parallel.costmodel import profile_model
from parallel.inventory import Device, local_device
from parallel.planner import PlanOptions, make_plan
from tests.scenarios import parallel_scenarios as scenarios

pytestmark = pytest.mark.slow

GLOBAL_BATCH, STEPS, LR = 32, 8, 1e-2


def ok(results: list[RankResult]) -> list[dict]:
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} failed:\n{r.output[-3000:]}"
    return [r.value for r in results]


def test_a_2_stage_by_2_way_data_parallel_pipeline_and_4_accumulating_replicas_match_one_process(
    tmp_path: Path,
) -> None:
    # 4 ranks on this host's CPU: each gets its share of the cores
    device = local_device("cpu", ranks_sharing=4, cache_dir=tmp_path / "cache")
    model, sample = scenarios.model_and_sample()
    profile = profile_model(model, sample, device=local_device("cpu", cache_dir=tmp_path / "cache"))
    plans, paths = [], []
    layouts = (
        (2, 2, "ddp", "1f1b", 4),
        (2, 2, "fsdp", "gpipe", 2),
        (4, 1, "fsdp", "none", 2),  # no pipeline: gradient accumulation over 2 micro-batches
    )
    for dp, pp, mode, schedule, micro_batches in layouts:
        options = PlanOptions(
            dp=dp,
            pp=pp,
            data_parallel=(mode,),  # type: ignore[arg-type]
            schedules=(schedule,) if pp > 1 else ("1f1b",),  # type: ignore[arg-type]
            micro_batches=micro_batches,
        )
        plan = make_plan([device] * 4, profile, GLOBAL_BATCH, options)
        assert (plan.dp, plan.pp, plan.chosen.data_parallel, plan.chosen.schedule) == (dp, pp, mode, schedule)
        path = tmp_path / f"plan-{len(plans)}.json"
        path.write_text(plan.model_dump_json())
        plans.append(plan)
        paths.append(str(path))

    cache = str(tmp_path / "cache")
    per_rank = ok(
        launch(
            "tests.scenarios.parallel_scenarios:train_plans", 4, plan_paths=paths, steps=STEPS, lr=LR, cache_dir=cache
        )
    )
    job = [Device.model_validate(d) for d in per_rank[0]["devices"]]
    assert len(job) == 4 and all(d.source == "measured" for d in job)
    reference = scenarios.reference(GLOBAL_BATCH, STEPS, LR)
    link = f"link measured: {job[0].link_latency * 1e6:.0f} us, {job[0].link_bandwidth / 1e9:.2f} GB/s"
    print(f"\n{'plan (4 gloo ranks, 2 cores)':34} {'predicted':>12} {'w/ ' + link:>40} {'measured':>10}")
    for i, plan in enumerate(plans):
        runs = [values["runs"][i] for values in per_rank]
        for run in runs:
            role = plan.role(run["rank"])
            assert (run["dp_rank"], run["stage"]) == (role.dp_rank, role.stage)
            stage = plan.stages[role.stage]
            assert run["layers"][0] >= stage.start and run["layers"][-1] < stage.stop
        last = [run["losses"] for run in runs if run["stage"] == plan.pp - 1]
        assert len(last) == plan.dp and all(len(losses) == STEPS for losses in last)
        # equal shares: the global batch's mean loss is the mean of the replicas' mean losses
        global_losses = [sum(step) / plan.dp for step in zip(*last, strict=True)]
        assert global_losses == pytest.approx(reference, rel=1e-4, abs=1e-6)
        assert global_losses[-1] < global_losses[0]
        measured = max(run["step_s"] for run in runs)
        forced = PlanOptions(
            dp=plan.dp,
            pp=plan.pp,
            data_parallel=(plan.chosen.data_parallel,),  # type: ignore[arg-type]
            schedules=(plan.chosen.schedule,) if plan.pp > 1 else ("1f1b",),  # type: ignore[arg-type]
            micro_batches=plan.chosen.micro_batches,
        )
        replanned = make_plan(job, profile, GLOBAL_BATCH, forced)
        print(
            f"{plan.chosen.label:34} {plan.predicted_step_s * 1e3:9.2f} ms "
            f"{replanned.predicted_step_s * 1e3:37.2f} ms {measured * 1e3:7.2f} ms"
        )
