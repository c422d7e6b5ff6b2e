"""save_async through the writer process: the same snapshot as `save`, errors and the fence across
the process boundary, no orphan when the training process dies, and the thread path as fallback.

Every test runs the real writer process (`moai_ckpt.persist_worker`) and waits until it is up
before the save it checks (`Checkpointer.start_writer`), so which path a save takes never depends
on timing; each asserts the path it took (`SaveHandle.persist`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import moai_ckpt
from moai_ckpt import shm
from moai_ckpt.errors import LeaseLostError, WriterProcessError
from moai_ckpt.layout import commit_key, snapshot_dir
from moai_ckpt.testing.faulty import FaultPlan
from tests.helpers import Trainer, assert_bitwise_equal, full_state_tensors

START_S = 120  # a fresh interpreter importing torch on a loaded 2-core machine


def process_checkpointer(url: str, **options: object) -> moai_ckpt.Checkpointer:
    ckpt = moai_ckpt.Checkpointer(url, persist="process", **options)
    assert ckpt.start_writer(wait=START_S), "the writer process did not come up"
    return ckpt


def gone(pid: int) -> bool:
    """The process has exited (a zombie that nobody reaped yet counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.05)
    return gone(pid)


def files_of(root: Path, step: int) -> dict[str, bytes]:
    base = root / snapshot_dir(step)
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def test_save_async_through_the_writer_process_writes_what_save_writes(tmp_path: Path) -> None:
    trainer = Trainer.build(seed=0)
    trainer.step()
    expected = {k: v.clone() for k, v in full_state_tensors(trainer).items()}
    torch.manual_seed(5)  # the same global RNG states in both snapshots
    with moai_ckpt.Checkpointer(str(tmp_path / "sync")) as sync:
        sync_marker = sync.save(4, trainer.state({"n": 1}))
    torch.manual_seed(5)
    with process_checkpointer(str(tmp_path / "proc")) as ckpt:
        handle = ckpt.save_async(4, trainer.state({"n": 1}))
        assert handle is not None and handle.persist == "process"
        with torch.no_grad():  # changes after the call never reach the snapshot
            for p in trainer.model.parameters():
                p.add_(1.0)
        marker = handle.result(timeout=120)
        assert ckpt.verify(4).ok
        fresh = Trainer.build(seed=3)
        assert ckpt.restore(fresh.state()) == 4
        assert_bitwise_equal(full_state_tensors(fresh), expected)
    by_process, by_save = files_of(tmp_path / "proc", 4), files_of(tmp_path / "sync", 4)
    assert by_process.keys() == by_save.keys()
    # every chunk, zarr.json and rank index is the same bytes; the manifest differs only in its time
    dated = {"manifest.json", "commit.json"}
    assert {k: v for k, v in by_process.items() if k not in dated} == {
        k: v for k, v in by_save.items() if k not in dated
    }
    assert marker.body.total_bytes == sync_marker.body.total_bytes
    assert marker.body.array_count == sync_marker.body.array_count


def test_a_storage_error_in_the_writer_process_surfaces_as_the_same_error_and_commits_nothing(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    plan = FaultPlan(permanent_nth=[1], ops={"write"}, paths=["*/c.*"])  # the first chunk write fails
    retry = moai_ckpt.RetryPolicy(attempts=2, initial_backoff_s=0.001)
    with process_checkpointer(f"faulty://{run}", target_protocol="file", plan=plan, retry=retry) as ckpt:
        handle = ckpt.save_async(7, {"t": {"a": torch.ones(64), "b": torch.zeros(64)}})
        assert handle is not None and handle.persist == "process"
        with pytest.raises(moai_ckpt.StorageError) as caught:
            handle.result(timeout=120)
        assert caught.value.step == 7 and caught.value.url is not None and caught.value.key is not None
        assert "/c." in caught.value.key
        assert ckpt.steps() == []
        assert not ckpt.storage.exists(commit_key(7))
        # the writer process lives on: the next save through it commits
        again = ckpt.save_async(8, {"t": {"a": torch.ones(64)}})
        assert again is not None and again.persist == "process"
        again.result(timeout=120)
        assert ckpt.steps() == [8]


def test_a_writer_process_whose_lease_lapsed_writes_nothing_more(tmp_path: Path) -> None:
    run = tmp_path / "run"
    slow = FaultPlan(latency_s=0.1, ops={"write"}, paths=["*/c.*"])
    state = {"t": {f"w{i}": torch.full((256,), float(i)) for i in range(40)}}  # 40 chunks: 4 s of writes
    with process_checkpointer(
        f"faulty://{run}", target_protocol="file", plan=slow, lease_ttl_s=1.0, io_threads=1
    ) as ckpt:
        ckpt.acquire()
        assert ckpt.writer.lease is not None
        ckpt.writer.lease._stop.set()  # its heartbeat stalls, as in a process stopped past its TTL
        handle = ckpt.save_async(3, state)
        assert handle is not None and handle.persist == "process"
        with pytest.raises(LeaseLostError, match="not renewed in time"):
            handle.result(timeout=120)
        chunks = sorted((run / snapshot_dir(3)).rglob("c.*"))
        assert len(chunks) < 40  # it stopped writing once the lease lapsed
        time.sleep(0.5)
        assert sorted((run / snapshot_dir(3)).rglob("c.*")) == chunks  # and wrote nothing after
        assert not (run / commit_key(3)).exists()


PARENT = r"""
import json, sys, time
import torch, moai_ckpt
ckpt = moai_ckpt.Checkpointer(sys.argv[1], persist="process")
assert ckpt.start_writer(wait=120)
handle = ckpt.save_async(1, {"t": {"a": torch.ones(1000)}})
handle.result(timeout=120)
print(json.dumps({"writer": ckpt.writer_pid, "persist": handle.persist}), flush=True)
time.sleep(600)
"""


def test_the_writer_process_exits_when_its_training_process_is_killed(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        said = json.loads(parent.stdout.readline())
        assert said["persist"] == "process"
        writer = said["writer"]
        assert not gone(writer)
        assert any(n.startswith(shm.prefix(parent.pid)) for n in os.listdir(shm.ROOT))
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert wait_gone(writer), "the writer process outlived its training process"
        assert not any(n.startswith(shm.prefix(parent.pid)) for n in os.listdir(shm.ROOT))
    finally:
        parent.kill()
        parent.wait()


def test_close_ends_the_writer_process_and_frees_shared_memory(tmp_path: Path) -> None:
    ckpt = process_checkpointer(str(tmp_path / "run"))
    handle = ckpt.save_async(1, {"t": {"a": torch.ones(100)}})
    assert handle is not None and handle.persist == "process"
    writer = ckpt.writer_pid
    assert writer is not None
    ckpt.close()
    assert wait_gone(writer)
    assert not any(n.startswith(shm.prefix(os.getpid())) for n in os.listdir(shm.ROOT))
    with moai_ckpt.Checkpointer(str(tmp_path / "run")) as reader:
        assert reader.steps() == [1]


def test_a_state_larger_than_shared_memory_persists_in_a_thread_after_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = {"t": {"a": torch.arange(4096, dtype=torch.float32)}}  # 16 KiB
    with process_checkpointer(str(tmp_path / "run"), shm_limit_bytes=4096) as ckpt:
        writer = ckpt.writer_pid
        assert writer is not None
        with caplog.at_level(logging.WARNING, logger="moai_ckpt"):
            first = ckpt.save_async(1, state)
            assert first is not None and first.persist == "thread"
            first.result(timeout=120)
            second = ckpt.save_async(2, state)
            assert second is not None and second.persist == "thread"
            second.result(timeout=120)
        warned = [r for r in caplog.records if "persists in a thread" in r.getMessage()]
        assert len(warned) == 1 and "shared memory" in warned[0].getMessage()
        assert wait_gone(writer)  # the unused writer process was let go
        fresh = {"t": {"a": torch.zeros(4096)}}
        assert ckpt.restore(fresh) == 2
        assert torch.equal(fresh["t"]["a"], state["t"]["a"])


def test_a_writer_process_that_cannot_start_leaves_saves_to_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python-here"))
    with (
        caplog.at_level(logging.WARNING, logger="moai_ckpt"),
        moai_ckpt.Checkpointer(str(tmp_path / "run"), persist="process") as ckpt,
    ):
        assert not ckpt.start_writer(wait=1)
        for step in (1, 2):
            handle = ckpt.save_async(step, {"t": {"a": torch.ones(8)}})
            assert handle is not None and handle.persist == "thread"
            handle.result(timeout=60)
        assert ckpt.steps() == [1, 2]
    warned = [r for r in caplog.records if "could not start" in r.getMessage()]
    assert len(warned) == 1


def test_memory_storage_persists_in_a_thread(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="moai_ckpt"):
        ckpt = moai_ckpt.Checkpointer("memory://persist-thread/run", persist="process")
        assert not ckpt.start_writer(wait=1)
    handle = ckpt.save_async(1, {"t": {"a": torch.ones(8)}})
    assert handle is not None and handle.persist == "thread"
    handle.result(timeout=60)
    assert any("memory://" in r.getMessage() for r in caplog.records)
    ckpt.close()


def test_a_writer_process_that_dies_mid_save_fails_that_save_and_the_next_persist_in_a_thread(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    slow = FaultPlan(latency_s=0.2, ops={"write"}, paths=["*/c.*"])
    state = {"t": {f"w{i}": torch.full((16,), float(i)) for i in range(30)}}
    with process_checkpointer(f"faulty://{run}", target_protocol="file", plan=slow, io_threads=1) as ckpt:
        handle = ckpt.save_async(1, state)
        assert handle is not None and handle.persist == "process"
        writer = ckpt.writer_pid
        assert writer is not None
        deadline = time.monotonic() + START_S
        while not list((run / snapshot_dir(1)).rglob("c.*")):  # it is writing
            assert time.monotonic() < deadline, "the writer process wrote no chunk"
            time.sleep(0.05)
        os.kill(writer, signal.SIGKILL)
        with pytest.raises(WriterProcessError, match="died"):
            handle.result(timeout=120)
        assert not (run / commit_key(1)).exists()
        again = ckpt.save_async(2, {"t": {"a": torch.ones(8)}})
        assert again is not None and again.persist == "thread"
        again.result(timeout=120)
        assert ckpt.steps() == [2]
