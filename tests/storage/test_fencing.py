"""One writer per run, fenced: real processes racing, locking, dying and stopping on one run.

Writers are separate Python processes (`WRITER`); the loopback S3 server (moto) runs in this
process and serves the ``s3://`` variants. Every outcome is read back from storage: exactly one
snapshot commits, it verifies and restores bit for bit, and every loser fails with a named
moai-ckpt error, never silently.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import moai_ckpt
from moai_ckpt.errors import LeaseLostError, RunLockedError, StepClaimedError
from moai_ckpt.format import LeaseRecord, WriterIdentity
from moai_ckpt.layout import CLAIM, lease_key, snapshot_dir
from moai_ckpt.lease import CLOCK_SKEW_S
from moai_ckpt.liveness import this_writer
from moai_ckpt.testing import s3 as s3_kit

s3_server = s3_kit.s3_server

#: a writer process: builds its Checkpointer, says "ready", waits for the go file, then acts
WRITER = r"""
import json, os, sys, time
import torch, moai_ckpt
spec = json.loads(sys.argv[1])
ckpt = moai_ckpt.Checkpointer(spec["url"], **spec["options"])
print("ready", flush=True)
while not os.path.exists(spec["go"]):
    time.sleep(0.002)
try:
    if spec.get("hold"):
        ckpt.acquire()
        print(json.dumps({"ok": True, "held": True}), flush=True)
        sys.stdin.read()  # hold the run until the test closes our stdin
    else:
        state = {"weights": {"w": torch.full((4 << 20,), float(spec["fill"]))}}  # 16 MiB
        ckpt.save(spec["step"], state)
        print(json.dumps({"ok": True}), flush=True)
except moai_ckpt.MoaiCkptError as exc:
    print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}), flush=True)
ckpt.close()
"""


@dataclass
class Target:
    """Where the writers write: a URL and the options every process opens it with."""

    url: str
    options: dict[str, Any] = field(default_factory=dict)

    def checkpointer(self, **options: Any) -> moai_ckpt.Checkpointer:
        return moai_ckpt.Checkpointer(self.url, **{**self.options, **options})


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    if request.param == "local":
        yield Target(str(tmp_path / "run"))
    else:
        server: s3_kit.S3Server = request.getfixturevalue("s3_server")
        yield Target(server.url(), dict(server.storage_options))


class Writer:
    """One writer process."""

    def __init__(self, target: Target, go: Path, *, env: dict[str, str] | None = None, **spec: Any) -> None:
        payload = {"url": target.url, "options": {**target.options, **spec.pop("options", {})}, "go": str(go), **spec}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, json.dumps(payload)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        )

    def ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", line + self.errors()

    def outcome(self, timeout: float = 120) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"writer printed no outcome: {self.errors()}"
        return dict(json.loads(line))

    def finish(self, timeout: float = 120) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout)

    def errors(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stderr is not None
        return self.proc.stderr.read()[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def start(target: Target, go: Path, count: int, **spec: Any) -> list[Writer]:
    writers = [
        Writer(target, go, **{k: (v[i] if isinstance(v, list) else v) for k, v in spec.items()}) for i in range(count)
    ]
    for w in writers:
        w.ready()
    return writers


def restored_fill(target: Target, step: int) -> float:
    with target.checkpointer() as ckpt:
        assert ckpt.verify(step).ok
        state: dict[str, Any] = {"weights": {}}
        ckpt.restore(state, step=step)
    w = state["weights"]["w"]
    assert torch.equal(w, torch.full((4 << 20,), float(w[0])))
    return float(w[0])


# -- two writers, one step ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3))
def test_two_processes_saving_one_step_at_once_commit_exactly_one_snapshot(
    target: Target, tmp_path: Path, trial: int
) -> None:
    go = tmp_path / f"go-{trial}"
    writers = start(target, go, 2, step=5, fill=[1.0 + trial, -7.0 - trial])
    try:
        go.touch()  # both save(5, ...) now
        outcomes = [w.outcome() for w in writers]
    finally:
        for w in writers:
            w.kill()
    winners = [i for i, o in enumerate(outcomes) if o["ok"]]
    assert len(winners) == 1, outcomes
    loser = outcomes[1 - winners[0]]
    print(f"trial {trial}: writer {winners[0]} committed; the other failed with {loser['error']}: {loser['message']}")
    # refused at the lease, or (if the winner finished and released first) at the committed step
    assert loser["error"] in ("RunLockedError", "SnapshotExistsError", "StepClaimedError"), loser
    with target.checkpointer() as ckpt:
        assert ckpt.steps() == [5]
        assert [e.status for e in ckpt.scan()] == ["committed"]
    assert restored_fill(target, 5) == [1.0 + trial, -7.0 - trial][winners[0]]


# -- two jobs, one run ----------------------------------------------------------------------------


def test_a_second_job_is_refused_naming_the_first_until_it_closes(target: Target, tmp_path: Path) -> None:
    go = tmp_path / "go"
    go.touch()
    (holder,) = start(target, go, 1, hold=True)
    try:
        assert holder.outcome()["held"]
        with target.checkpointer() as second:
            with pytest.raises(RunLockedError) as info:
                second.save(1, {"x": {"v": 1}})
            message = str(info.value)
            assert f"pid {holder.proc.pid}" in message and f"host {this_writer().host}" in message
            assert "started " in message and "expires at" in message
            assert second.steps() == []
            holder.finish()  # closes its Checkpointer: the lease is released
            second.save(1, {"x": {"v": 1}})
            assert second.steps() == [1]
            assert second.writer.lease is not None and second.writer.lease.takeover.endswith("released it")
    finally:
        holder.kill()


def test_the_run_is_taken_over_at_once_when_its_holder_died(target: Target, tmp_path: Path) -> None:
    go = tmp_path / "go"
    go.touch()
    (holder,) = start(target, go, 1, hold=True, options={"lease_ttl_s": 600})
    assert holder.outcome()["held"]
    holder.proc.send_signal(signal.SIGKILL)  # no release: only its pid says it is gone
    holder.proc.wait(30)
    started = time.monotonic()
    with target.checkpointer(lease_ttl_s=600) as second:
        second.save(1, {"x": {"v": 1}})
        assert second.writer.lease is not None and "is gone" in second.writer.lease.takeover
    assert time.monotonic() - started < 60  # not the 600 s lease


def _foreign_lease(*, expires_in: float, ttl: float, renewed_at: float | None = None) -> LeaseRecord:
    """A lease as a writer on another host would leave it (its pid means nothing here)."""
    now = time.time()
    writer = WriterIdentity(owner="f" * 32, host="elsewhere", machine="other-boot/pid:[1]", pid=4242, started="t0")
    return LeaseRecord(epoch=1, writer=writer, renewed_at=renewed_at or now, expires_at=now + expires_in, ttl_s=ttl)


def _put_lease(ckpt: moai_ckpt.Checkpointer, record: LeaseRecord) -> None:
    ckpt.storage.write(lease_key(record.epoch), record.model_dump_json().encode())


def test_an_expired_lease_of_another_host_is_taken_over(target: Target) -> None:
    with target.checkpointer() as ckpt:
        _put_lease(ckpt, _foreign_lease(expires_in=-(CLOCK_SKEW_S + 1), ttl=30))
        ckpt.save(1, {"x": {"v": 1}})
        assert (
            ckpt.writer.lease is not None and ckpt.writer.lease.epoch == 2 and "expired" in ckpt.writer.lease.takeover
        )


def test_a_silent_lease_of_another_host_is_taken_over_after_one_ttl(target: Target) -> None:
    with target.checkpointer() as ckpt:
        _put_lease(ckpt, _foreign_lease(expires_in=60, ttl=1.5))  # looks valid, never renewed
        started = time.monotonic()
        ckpt.save(1, {"x": {"v": 1}})
        assert time.monotonic() - started >= 1.5
        assert ckpt.writer.lease is not None and "did not renew" in ckpt.writer.lease.takeover


def test_a_renewed_lease_of_another_host_refuses_the_second_job(target: Target) -> None:
    import threading

    with target.checkpointer() as ckpt:
        record = _foreign_lease(expires_in=60, ttl=2.0)
        _put_lease(ckpt, record)
        stop = threading.Event()

        def renew() -> None:  # the other host's heartbeat
            while not stop.wait(0.3):
                _put_lease(ckpt, record.model_copy(update={"renewed_at": time.time()}))

        beat = threading.Thread(target=renew, daemon=True)
        beat.start()
        try:
            with pytest.raises(RunLockedError, match="host elsewhere, pid 4242"):
                ckpt.save(1, {"x": {"v": 1}})
        finally:
            stop.set()
            beat.join()
        assert ckpt.steps() == []


def test_a_restart_of_the_same_torchelastic_job_takes_over_a_live_holder(
    target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    go = tmp_path / "go"
    go.touch()
    env = {"TORCHELASTIC_RUN_ID": "job-7", "TORCHELASTIC_RESTART_COUNT": "0"}
    (holder,) = start(target, go, 1, hold=True, env=env)
    try:
        assert holder.outcome()["held"]
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-8")
        with target.checkpointer() as other_job, pytest.raises(RunLockedError):
            other_job.save(1, {"x": {"v": 1}})
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
        with target.checkpointer() as restarted:
            restarted.save(1, {"x": {"v": 1}})
            assert restarted.writer.lease is not None and "torchelastic job 'job-7'" in restarted.writer.lease.takeover
    finally:
        holder.kill()


# -- zombies --------------------------------------------------------------------------------------


def _stopped(pid: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.05)
    raise AssertionError("the writer never stopped at its fault point")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["snapshot.persist", "snapshot.commit"])
def test_a_writer_stopped_mid_save_never_commits_after_another_job_took_over(
    target: Target, tmp_path: Path, where: str
) -> None:
    ttl = 3.0
    go = tmp_path / "go"
    go.touch()
    fault = [{"at": where, "action": "stop", "once": str(tmp_path / "stopped")}]
    (zombie,) = start(
        target, go, 1, step=5, fill=1.0, options={"lease_ttl_s": ttl}, env={"MOAI_CKPT_FAULTS": json.dumps(fault)}
    )
    try:
        _stopped(zombie.proc.pid)
        time.sleep(ttl + CLOCK_SKEW_S + 0.5)  # its lease runs out while it is stopped
        with target.checkpointer(lease_ttl_s=ttl) as successor:
            new_state = {"weights": {"w": torch.full((4 << 20,), 2.0)}}
            # the zombie's claim on step 5 may still belong to a writer finishing a write
            with pytest.raises(StepClaimedError, match="can be reused in"):
                successor.save(5, new_state)
            successor.save(6, new_state)
            zombie.proc.send_signal(signal.SIGCONT)
            outcome = zombie.outcome()
            assert outcome["ok"] is False and outcome["error"] == "LeaseLostError", outcome
            assert successor.steps() == [6]  # the zombie committed nothing
            assert {e.step: e.status for e in successor.scan()}[5] == "uncommitted"
            time.sleep(ttl + 1)  # past the fence: the step is free again
            successor.save(5, new_state)
            assert successor.steps() == [5, 6]
            listed = successor.storage.list(snapshot_dir(5))
            assert f"{snapshot_dir(5)}/{CLAIM}" not in listed
    finally:
        zombie.kill()
    assert restored_fill(target, 5) == 2.0
    assert restored_fill(target, 6) == 2.0


def test_a_lease_that_lapsed_in_this_process_fails_the_commit(target: Target) -> None:
    with target.checkpointer(lease_ttl_s=1.0) as ckpt:
        ckpt.acquire()
        assert ckpt.writer.lease is not None
        ckpt.writer.lease._stop.set()  # its heartbeat stalls, as in a process stopped for longer than its TTL
        time.sleep(1.2)
        with pytest.raises(LeaseLostError, match="not renewed in time"):
            ckpt.save(1, {"x": {"v": 1}})
        assert ckpt.steps() == []


def test_a_failed_save_lets_go_of_its_claim_and_a_refused_one_touches_none(tmp_path: Path) -> None:
    from moai_ckpt.testing import FaultPlan

    run = tmp_path / "run"
    plan = FaultPlan(permanent_nth=[1], ops={"write"}, paths=["*/c.*"])
    with moai_ckpt.Checkpointer(f"faulty://{run}", target_protocol="file", plan=plan) as ckpt:
        with pytest.raises(moai_ckpt.StorageError):
            ckpt.save(3, {"t": torch.ones(8)})
        assert not ckpt.storage.exists(f"{snapshot_dir(3)}/{CLAIM}")
        ckpt.save(3, {"t": torch.ones(8)})
        assert ckpt.steps() == [3]
        # another writer's claim on a step is left alone by a save that is refused before claiming
        foreign = f"{snapshot_dir(4)}/{CLAIM}"
        ckpt.storage.write(foreign, b"not ours")
        ckpt.storage.write(f"{snapshot_dir(4)}/commit.json", b"{}")
        with pytest.raises(moai_ckpt.SnapshotExistsError):
            ckpt.save(4, {"t": torch.ones(8)})
        assert ckpt.storage.read(foreign) == b"not ours"


def test_a_writer_that_lost_the_run_writes_no_further_log_segment(tmp_path: Path) -> None:
    from replay.log import Digests, LogWriter, StepRecord, read_log

    def record(step: int) -> StepRecord:
        return StepRecord(step=step, samples=[step], rng={}, hparams={}, digests=Digests(loss=1.0 / step))

    with moai_ckpt.Checkpointer(str(tmp_path / "run"), lease_ttl_s=1.0) as ckpt:
        ckpt.acquire()
        writer = LogWriter(ckpt.storage, 0, fence=ckpt.check_writer)
        writer.append(record(1), {})
        assert ckpt.writer.lease is not None
        ckpt.writer.lease._stop.set()  # its heartbeat stalls, as in a process stopped for longer than its TTL
        time.sleep(1.2)
        with pytest.raises(LeaseLostError):
            writer.append(record(2), {})
        assert [r.step for r in read_log(ckpt.storage, 0).records] == [1]


def test_a_snapshot_copied_into_a_run_another_job_holds_is_refused(tmp_path: Path) -> None:
    source = moai_ckpt.Checkpointer(str(tmp_path / "source"))
    source.save(3, {"t": torch.arange(6.0)})
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(run=str(tmp_path / "target"))], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        with moai_ckpt.Checkpointer(str(tmp_path / "target")) as target, pytest.raises(RunLockedError):
            target.copy_snapshot(source, 3)
    finally:
        holder.kill()
        holder.wait()
    with moai_ckpt.Checkpointer(str(tmp_path / "target")) as target:  # the holder is gone: taken over at once
        target.copy_snapshot(source, 3)
        assert target.steps() == [3] and target.verify(3).ok
        state = {"t": torch.zeros(6)}
        target.restore(state)
        assert torch.equal(state["t"], torch.arange(6.0))
    source.close()


HOLD = """
import sys, time, moai_ckpt
ckpt = moai_ckpt.Checkpointer({run!r})
ckpt.acquire()
print("holding", flush=True)
time.sleep(600)
"""
