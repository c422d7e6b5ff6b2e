"""fault_tolerant: a run killed with SIGKILL in any phase resumes at its last completed step, bitwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import moai_ckpt
from replay.log import read_log

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_scenario(run_dir: Path, total: int, *die: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.ft_scenario", str(run_dir), str(total), *die],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    result = run_scenario(tmp_path_factory.mktemp("ref") / "run", 14)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("die_at", "phase"), [(3, "forward"), (6, "backward"), (11, "optimizer"), (9, "after")])
def test_a_run_killed_mid_step_resumes_at_its_last_completed_step_bitwise(
    tmp_path: Path, reference: dict, die_at: int, phase: str
) -> None:
    run_dir = tmp_path / "run"
    killed = run_scenario(run_dir, 14, str(die_at), phase)
    assert killed.returncode == -9, killed.stderr[-3000:]
    # a step completes when its loop body returns to run.steps(), which logs it durably; a kill
    # anywhere before that, even after run.record(), leaves step die_at to be run again
    completed_before_kill = die_at - 1

    resumed = run_scenario(run_dir, 14)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert out["digest"] == reference["digest"]  # final parameters bitwise equal to an uninterrupted run
    # nothing completed was lost: the restart replays up to the kill and runs live only after it
    assert out["first_step"] + out["replayed"] == completed_before_kill + 1
    assert min(int(s) for s in out["losses"]) == completed_before_kill + 1
    assert all(out["losses"][s] == reference["losses"][s] for s in out["losses"])


def test_sigterm_takes_a_snapshot_and_flushes_the_log_before_exiting(tmp_path: Path, reference: dict) -> None:
    run_dir = tmp_path / "run"
    stopped = run_scenario(run_dir, 14, "6", "sigterm-backward")
    assert stopped.returncode == 128 + 15, stopped.stderr[-3000:]
    ckpt = moai_ckpt.Checkpointer(str(run_dir))
    assert ckpt.latest_step() == 6  # the step in progress finished, then the emergency snapshot
    resumed = run_scenario(run_dir, 14)
    out = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert out["first_step"] == 7 and out["replayed"] == 0
    assert out["digest"] == reference["digest"]


def test_a_replay_that_diverges_is_an_error_naming_the_step(tmp_path: Path, reference: dict) -> None:
    run_dir = tmp_path / "run"
    assert run_scenario(run_dir, 6).returncode == 0  # snapshot at 4; steps 5, 6 logged after it
    ckpt = moai_ckpt.Checkpointer(str(run_dir))
    contents = read_log(ckpt.storage, 4)
    assert [r.step for r in contents.records] == [5, 6]
    tampered = contents.records[0].model_copy(
        update={"digests": contents.records[0].digests.model_copy(update={"loss": 1.0})}
    )
    from replay.log import LogWriter, segment_key

    ckpt.storage.delete([segment_key(4, 5, 5)])
    LogWriter(ckpt.storage, 4)._write([(5, tampered.model_dump_json().encode())])
    result = run_scenario(run_dir, 8)
    assert result.returncode != 0
    assert "ReplayDivergenceError" in result.stderr and "step 5" in result.stderr


def test_two_fsdp_ranks_one_killed_resume_bitwise_after_relaunch(tmp_path: Path) -> None:
    from moai_ckpt.testing.dist import launch

    target = "tests.dist_scenarios:fault_tolerant_train"
    reference = launch(target, 2, run_dir=str(tmp_path / "reference"), total=10)
    assert all(r.returncode == 0 for r in reference), reference[0].output[-3000:]
    run_dir = str(tmp_path / "run")
    killed = launch(target, 2, run_dir=run_dir, total=10, die_at=7, die_rank=1, timeout=120)
    assert killed[1].returncode == -9 and killed[0].returncode != 0  # the survivor does not hang
    resumed = launch(target, 2, run_dir=run_dir, total=10)
    assert all(r.returncode == 0 for r in resumed), resumed[0].output[-3000:]
    for r in resumed:
        assert r.value["digest"] == reference[0].value["digest"]
        assert r.value["first_step"] + r.value["replayed"] == 7  # steps 1..6 were done: none lost
