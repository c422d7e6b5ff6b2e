"""Re-planning on restore, on real gloo processes: a placed run that loses ranks (or restarts on
fewer) gets a new plan, restores its snapshot onto it, replays its log under it, and trains on
with the same global batches as one process would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import moai_ckpt
from moai_ckpt.testing.dist import RankResult, launch
from parallel.replan import recorded_plan
from replay.log import history
from tests.scenarios import parallel_scenarios as scenarios

pytestmark = pytest.mark.slow

TARGET = "tests.scenarios.parallel_scenarios:placed_run"
GLOBAL_BATCH = 12  # splits evenly over 4 and 3 replicas


@pytest.fixture(autouse=True)
def device_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # the ranks' device probes are cached once for the module, not in the user's home
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg"))
    monkeypatch.delenv("MOAI_CKPT_FAULTS", raising=False)


def ok(results: list[RankResult]) -> list[dict[str, Any]]:
    for r in results:
        assert r.returncode == 0 and "error" not in (r.value or {}), f"rank {r.rank} failed:\n{r.output[-4000:]}"
    return [r.value for r in results]


def expected_batches(steps: int) -> dict[int, list[int]]:
    """The global batch of every step, from the sampler's definition (seed 3), not from the run."""
    sampler = moai_ckpt.GlobalSampler(scenarios.SAMPLES, GLOBAL_BATCH, seed=3)
    out = {}
    for step in range(1, steps + 1):
        out[step] = sampler.global_batch()
        sampler.advance()
    return out


def logged(run_dir: str) -> dict[int, Any]:
    return history(moai_ckpt.Checkpointer(run_dir, local=True).storage)


def check_against_one_process(run_dir: str, steps: int) -> None:
    """Every step 1..steps is logged once with its global batch, and the losses are one process's."""
    records = logged(run_dir)
    assert sorted(records) == list(range(1, steps + 1))
    batches = expected_batches(steps)
    assert {s: r.samples for s, r in records.items()} == batches
    reference = scenarios.reference(GLOBAL_BATCH, steps, scenarios.PLACED_LR)
    losses = [records[s].digests.loss for s in range(1, steps + 1)]
    assert losses == pytest.approx(reference, rel=2e-4, abs=1e-6)


def shares_cover_the_global_batch(values: list[dict[str, Any]], dp: int) -> None:
    """The replicas' shares of each step, joined in data-parallel order, are its global batch."""
    batches = expected_batches(max(int(s) for v in values for s in v["shares"]))
    for step in {int(s) for v in values for s in v["shares"]}:
        by_replica = {v["dp_rank"]: v["shares"][str(step)] for v in values if str(step) in v["shares"]}
        assert sorted(by_replica) == list(range(dp))
        assert [i for d in range(dp) for i in by_replica[d]] == batches[step]


def test_4_data_parallel_ranks_one_killed_resume_on_3_with_the_same_global_batches_and_data_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, total = str(tmp_path / "run"), 10
    fired = tmp_path / "kill.fired"
    monkeypatch.setenv(
        "MOAI_CKPT_FAULTS", json.dumps([{"at": "forward", "step": 6, "rank": 2, "action": "kill", "once": str(fired)}])
    )
    options = {"pp": 1}  # a data-parallel plan
    killed = launch(TARGET, 4, run_dir=run_dir, total=total, global_batch=GLOBAL_BATCH, options=options, timeout=120)
    assert killed[2].returncode == -9, killed[2].output[-3000:]
    four = recorded_plan(moai_ckpt.Checkpointer(run_dir, local=True).storage, [3])
    assert four is not None and (four.plan.dp, four.plan.pp, len(four.plan.devices)) == (4, 1, 4)
    done_before = max(logged(run_dir))
    assert 4 <= done_before <= 6

    monkeypatch.delenv("MOAI_CKPT_FAULTS")
    values = ok(launch(TARGET, 3, run_dir=run_dir, total=total, global_batch=GLOBAL_BATCH, options=options))
    for v in values:
        assert (v["dp"], v["pp"], v["last_step"]) == (3, 1, total)
        assert "world_size: 4 -> 3" in v["placement_changes"]
        assert any(c.startswith("plan: dp4 x pp1") and "dp3 x pp1" in c for c in v["placement_changes"])
        assert v["first_step"] == 4 and v["replayed"] == done_before - 3  # restored step 3, replayed the log
        assert v["max_drift"]["loss_rel"] < 1e-4  # reported, and small
    shares_cover_the_global_batch(values, 3)
    check_against_one_process(run_dir, total)
    # the newest snapshot records the plan it was taken under
    three = recorded_plan(moai_ckpt.Checkpointer(run_dir, local=True).storage, [total])
    assert three is not None and three.plan.world_size == 3 and three.step == total


def test_a_2_stage_by_2_way_pipeline_trains_and_restores_into_a_3_rank_plan(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    pipeline = {"dp": 2, "pp": 2, "data_parallel": ["ddp"], "micro_batches": 3}
    four = ok(launch(TARGET, 4, run_dir=run_dir, total=6, global_batch=GLOBAL_BATCH, options=pipeline))
    assert {(v["dp_rank"], v["stage"]) for v in four} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    stage_layers = {v["stage"]: v["layers"] for v in four}
    assert stage_layers[0] and stage_layers[1] and max(stage_layers[0]) < min(stage_layers[1])
    shares_cover_the_global_batch(four, 2)
    check_against_one_process(run_dir, 6)  # the pipeline trains like one process

    three = launch(TARGET, 3, run_dir=run_dir, total=10, global_batch=GLOBAL_BATCH, options={})
    values = ok(three)
    # rank 0 prints the snapshot's plan against the new one
    assert "re-planned: devices changed" in three[0].output and "snapshot's plan" in three[0].output
    assert "re-planned" not in three[1].output
    plan = {(v["dp"], v["pp"]) for v in values}
    assert len(plan) == 1 and plan.pop() in ((3, 1), (1, 3))
    for v in values:
        assert v["first_step"] == 7 and v["replayed"] == 0 and v["last_step"] == 10
    # the 3 ranks' layers cover the model once per replica (a re-split of the 2-stage snapshot)
    every = sorted(layer for v in values if v["dp_rank"] == 0 for layer in v["layers"])
    assert every == sorted(set(stage_layers[0] + stage_layers[1]))
    check_against_one_process(run_dir, 10)  # the restored state (Adam moments too) went on exactly


def test_an_fsdp2_run_restores_its_shards_onto_3_replicas_and_trains_on_as_one_process(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    fsdp = {"pp": 1, "data_parallel": ["fsdp"]}
    two = ok(launch(TARGET, 2, run_dir=run_dir, total=4, global_batch=GLOBAL_BATCH, options=fsdp))
    assert {v["dp"] for v in two} == {2}
    three = ok(launch(TARGET, 3, run_dir=run_dir, total=7, global_batch=GLOBAL_BATCH, options=fsdp))
    assert {(v["dp"], v["first_step"], v["last_step"]) for v in three} == {(3, 5, 7)}
    # each replica read its own rows of the 2-way shards; parameters and Adam moments went on exactly
    check_against_one_process(run_dir, 7)


# -- the command line --------------------------------------------------------------------------


@pytest.fixture
def one_rank_run(tmp_path: Path) -> str:
    """A run placed on one rank, 5 steps: snapshots at 0, 3 and 5, each recording its plan."""
    run_dir = str(tmp_path / "run")
    ok(launch(TARGET, 1, run_dir=run_dir, total=5, global_batch=GLOBAL_BATCH, options={}))
    return run_dir


def test_plan_of_a_run_shows_the_plan_a_restore_onto_other_devices_would_use_against_the_recorded_one(
    one_rank_run: str,
) -> None:
    from typer.testing import CliRunner

    from moai_ckpt.cli import app

    runner = CliRunner()
    shown = runner.invoke(app, ["plan", one_rank_run, "--devices", "3xCPU"])
    assert shown.exit_code == 0, shown.output
    assert "the snapshot of step 5 records: dp1 x pp1" in shown.output
    assert "re-planned: devices changed: 1xCPU* -> 3xCPU" in shown.output
    assert "snapshot's plan" in shown.output and "new plan" in shown.output
    as_json = runner.invoke(app, ["plan", one_rank_run, "--devices", "3xCPU", "--json"])
    assert as_json.exit_code == 0, as_json.output
    plan = json.loads(as_json.output)
    # the recorded global batch is kept (none was given), on all three devices
    assert plan["global_batch"] == GLOBAL_BATCH and len(plan["ranks"]) == 3
    assert plan["chosen"]["dp"] * plan["chosen"]["micro_batches"] * plan["chosen"]["micro_batch_size"] == 12


def test_restore_on_another_world_size_re_plans_replays_under_the_new_plan_and_records_it(one_rank_run: str) -> None:
    import os
    import subprocess
    import sys

    storage = moai_ckpt.Checkpointer(one_rank_run, local=True).storage
    storage.delete(["snapshots/000000000005/commit.json"])  # as if the job died after step 5
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run(
        [sys.executable, "-m", "moai_ckpt.cli", "restore", one_rank_run, "--world-size", "2", "--trust-run-json"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=root,
        env=env,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "re-planned: devices changed" in output and "snapshot's plan" in output  # printed by rank 0
    assert "plan: dp1 x pp1" in output and "world_size: 1 -> 2" in output  # the summary's placement row
    recorded = recorded_plan(storage, [5])
    assert recorded is not None and recorded.plan.world_size == 2 and recorded.step == 5
    records = logged(one_rank_run)
    assert {s: r.samples for s, r in records.items()} == expected_batches(5)
