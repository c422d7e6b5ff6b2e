"""fault_tolerant: a run killed with SIGKILL anywhere resumes at its last completed step, bitwise.

Every test runs the training in real processes (`tests.scenarios.ft_scenario`, `tests.scenarios.dist_scenarios`) and
kills them with real signals at named fault points (`moai_ckpt.faults`).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import moai_ckpt
from moai_ckpt.layout import is_chunk_key, log_segment_key
from moai_ckpt.testing.dist import launch
from replay.log import LogWriter, history, log_bases, read_log, records_after, segments

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOTAL = 14


def plan(tmp_path: Path, at: str, step: int, action: str = "kill", rank: int | None = None) -> str:
    fault: dict[str, Any] = {"at": at, "step": step, "action": action, "once": str(tmp_path / f"{at}-{step}.fired")}
    if rank is not None:
        fault["rank"] = rank
    return json.dumps([fault])


def fired_at(tmp_path: Path, at: str, step: int) -> int:
    """The training step in progress when the planned fault fired (its ``once`` file says)."""
    with open(tmp_path / f"{at}-{step}.fired") as f:
        return int(json.load(f)["step"])


def run_scenario(
    run_dir: Path, total: int, *, faults: str | None = None, sync: bool = False
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOAI_TEST_LOG_SYNC": "1" if sync else "0"}
    env.pop("MOAI_CKPT_FAULTS", None)
    if faults:
        env["MOAI_CKPT_FAULTS"] = faults
    return subprocess.run(
        [sys.executable, "-m", "tests.scenarios.ft_scenario", str(run_dir), str(total)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=env,
    )


def result_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return result_of(run_scenario(tmp_path_factory.mktemp("ref") / "run", TOTAL))


def check_resumed(out: dict[str, Any], reference: dict[str, Any], die_at: int, sync: bool) -> None:
    assert out["digest"] == reference["digest"]  # final parameters bitwise equal to an uninterrupted run
    # a step completes when its loop body returns to run.steps(), which logs it; a kill during step
    # die_at leaves it to run again. With log_sync the record of die_at - 1 was durable before
    # die_at began; by default it is durable before die_at completes, so it may run again too.
    resumed_at = out["first_step"] + out["replayed"]  # the first step run live after the restart
    if sync:
        assert resumed_at == die_at
    else:
        assert die_at - 1 <= resumed_at <= die_at
    assert min(int(s) for s in out["losses"]) == resumed_at
    assert all(out["losses"][s] == reference["losses"][s] for s in out["losses"])


@pytest.mark.parametrize("sync", [True, False], ids=["log_sync", "pipelined"])
@pytest.mark.parametrize(("phase", "die_at"), [("forward", 3), ("backward", 6), ("optimizer", 11), ("step.end", 9)])
def test_a_run_killed_mid_step_resumes_at_its_last_completed_step_bitwise(
    tmp_path: Path, reference: dict[str, Any], phase: str, die_at: int, sync: bool
) -> None:
    run_dir = tmp_path / "run"
    killed = run_scenario(run_dir, TOTAL, faults=plan(tmp_path, phase, die_at), sync=sync)
    assert killed.returncode == -9, killed.stderr[-3000:]
    out = result_of(run_scenario(run_dir, TOTAL, sync=sync))
    check_resumed(out, reference, die_at, sync)
    assert out["replayed"] >= 1  # logged steps after the snapshot were replayed, not run live


@pytest.mark.parametrize("phase", ["snapshot.stage", "snapshot.persist", "snapshot.commit"])
def test_a_run_killed_while_snapshotting_never_commits_a_partial_snapshot_and_resumes_bitwise(
    tmp_path: Path, reference: dict[str, Any], phase: str
) -> None:
    run_dir = tmp_path / "run"
    # the snapshot being written once step 8 is in progress: that of step 8, or of step 4 when
    # its background write runs late
    killed = run_scenario(run_dir, TOTAL, faults=plan(tmp_path, phase, 8))
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpt = moai_ckpt.Checkpointer(str(run_dir))
    latest = ckpt.latest_step()
    assert latest is not None and latest < 8  # the snapshot being written never committed
    assert all(ckpt.verify(s).ok for s in ckpt.steps())  # and nothing partial is committed
    out = result_of(run_scenario(run_dir, TOTAL))
    assert out["digest"] == reference["digest"]
    assert out["replayed"] >= 3  # the steps after the latest snapshot came from the log


@pytest.mark.parametrize("phase", ["log.write", "log.flush"])
def test_a_run_killed_while_writing_its_log_drops_the_torn_tail_and_resumes_bitwise(
    tmp_path: Path, reference: dict[str, Any], phase: str
) -> None:
    run_dir = tmp_path / "run"
    killed = run_scenario(run_dir, TOTAL, faults=plan(tmp_path, phase, 6))
    assert killed.returncode == -9, killed.stderr[-3000:]
    storage = moai_ckpt.Checkpointer(str(run_dir)).storage
    if phase == "log.write":  # half a segment reached storage (in the log after step 0 or 4)
        assert any(read_log(storage, base).torn_tail for base in log_bases(storage))
    resumed = run_scenario(run_dir, TOTAL)
    out = result_of(resumed)
    if phase == "log.write":
        assert "torn log tail" in resumed.stderr
    assert out["digest"] == reference["digest"]
    # the fault names the training thread's step, which is the flushed record's step X or X + 1
    # (the log thread writes X while the training thread may not have begun X + 1 yet). A torn
    # write loses X, so X runs again; a write that reached the file system before the kill keeps
    # X (a killed process loses no page cache), so X + 1 runs first
    in_progress = fired_at(tmp_path, phase, 6)
    resumed_at = out["first_step"] + out["replayed"]
    if phase == "log.write":
        assert in_progress - 1 <= resumed_at <= in_progress
    else:
        assert in_progress <= resumed_at <= in_progress + 1


@pytest.mark.parametrize("seed", [11, 23, 37])
def test_a_run_killed_at_a_random_step_and_phase_resumes_bitwise(
    tmp_path: Path, reference: dict[str, Any], seed: int
) -> None:
    rng = random.Random(seed)
    phase = rng.choice(["forward", "backward", "optimizer", "step.end", "log.write", "snapshot.persist"])
    die_at = rng.randint(2, TOTAL - 1)
    run_dir = tmp_path / "run"
    killed = run_scenario(run_dir, TOTAL, faults=plan(tmp_path, phase, die_at))
    assert killed.returncode == -9, f"{phase} at {die_at}: {killed.stderr[-3000:]}"
    out = result_of(run_scenario(run_dir, TOTAL))
    assert out["digest"] == reference["digest"], f"{phase} at {die_at}"


def test_sigterm_takes_a_snapshot_and_flushes_the_log_before_exiting(tmp_path: Path, reference: dict[str, Any]) -> None:
    run_dir = tmp_path / "run"
    stopped = run_scenario(run_dir, TOTAL, faults=plan(tmp_path, "backward", 6, action="term"))
    assert stopped.returncode == 128 + 15, stopped.stderr[-3000:]
    assert moai_ckpt.Checkpointer(str(run_dir)).latest_step() == 6  # the step in progress finished first
    out = result_of(run_scenario(run_dir, TOTAL))
    assert out["first_step"] == 7 and out["replayed"] == 0
    assert out["digest"] == reference["digest"]


def test_a_user_exception_flushes_the_log_and_propagates(tmp_path: Path, reference: dict[str, Any]) -> None:
    run_dir = tmp_path / "run"
    failed = run_scenario(run_dir, TOTAL, faults=plan(tmp_path, "optimizer", 7, action="raise"))
    assert failed.returncode != 0 and "injected fault at optimizer" in failed.stderr
    assert read_log(moai_ckpt.Checkpointer(str(run_dir)).storage, 4).last_step == 6  # every completed step
    out = result_of(run_scenario(run_dir, TOTAL))
    assert out["first_step"] + out["replayed"] == 7 and out["digest"] == reference["digest"]


def test_a_replay_that_diverges_is_an_error_naming_the_step_and_quantity(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result_of(run_scenario(run_dir, 6))  # snapshot at 4; steps 5, 6 logged after it
    ckpt = moai_ckpt.Checkpointer(str(run_dir))
    contents = read_log(ckpt.storage, 4)
    assert [r.step for r in contents.records] == [5, 6]
    first = contents.records[0]
    tampered = first.model_copy(update={"digests": first.digests.model_copy(update={"grad_norm": 1.0})})
    ckpt.storage.delete([log_segment_key(4, 5, 5)])
    LogWriter(ckpt.storage, 4).copy([tampered], contents)  # the same record with one digest changed
    result = run_scenario(run_dir, 8)
    assert result.returncode != 0
    assert "ReplayDivergenceError" in result.stderr
    assert "step 5: first divergent quantity grad_norm" in result.stderr


def test_a_corrupt_log_record_stops_the_replay_before_it_and_the_run_goes_on(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    run_dir = tmp_path / "run"
    result_of(run_scenario(run_dir, 7))  # snapshot at 4; steps 5, 6, 7 logged after it
    storage = moai_ckpt.Checkpointer(str(run_dir)).storage
    (key,) = [k for first, last, k in segments(storage, 4) if first <= 6 <= last]
    data = bytearray(storage.read(key))
    data[data.index(b'"step":6') + 3] ^= 0x01  # one bit flipped inside the record of step 6
    storage.write(key, bytes(data))
    storage.delete_prefix("log/000000000000")  # no intact copy of step 6 in the older log either
    resumed = run_scenario(run_dir, TOTAL)
    out = result_of(resumed)
    assert "the log is damaged" in resumed.stderr and "replay stops at step 5" in resumed.stderr
    assert out["replayed"] == 1 and out["first_step"] == 5  # step 5 replayed, 6.. run again live
    assert out["digest"] == reference["digest"]
    assert storage.list("log/quarantine")  # the damaged segment is kept aside, not deleted
    assert sorted(history(storage)) == list(range(5, TOTAL + 1))


def test_restore_commits_the_state_at_the_last_logged_step_and_a_relaunch_starts_there(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    run_dir = tmp_path / "run"
    killed = run_scenario(run_dir, TOTAL, faults=plan(tmp_path, "forward", 11), sync=True)
    assert killed.returncode == -9
    cli = [sys.executable, "-m", "moai_ckpt.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOAI_TEST_LOG_SYNC": "1", "COLUMNS": "200"}
    env.pop("MOAI_CKPT_FAULTS", None)
    # the test owns the run directory: it trusts the function run.json names
    restored = subprocess.run(
        [*cli, "restore", str(run_dir), "--json", "--trust-run-json"], capture_output=True, text=True, env=env
    )
    assert restored.returncode == 0, restored.stderr[-3000:]
    report = json.loads(restored.stdout)["report"]
    base = report["base_step"]
    assert base in (4, 8) and report["last_step"] == 10  # the snapshot of 8 is async: it may not have committed
    assert [s["step"] for s in report["steps"]] == list(range(base + 1, 11))
    assert all(s["bitwise"] for s in report["steps"])
    assert moai_ckpt.Checkpointer(str(run_dir)).latest_step() == 10
    table = subprocess.run([*cli, "restore", str(run_dir)], capture_output=True, text=True, env=env)
    assert table.returncode == 0 and "steps replayed" in table.stdout  # nothing left to replay: still a table
    assert "no training code ran" in table.stdout  # nor needed: no --trust-run-json, no --entrypoint
    out = result_of(run_scenario(run_dir, TOTAL, sync=True))
    assert out["first_step"] == 11 and out["replayed"] == 0
    assert out["digest"] == reference["digest"]


def test_replay_verify_reports_determinism_per_step(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result_of(run_scenario(run_dir, 7))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    cli = [sys.executable, "-m", "moai_ckpt.cli", "replay", str(run_dir)]
    shown = subprocess.run(cli, capture_output=True, text=True, env=env)
    assert shown.returncode == 0 and "a restart replays 3 steps" in shown.stdout
    verified = subprocess.run([*cli, "--verify", "--json", "--trust-run-json"], capture_output=True, text=True, env=env)
    assert verified.returncode == 0, verified.stderr[-3000:]
    report = json.loads(verified.stdout)
    assert [s["step"] for s in report["steps"]] == [5, 6, 7] and all(s["bitwise"] for s in report["steps"])
    assert moai_ckpt.Checkpointer(str(run_dir)).latest_step() == 4  # verify writes nothing
    # a planted difference: the record of step 6 claims another loss
    storage = moai_ckpt.Checkpointer(str(run_dir)).storage
    contents = read_log(storage, 4)
    five, six, seven = contents.records
    storage.delete_prefix("log/000000000004")
    six = six.model_copy(update={"digests": six.digests.model_copy(update={"loss": 0.5})})
    LogWriter(storage, 4).copy([five, six, seven], contents)
    diverged = subprocess.run([*cli, "--verify", "--trust-run-json"], capture_output=True, text=True, env=env)
    assert diverged.returncode == 1, diverged.stdout + diverged.stderr
    assert "non-deterministic" in diverged.stdout and "step 6" in diverged.stdout


# -- several ranks ----------------------------------------------------------------------------


TARGET = "tests.scenarios.dist_scenarios:fault_tolerant_train"


@pytest.fixture(scope="module")
def dist_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    results = launch(TARGET, 2, run_dir=str(tmp_path_factory.mktemp("dref") / "run"), total=10)
    assert all(r.returncode == 0 for r in results), results[0].output[-3000:]
    return results[0].value  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("phase", "die_at", "rank"),
    [("forward", 7, 1), ("backward", 5, 0), ("optimizer", 9, 1), ("snapshot.persist", 8, 1), ("log.write", 6, 0)],
)
def test_two_fsdp_ranks_one_killed_resume_bitwise_after_relaunch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dist_reference: dict[str, Any], phase: str, die_at: int, rank: int
) -> None:
    run_dir = str(tmp_path / "run")
    monkeypatch.setenv("MOAI_CKPT_FAULTS", plan(tmp_path, phase, die_at, rank=rank))
    killed = launch(TARGET, 2, run_dir=run_dir, total=10, timeout=120)
    assert killed[rank].returncode == -9, killed[rank].output[-3000:]
    survivor = killed[1 - rank]  # it does not hang: it fails, or reports the lost rank
    assert survivor.returncode != 0 or "RankLostError" in (survivor.value or {}).get("error", "")
    monkeypatch.delenv("MOAI_CKPT_FAULTS")
    resumed = launch(TARGET, 2, run_dir=run_dir, total=10)
    assert all(r.returncode == 0 for r in resumed), resumed[0].output[-3000:]
    in_progress = fired_at(tmp_path, phase, die_at)  # a snapshot is written while later steps run
    for r in resumed:
        assert r.value["digest"] == dist_reference["digest"]
        # the steps before the one in progress were done; the record of the last may still have
        # been in flight
        assert in_progress - 1 <= r.value["first_step"] + r.value["replayed"] <= in_progress


def test_a_two_rank_run_resumed_on_one_rank_keeps_the_data_order_and_the_step_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dist_reference: dict[str, Any]
) -> None:
    run_dir = str(tmp_path / "run")
    monkeypatch.setenv("MOAI_CKPT_FAULTS", plan(tmp_path, "forward", 7, rank=1))
    killed = launch(TARGET, 2, run_dir=run_dir, total=10, timeout=120)
    assert killed[1].returncode == -9
    monkeypatch.delenv("MOAI_CKPT_FAULTS")
    (alone,) = launch(TARGET, 1, run_dir=run_dir, total=10)
    assert alone.returncode == 0, alone.output[-3000:]
    out = alone.value
    assert out["last_step"] == 10  # the same step count
    assert out["replayed"] >= 1 and "world_size: 2 -> 1" in out["placement_changes"]
    # the same global batches, step by step: the one rank trains on what both ranks did
    sampler = moai_ckpt.GlobalSampler(64, 16, seed=1)
    expected = {}
    for step in range(1, 11):
        expected[step] = sampler.global_batch()
        sampler.advance()
    logged = history(moai_ckpt.Checkpointer(run_dir).storage)
    assert {s: r.samples for s, r in logged.items()} == expected  # every step, before and after the kill
    assert {int(s): idx for s, idx in out["samples"].items()} == {s: expected[s] for s in map(int, out["samples"])}
    assert out["samples"]  # some steps ran live on the one rank
    drift = out["max_drift"]
    assert drift["loss_rel"] < 1e-4 and drift["state_rel"] < 1e-4  # reported, and small
    assert records_after(moai_ckpt.Checkpointer(run_dir).storage, 4).records  # the log goes on


# -- batches that cannot be indexed -------------------------------------------------------------


def run_stream(run_dir: Path, total: int, kind: str, faults: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MOAI_CKPT_FAULTS", None)
    if faults:
        env["MOAI_CKPT_FAULTS"] = faults
    return subprocess.run(
        [sys.executable, "-m", "tests.scenarios.stream_scenario", str(run_dir), str(total), kind],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=env,
    )


def test_a_resumable_source_that_cannot_be_indexed_replays_from_the_log_and_resumes_bitwise(tmp_path: Path) -> None:
    reference = result_of(run_stream(tmp_path / "ref" / "run", 12, "resumable"))
    run_dir = tmp_path / "killed" / "run"
    killed = run_stream(run_dir, 12, "resumable", faults=plan(tmp_path, "backward", 7))
    assert killed.returncode == -9, killed.stderr[-3000:]
    out = result_of(run_stream(run_dir, 12, "resumable"))
    assert out["digest"] == reference["digest"]
    assert out["replayed"] == 2  # steps 5 and 6, from the logged batches
    assert out["yielded"] == 12 - 4  # the source was advanced through the replayed steps too
    records = history(moai_ckpt.Checkpointer(str(run_dir)).storage)
    assert sorted(records) == list(range(1, 13)) and all(r.batch and r.samples is None for r in records.values())


def test_a_stream_is_not_touched_by_the_replay_which_feeds_the_logged_batches(tmp_path: Path) -> None:
    from replay import codec
    from replay.log import records_after
    from tests.scenarios.stream_scenario import make_batch

    run_dir = tmp_path / "killed" / "run"
    killed = run_stream(run_dir, 12, "stream", faults=plan(tmp_path, "backward", 7))
    assert killed.returncode == -9, killed.stderr[-3000:]
    out = result_of(run_stream(run_dir, 12, "stream"))
    assert out["replayed"] == 2 and out["yielded"] == 12 - 6  # only the live steps 7..12 read the stream
    contents = records_after(moai_ckpt.Checkpointer(str(run_dir)).storage, 4)

    def batch_of(step: int) -> dict:
        record = next(r for r in contents.records if r.step == step)
        assert record.batch is not None
        return codec.unpack(contents.blob(record.batch))[0]  # type: ignore[no-any-return]

    for step, item in ((5, 5), (6, 6), (7, 8)):  # the killed step had taken item 7: a stream moves on
        expected, got = make_batch(item), batch_of(step)
        assert all(torch.equal(expected[k], got[k]) for k in expected)


# -- corrupt snapshots and failing storage --------------------------------------------------------


@pytest.mark.parametrize("damage", ["chunk", "commit marker"])
def test_a_corrupt_newest_snapshot_is_never_loaded_an_older_one_is_and_the_log_bridges_the_gap(
    tmp_path: Path, reference: dict[str, Any], damage: str
) -> None:
    run_dir = tmp_path / "run"
    result_of(run_scenario(run_dir, 10))  # snapshots 0, 4, 8; steps 9 and 10 logged after 8
    storage = moai_ckpt.Checkpointer(str(run_dir)).storage
    if damage == "chunk":
        key = next(k for k in storage.list("snapshots/000000000008/model") if is_chunk_key(k))
    else:
        key = "snapshots/000000000008/commit.json"
    data = bytearray(storage.read(key))
    data[len(data) // 2] ^= 0x04  # one bit, at rest
    storage.write(key, bytes(data))
    resumed = run_scenario(run_dir, TOTAL)
    out = result_of(resumed)
    if damage == "chunk":
        assert "cannot be restored" in resumed.stderr  # detected, and never loaded
    else:  # the relaunch says which newer snapshot it passed over, and why
        assert "snapshot(s) at step 8 are not committed" in resumed.stderr
        assert "commit marker is damaged" in resumed.stderr and "step 4 is used instead" in resumed.stderr
    assert out["first_step"] == 5 and out["replayed"] == 6  # from step 4, through the logs of 4 and 8
    assert out["digest"] == reference["digest"]
    ckpt = moai_ckpt.Checkpointer(str(run_dir))
    assert ckpt.verify(12).ok  # later snapshots are written as usual


def test_a_snapshot_the_storage_refuses_does_not_stop_the_run(tmp_path: Path, reference: dict[str, Any]) -> None:
    run_dir = f"faulty::file://{tmp_path / 'run'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOAI_CKPT_STORAGE_FAULT_LOG": str(tmp_path / "faults.jsonl")}
    env["MOAI_CKPT_STORAGE_FAULTS"] = json.dumps(
        {"permanent_nth": [1], "ops": ["write"], "paths": ["*snapshots/000000000008/*"]}
    )
    env.pop("MOAI_CKPT_FAULTS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.scenarios.ft_scenario", run_dir, str(TOTAL)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=env,
    )
    out = result_of(proc)
    assert "snapshot of step 8 failed and is skipped" in proc.stderr
    assert out["digest"] == reference["digest"] and out["replayed"] == 0
    injected = [json.loads(line) for line in (tmp_path / "faults.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in injected] == ["permanent"]  # the one fault planned, accounted for
    steps = moai_ckpt.Checkpointer(str(tmp_path / "run")).steps()
    assert 8 not in steps and 12 in steps


@pytest.mark.parametrize(
    ("damaged", "message"),
    [
        ("chunk", "starting from the state the training function builds"),
        ("marker", "the snapshot of step 0 is missing or damaged"),  # step 0 no longer counts as a snapshot
        ("marker+newer", "starting from the state the training function builds"),  # and step 4's chunk too
    ],
)
def test_with_no_usable_snapshot_the_run_rebuilds_step_0_and_replays_the_whole_log(
    tmp_path: Path, reference: dict[str, Any], damaged: str, message: str
) -> None:
    run_dir = tmp_path / "run"
    # the snapshot of step 0 (and of step 4 when "newer"), every step logged after it
    logged = 5 if damaged == "marker+newer" else 3
    result_of(run_scenario(run_dir, logged))
    storage = moai_ckpt.Checkpointer(str(run_dir)).storage
    keys = ["snapshots/000000000000/commit.json"] if damaged.startswith("marker") else []
    for step in [0] if damaged == "chunk" else [4] if damaged == "marker+newer" else []:
        keys.append(next(k for k in storage.list(f"snapshots/{step:012d}/model") if is_chunk_key(k)))
    for key in keys:
        data = bytearray(storage.read(key))
        data[len(data) // 2] ^= 0x04
        storage.write(key, bytes(data))
    assert 0 not in moai_ckpt.Checkpointer(str(run_dir)).steps() or damaged == "chunk"
    resumed = run_scenario(run_dir, TOTAL)
    out = result_of(resumed)
    assert message in resumed.stderr
    assert out["first_step"] == 1 and out["replayed"] == logged  # every replayed step checked against the log
    assert out["digest"] == reference["digest"]
