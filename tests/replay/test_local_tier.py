"""The local memory tier: a restart resumes from the newest valid snapshot of either tier, bitwise.

Real processes (`tests.scenarios.tier_scenario`) are stopped at a fault point and SIGKILLed from here; real
files are corrupted; two ranks run in a real gloo group. Snapshots: persistent every 10 steps,
local every 2, synchronous, each step's record durable before the next begins.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from moai_ckpt.testing.dist import RankResult, launch

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOTAL = 16
DIST_TARGET = "tests.scenarios.tier_scenario:dist_train"


def stop_plan(once: Path, step: int) -> str:
    """Every rank stops itself (SIGSTOP) in the forward pass of ``step``; ``once`` says which pid."""
    return json.dumps([{"at": "forward", "step": step, "action": "stop", "once": str(once)}])


def scenario(run_dir: Path, local: Path | None, faults: str | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MOAI_CKPT_FAULTS", None)
    if faults:
        env["MOAI_CKPT_FAULTS"] = faults
    cmd = [sys.executable, "-m", "tests.scenarios.tier_scenario", str(run_dir), str(local or ""), str(TOTAL)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen[str]) -> tuple[dict[str, Any], str]:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err


def kill_when_stopped(once: Path, timeout: float = 180.0) -> int:
    """SIGKILL the process the stop fault names in ``once``, once it has stopped there; its pid."""
    deadline = time.monotonic() + timeout
    while not (once.exists() and once.stat().st_size > 0):
        assert time.monotonic() < deadline, f"the fault {once} never fired"
        time.sleep(0.05)
    pid = int(json.loads(once.read_text())["pid"])
    os.kill(pid, signal.SIGKILL)
    return pid


def killed_at_13(tmp_path: Path, local: Path) -> Path:
    """A run stopped in step 13 and SIGKILLed from outside: local snapshot 12, persistent 10."""
    run_dir = tmp_path / "run"
    proc = scenario(run_dir, local, stop_plan(tmp_path / "stop.once", 13))
    kill_when_stopped(tmp_path / "stop.once")
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return run_dir


def local_snapshots(local: Path) -> list[Path]:
    return sorted(local.glob("*/rank*/snapshots/*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out, _ = finished(scenario(tmp_path_factory.mktemp("ref") / "run", None))
    return out


@pytest.fixture
def local(tmp_path: Path) -> Path:
    return tmp_path / "shm"  # a tmp directory stands in for /dev/shm


def test_a_run_killed_at_step_13_resumes_from_the_local_tier_at_step_12_bitwise(
    tmp_path: Path, local: Path, reference: dict[str, Any]
) -> None:
    run_dir = killed_at_13(tmp_path, local)
    # bounded: the latest committed (12) and the one before, which every rank still held when 12 began
    assert [p.name for p in local_snapshots(local)] == ["000000000010", "000000000012"]
    out, _ = finished(scenario(run_dir, local))
    recovery = out["report"]["recovery"]
    assert out["report"]["base_step"] == 12 and recovery["restore_tier"] == "local"
    assert out["replayed"] <= 2 and recovery["replayed_steps"] == out["replayed"]
    assert out["digest"] == reference["digest"]
    assert recovery["restore_bytes"] > 0 and recovery["restore_s"] > 0
    for phase in ("detection_s", "start_s", "process_group_s", "setup_s", "total_s"):
        assert recovery[phase] is not None and recovery[phase] >= 0, phase
    written = json.loads(next((run_dir / "reports").glob("*from-000000000012.json")).read_text())
    assert written["recovery"]["restore_tier"] == "local"  # the report in the run directory says so too
    assert "local" not in {p.name for p in (run_dir / "snapshots").iterdir()}
    assert sorted(int(p.name) for p in (run_dir / "snapshots").iterdir()) == [0, 10]  # never in the catalog


def test_without_a_local_tier_the_same_kill_replays_from_the_persistent_snapshot(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    run_dir = tmp_path / "run"
    proc = scenario(run_dir, None, stop_plan(tmp_path / "stop.once", 13))
    kill_when_stopped(tmp_path / "stop.once")
    proc.communicate(timeout=60)
    out, _ = finished(scenario(run_dir, None))
    recovery = out["report"]["recovery"]
    assert out["report"]["base_step"] == 10 and recovery["restore_tier"] == "persistent"
    assert out["replayed"] == 2 and out["digest"] == reference["digest"]


def flip_a_byte_in_a_chunk(snapshot: Path) -> None:
    chunk = next(p for p in sorted(snapshot.glob("model/**/c.*")) if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))


def test_a_corrupt_local_snapshot_is_skipped_with_its_reason_and_the_next_newest_used(
    tmp_path: Path, local: Path, reference: dict[str, Any]
) -> None:
    run_dir = killed_at_13(tmp_path, local)
    flip_a_byte_in_a_chunk(local_snapshots(local)[-1])  # step 12
    out, err = finished(scenario(run_dir, local))
    assert "the local snapshot of step 12 cannot be restored" in err and "crc32c" in err.lower()
    assert out["report"]["base_step"] == 10 and out["report"]["recovery"]["restore_tier"] == "local"
    assert out["replayed"] == 2 and out["digest"] == reference["digest"]


def test_with_every_local_snapshot_corrupt_the_persistent_tier_is_used(
    tmp_path: Path, local: Path, reference: dict[str, Any]
) -> None:
    run_dir = killed_at_13(tmp_path, local)
    for snapshot in local_snapshots(local):  # steps 10 and 12
        flip_a_byte_in_a_chunk(snapshot)
    out, err = finished(scenario(run_dir, local))
    for step in (12, 10):
        assert f"the local snapshot of step {step} cannot be restored" in err
    assert out["report"]["base_step"] == 10 and out["report"]["recovery"]["restore_tier"] == "persistent"
    assert out["replayed"] == 2 and out["digest"] == reference["digest"]


def test_a_local_tier_of_another_run_is_ignored(tmp_path: Path, local: Path, reference: dict[str, Any]) -> None:
    run_dir = killed_at_13(tmp_path, local)
    (tier,) = local.glob("*/rank0-of-1")
    info = json.loads((tier / "run.json").read_text())
    (tier / "run.json").write_text(json.dumps({**info, "run_id": "another-run"}))
    out, err = finished(scenario(run_dir, local))
    assert "belongs to run another-run" in err
    assert out["report"]["base_step"] == 10 and out["report"]["recovery"]["restore_tier"] == "persistent"
    assert out["digest"] == reference["digest"]


# -- two ranks --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dist_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    results = launch(DIST_TARGET, 2, run_dir=str(tmp_path_factory.mktemp("dref") / "run"), local_tier="", total=TOTAL)
    assert all(r.returncode == 0 for r in results), results[0].output[-3000:]
    return results[0].value  # type: ignore[no-any-return]


def test_two_ranks_agree_on_a_step_both_can_restore_when_one_lost_its_local_tier(
    tmp_path: Path, local: Path, monkeypatch: pytest.MonkeyPatch, dist_reference: dict[str, Any]
) -> None:
    run_dir = str(tmp_path / "run")
    once = tmp_path / "stop-{rank}.once"
    monkeypatch.setenv("MOAI_CKPT_FAULTS", stop_plan(once, 13))
    killed: list[list[RankResult]] = []
    job = threading.Thread(
        target=lambda: killed.append(launch(DIST_TARGET, 2, run_dir=run_dir, local_tier=str(local), total=TOTAL))
    )
    job.start()
    for rank in (0, 1):
        kill_when_stopped(Path(str(once).format(rank=rank)))
    job.join(timeout=240)
    assert [r.returncode for r in killed[0]] == [-signal.SIGKILL, -signal.SIGKILL]
    monkeypatch.delenv("MOAI_CKPT_FAULTS")
    assert [p.name for p in local_snapshots(local)] == ["000000000010", "000000000012"] * 2
    (lost,) = local.glob("*/rank1-of-2")
    shutil.rmtree(lost)  # rank 1's host memory is gone; rank 0's still holds steps 10 and 12
    resumed = launch(DIST_TARGET, 2, run_dir=run_dir, local_tier=str(local), total=TOTAL)
    assert all(r.returncode == 0 for r in resumed), resumed[0].output[-3000:] + resumed[1].output[-3000:]
    for r in resumed:
        assert r.value["report"]["base_step"] == 10  # the newest step rank 1 can restore too
        assert r.value["replayed"] == 2
        assert r.value["digest"] == dist_reference["digest"]
    # rank 0 reads step 10 from its own local tier, rank 1 from the persistent one
    assert resumed[0].value["report"]["recovery"]["restore_tier"] == "local"
    assert resumed[1].value["report"]["recovery"]["restore_tier"] == "persistent"


def test_two_ranks_both_holding_the_local_snapshot_resume_from_it(
    tmp_path: Path, local: Path, monkeypatch: pytest.MonkeyPatch, dist_reference: dict[str, Any]
) -> None:
    run_dir = str(tmp_path / "run")
    monkeypatch.setenv("MOAI_CKPT_FAULTS", json.dumps([{"at": "forward", "step": 13, "rank": 1, "action": "kill"}]))
    launch(DIST_TARGET, 2, run_dir=run_dir, local_tier=str(local), total=TOTAL, timeout=120)
    monkeypatch.delenv("MOAI_CKPT_FAULTS")
    resumed = launch(DIST_TARGET, 2, run_dir=run_dir, local_tier=str(local), total=TOTAL)
    assert all(r.returncode == 0 for r in resumed), resumed[0].output[-3000:] + resumed[1].output[-3000:]
    for r in resumed:
        assert r.value["report"]["base_step"] == 12 and r.value["replayed"] <= 1
        assert r.value["report"]["recovery"]["restore_tier"] == "local"
        assert r.value["digest"] == dist_reference["digest"]
