"""Storage faults, injected through `FaultyFileSystem` over real files.

Transient faults are retried (and each retry is logged), permanent ones fail fast, retries stop
at their bounds, an outage fails a save without committing anything or losing older snapshots,
and a torn write is never loaded.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from moai_ckpt import Checkpointer
from moai_ckpt.errors import CorruptSnapshotError, StorageError, TransientStorageError, TruncatedDataError
from moai_ckpt.storage import FsspecStorage, RetryPolicy, Storage, is_transient, open_storage
from moai_ckpt.testing import (
    FaultPlan,
    FaultyFileSystem,
    InjectedConnectionError,
    InjectedFault,
    InjectedPermissionError,
    InjectedTimeoutError,
    Outage,
    assert_bitwise_equal,
    tensors_of,
)

FAST = RetryPolicy(attempts=5, initial_backoff_s=0.001, max_backoff_s=0.002, jitter_s=0.0, deadline_s=10)
PATIENT = RetryPolicy(attempts=12, initial_backoff_s=0.001, max_backoff_s=0.004, jitter_s=0.001, deadline_s=20)
RETRY_LOGGER = "moai_ckpt.storage"


# -- helpers -------------------------------------------------------------------------------------


def faulty_storage(root: Path, plan: FaultPlan, retry: RetryPolicy = FAST) -> FsspecStorage:
    """The wrapper's own behaviour, call by call: without the size read-back after each write."""
    storage = open_storage(f"faulty://{root}", retry, target_protocol="file", plan=plan)
    assert isinstance(storage, FsspecStorage)
    storage.supports_atomic_put = True
    return storage


def fs_of(holder: Storage | Checkpointer) -> FaultyFileSystem:
    storage = holder.storage if isinstance(holder, Checkpointer) else holder
    assert isinstance(storage, FsspecStorage) and isinstance(storage.fs, FaultyFileSystem)
    return storage.fs


def faulty_checkpointer(
    run: Path, plan: FaultPlan, retry: RetryPolicy = FAST, *, verify_writes: bool = False
) -> Checkpointer:
    """A Checkpointer over the fault-injecting wrapper. By default without the size read-back
    after each write, so that torn writes reach storage and the read-side checks are tested."""
    ckpt = Checkpointer(
        f"faulty://{run}", chunk_bytes=4096, io_threads=4, retry=retry, target_protocol="file", plan=plan
    )
    ckpt.storage.supports_atomic_put = not verify_writes
    return ckpt


def retry_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == RETRY_LOGGER and "retrying" in r.getMessage()]


def small_model(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model whose arrays span several 4 KiB chunks, with AdamW."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model: nn.Module, optim: torch.optim.Optimizer, steps: int = 1) -> None:
    for _ in range(steps):
        loss = model(torch.randint(0, 100, (4, 6))).pow(2).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()


def state_tensors(model: nn.Module, optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return tensors_of({"model": model.state_dict(), "optim": optim.state_dict()})


def restored(ckpt: Checkpointer, step: int | None = None) -> tuple[int, dict[str, torch.Tensor]]:
    """Restore into a fresh, differently initialised model; returns the step and its tensors."""
    model, optim = small_model(seed=99)
    train(model, optim)
    got = ckpt.restore({"model": model, "optim": optim}, step=step)
    return got, state_tensors(model, optim)


@pytest.fixture
def retry_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger=RETRY_LOGGER)
    return caplog


# -- the fault plan ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"transient_rate": 1.5}, "transient_rate"),
        ({"fail_nth": [0]}, "fail_nth"),
        ({"latency_s": -1}, "latency_s"),
        ({"torn_fraction": 1.0}, "torn_fraction"),
        ({"ops": ["read", "rename"]}, "ops"),
        ({"outage": {"start": 2}}, "outage"),
        ({"outage": {"calls": 3, "seconds": 1.0}}, "outage"),
        ({"fail_nth": [3], "permanent_nth": [3]}, "permanent_nth"),
        ({"torn_nth": [1], "ops": ["read"]}, "torn_nth"),
        ({"fail_rate": 0.1}, "fail_rate"),
    ],
)
def test_a_bad_fault_plan_is_refused_naming_the_option(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        FaultPlan(**options)


def test_a_fault_plan_is_frozen_and_the_default_injects_nothing() -> None:
    plan = FaultPlan()
    assert not plan.injects_faults
    assert FaultPlan(outage=Outage(calls=1)).injects_faults
    with pytest.raises(ValidationError):
        plan.transient_rate = 0.5


# -- the file system on its own ------------------------------------------------------------------


def test_the_default_plan_passes_everything_through_and_counts_each_call(tmp_path: Path) -> None:
    storage = faulty_storage(tmp_path / "run", FaultPlan())
    storage.write("a/b", b"xyz")
    assert storage.read("a/b") == b"xyz"
    assert storage.size("a/b") == 3
    assert storage.list() == ["a/b"]
    storage.delete(["a/b"])
    stats = fs_of(storage).stats
    assert stats.calls == {"write": 1, "read": 1, "info": 1, "list": 1, "delete": 1}
    assert stats.numbered == 5
    assert stats.total_faults == 0


def test_only_calls_of_the_planned_ops_and_paths_are_numbered(tmp_path: Path) -> None:
    storage = faulty_storage(tmp_path / "run", FaultPlan(fail_nth=[2], ops={"read"}, paths=["*/b*"]))
    for key in ("a", "b1", "b2"):
        storage.write(key, key.encode())
    assert storage.read("a") == b"a"  # not covered: not numbered
    assert storage.read("b1") == b"b1"  # call 1
    assert storage.read("b2") == b"b2"  # call 2 fails, its retry is call 3
    stats = fs_of(storage).stats
    assert stats.calls == {"write": 3, "read": 4}
    assert stats.numbered == 3
    assert [(e.call, e.op, e.kind) for e in stats.events] == [(2, "read", "fail_nth")]
    assert stats.events[0].path.endswith("/run/b2")


@pytest.mark.parametrize(
    ("transient_error", "cls", "builtin"),
    [("connection", InjectedConnectionError, ConnectionError), ("timeout", InjectedTimeoutError, TimeoutError)],
)
def test_injected_transient_errors_are_classified_transient(
    tmp_path: Path,
    transient_error: Literal["connection", "timeout"],
    cls: type[InjectedFault],
    builtin: type[Exception],
) -> None:
    fs = FaultyFileSystem(target_protocol="file", plan=FaultPlan(fail_nth=[1], transient_error=transient_error))
    with pytest.raises(cls) as info:
        fs.cat_file(str(tmp_path / "missing"))
    assert isinstance(info.value, builtin)
    assert is_transient(info.value)
    assert info.value.kind == "fail_nth"


def test_an_injected_permission_error_is_classified_permanent(tmp_path: Path) -> None:
    fs = FaultyFileSystem(target_protocol="file", plan=FaultPlan(permanent_nth=[1]))
    with pytest.raises(PermissionError) as info:
        fs.pipe_file(str(tmp_path / "x"), b"x")
    assert isinstance(info.value, InjectedPermissionError)
    assert info.value.errno == errno.EACCES
    assert not is_transient(info.value)
    assert not (tmp_path / "x").exists()


def test_random_faults_repeat_with_the_same_seed_and_differ_with_another(tmp_path: Path) -> None:
    (tmp_path / "obj").write_bytes(b"x")

    def pattern(seed: int) -> list[int]:
        fs = FaultyFileSystem(target_protocol="file", plan=FaultPlan(transient_rate=0.3, seed=seed))
        for _ in range(60):
            with contextlib.suppress(ConnectionError):
                fs.cat_file(str(tmp_path / "obj"))
        return [e.call for e in fs.stats.events]

    first = pattern(seed=1)
    assert 5 < len(first) < 35
    assert pattern(seed=1) == first
    assert pattern(seed=2) != first


def test_an_outage_by_calls_fails_exactly_its_window(tmp_path: Path) -> None:
    (tmp_path / "obj").write_bytes(b"x")
    fs = FaultyFileSystem(target_protocol="file", plan=FaultPlan(outage=Outage(start=3, calls=2)))
    outcomes = []
    for _ in range(6):
        try:
            fs.cat_file(str(tmp_path / "obj"))
            outcomes.append("ok")
        except ConnectionError:
            outcomes.append("fail")
    assert outcomes == ["ok", "ok", "fail", "fail", "ok", "ok"]
    assert fs.stats.faults == {"outage": 2}


def test_an_outage_by_seconds_ends_on_time(tmp_path: Path) -> None:
    (tmp_path / "obj").write_bytes(b"x")
    fs = FaultyFileSystem(target_protocol="file", plan=FaultPlan(outage=Outage(seconds=0.2)))
    with pytest.raises(ConnectionError):
        fs.cat_file(str(tmp_path / "obj"))
    time.sleep(0.1)
    with pytest.raises(ConnectionError):
        fs.cat_file(str(tmp_path / "obj"))
    time.sleep(0.15)
    assert fs.cat_file(str(tmp_path / "obj")) == b"x"


def test_latency_delays_every_covered_call(tmp_path: Path) -> None:
    storage = faulty_storage(tmp_path / "run", FaultPlan(latency_s=0.03, ops={"write"}))
    started = time.perf_counter()
    for i in range(4):
        storage.write(f"k{i}", b"x")
    assert storage.list() == ["k0", "k1", "k2", "k3"]
    assert time.perf_counter() - started >= 4 * 0.03


def test_a_torn_write_reports_success_but_stores_only_a_prefix(tmp_path: Path) -> None:
    storage = faulty_storage(tmp_path / "run", FaultPlan(torn_nth=[1], torn_fraction=0.25, ops={"write"}))
    storage.write("torn", [b"a" * 50, b"b" * 50])
    storage.write("whole", b"c" * 100)
    assert (tmp_path / "run" / "torn").read_bytes() == b"a" * 25
    assert storage.read("whole") == b"c" * 100
    with pytest.raises(TruncatedDataError):
        storage.read_into("torn", [memoryview(bytearray(100))])
    stats = fs_of(storage).stats
    assert stats.faults == {"torn": 1}
    assert stats.paths("torn") == [str(tmp_path / "run" / "torn")]


def test_opening_a_file_goes_through_the_fault_hook(tmp_path: Path) -> None:
    fs = FaultyFileSystem(target_protocol="file", plan=FaultPlan(fail_nth=[1, 3]))
    path = str(tmp_path / "sub" / "obj")
    with pytest.raises(ConnectionError):
        fs.open(path, "wb")
    with fs.open(path, "wb") as f:
        f.write(b"payload")
    with pytest.raises(ConnectionError):
        fs.open(path, "rb")
    with fs.open(f"faulty://{path}", "rb") as f:
        assert f.read() == b"payload"
    assert fs.stats.calls == {"write": 2, "read": 2}


def test_reset_restarts_the_numbering_and_can_change_the_plan(tmp_path: Path) -> None:
    storage = faulty_storage(tmp_path / "run", FaultPlan(fail_nth=[1]))
    fs = fs_of(storage)
    storage.write("k", b"x")
    assert fs.stats.faults == {"fail_nth": 1}
    fs.reset()
    assert fs.stats.numbered == 0 and fs.stats.total_faults == 0
    fs.reset(FaultPlan(permanent_nth=[1]))
    with pytest.raises(StorageError):
        storage.write("k", b"y")
    assert fs.stats.faults == {"permanent": 1}


# -- retries through the storage layer -----------------------------------------------------------


def test_failing_nth_calls_are_retried_and_every_retry_is_logged(
    tmp_path: Path, retry_log: pytest.LogCaptureFixture
) -> None:
    storage = faulty_storage(tmp_path / "run", FaultPlan(fail_nth=[1, 2]))
    storage.write("a/b", b"payload")
    assert storage.read("a/b") == b"payload"
    assert fs_of(storage).stats.calls == {"write": 3, "read": 1}
    records = retry_records(retry_log)
    assert len(records) == 2
    assert all(r.levelno == logging.WARNING for r in records)
    assert f"write of {storage.url}/a/b" in records[0].getMessage()
    assert [f"attempt {n}/{FAST.attempts}" in r.getMessage() for n, r in enumerate(records, 1)] == [True, True]


def test_a_permanent_error_fails_fast_without_retries(tmp_path: Path, retry_log: pytest.LogCaptureFixture) -> None:
    storage = faulty_storage(tmp_path / "run", FaultPlan(permanent_nth=[1]))
    with pytest.raises(StorageError) as info:
        storage.write("a/b", b"payload")
    assert not isinstance(info.value, TransientStorageError)
    assert isinstance(info.value.__cause__, InjectedPermissionError)
    assert (info.value.url, info.value.key) == (storage.url, "a/b")
    assert "write" in str(info.value) and "not retried" in str(info.value)
    assert fs_of(storage).stats.calls == {"write": 1}
    assert retry_records(retry_log) == []


def test_retries_stop_at_the_attempt_bound(tmp_path: Path, retry_log: pytest.LogCaptureFixture) -> None:
    policy = RetryPolicy(attempts=4, initial_backoff_s=0.001, max_backoff_s=0.001, jitter_s=0, deadline_s=30)
    storage = faulty_storage(tmp_path / "run", FaultPlan(outage=Outage(calls=1000)), policy)
    with pytest.raises(TransientStorageError) as info:
        storage.read("obj")
    assert "4 attempts" in str(info.value)
    assert isinstance(info.value.__cause__, ConnectionError)
    assert fs_of(storage).stats.calls == {"read": 4}
    assert len(retry_records(retry_log)) == 3


def test_retries_stop_at_the_deadline(tmp_path: Path) -> None:
    policy = RetryPolicy(attempts=100, initial_backoff_s=0.02, max_backoff_s=0.02, jitter_s=0, deadline_s=0.25)
    storage = faulty_storage(tmp_path / "run", FaultPlan(outage=Outage(calls=1000)), policy)
    started = time.perf_counter()
    with pytest.raises(TransientStorageError):
        storage.write("obj", b"x")
    elapsed = time.perf_counter() - started
    # it gives up at the first failure past the deadline: at most one backoff late
    assert policy.deadline_s <= elapsed < policy.deadline_s + policy.max_backoff_s + 0.25
    assert 5 < fs_of(storage).stats.calls["write"] < 20


def test_a_slow_outage_by_seconds_is_ridden_out_within_the_deadline(tmp_path: Path) -> None:
    policy = RetryPolicy(attempts=100, initial_backoff_s=0.01, max_backoff_s=0.02, jitter_s=0, deadline_s=5)
    storage = faulty_storage(tmp_path / "run", FaultPlan(outage=Outage(start=2, seconds=0.15)), policy)
    storage.write("first", b"1")
    started = time.perf_counter()
    storage.write("second", b"2")
    assert 0.15 <= time.perf_counter() - started < 1.0
    assert storage.read("second") == b"2"
    assert fs_of(storage).stats.faults["outage"] >= 3


# -- checkpoints under faults --------------------------------------------------------------------


@pytest.mark.parametrize(
    "plan",
    [
        FaultPlan(transient_rate=0.15, seed=1),
        FaultPlan(transient_rate=0.15, seed=2, transient_error="timeout", latency_s=0.001),
        FaultPlan(fail_nth=[1, 2, 7, 20, 21, 40, 41, 42], ops={"write", "read"}),
    ],
    ids=["rate", "rate-timeouts", "nth"],
)
def test_transient_faults_are_retried_and_the_snapshot_restores_bitwise(
    tmp_path: Path, retry_log: pytest.LogCaptureFixture, plan: FaultPlan
) -> None:
    model, optim = small_model(seed=0)
    train(model, optim, 2)
    expected = state_tensors(model, optim)
    with faulty_checkpointer(tmp_path / "run", plan, PATIENT) as ckpt:
        ckpt.save(7, {"model": model, "optim": optim})
        assert ckpt.steps() == [7]
        assert ckpt.verify(7).ok
        step, got = restored(ckpt)
    assert step == 7
    assert_bitwise_equal(got, expected)
    stats = fs_of(ckpt).stats
    assert stats.transient_faults > 0
    assert stats.transient_faults == stats.total_faults
    # every injected fault was met by exactly one logged retry
    assert len(retry_records(retry_log)) == stats.transient_faults


def test_an_outage_longer_than_the_retry_budget_fails_the_save_and_loses_nothing(
    tmp_path: Path, retry_log: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    model, optim = small_model(seed=0)
    train(model, optim)
    with Checkpointer(str(run), chunk_bytes=4096) as healthy:
        healthy.save(1, {"model": model, "optim": optim})
    at_1 = state_tensors(model, optim)
    train(model, optim)

    # the storage goes down for good part-way through writing step 2's chunks
    plan = FaultPlan(ops={"write"}, outage=Outage(start=4, calls=100_000))
    budget = RetryPolicy(attempts=3, initial_backoff_s=0.001, max_backoff_s=0.002, jitter_s=0, deadline_s=5)
    with faulty_checkpointer(run, plan, budget) as ckpt:
        with pytest.raises(StorageError) as info:
            ckpt.save(2, {"model": model, "optim": optim})
        assert isinstance(info.value, TransientStorageError)
        assert info.value.url == ckpt.url
        assert "storage write failed" in str(info.value) and ckpt.url in str(info.value)
        assert "snapshots/000000000002/" in (info.value.key or "")
    assert fs_of(ckpt).stats.faults["outage"] >= budget.attempts
    assert retry_records(retry_log)

    with Checkpointer(str(run)) as after:
        assert not after.storage.exists("snapshots/000000000002/commit.json")
        assert after.steps() == [1]
        assert [(e.step, e.status) for e in after.scan()] == [(1, "committed"), (2, "uncommitted")]
        step, got = restored(after)
    assert step == 1
    assert_bitwise_equal(got, at_1)


def test_a_save_after_the_outage_replaces_the_leftovers(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, optim = small_model(seed=0)
    train(model, optim)
    budget = RetryPolicy(attempts=2, initial_backoff_s=0.001, max_backoff_s=0.001, jitter_s=0, deadline_s=5)
    with faulty_checkpointer(run, FaultPlan(ops={"write"}, outage=Outage(start=3, calls=100_000)), budget) as ckpt:
        with pytest.raises(StorageError):
            ckpt.save(1, {"model": model, "optim": optim})
        fs_of(ckpt).reset(FaultPlan())  # storage is back
        ckpt.save(1, {"model": model, "optim": optim})
        assert ckpt.steps() == [1]
        assert ckpt.verify(1).ok
        step, got = restored(ckpt)
    assert step == 1
    assert_bitwise_equal(got, state_tensors(model, optim))


def test_a_permanent_error_fails_the_save_fast_and_commits_nothing(
    tmp_path: Path, retry_log: pytest.LogCaptureFixture
) -> None:
    model, optim = small_model(seed=0)
    with faulty_checkpointer(tmp_path / "run", FaultPlan(permanent_nth=[5], ops={"write"})) as ckpt:
        with pytest.raises(StorageError) as info:
            ckpt.save(3, {"model": model, "optim": optim})
        assert not isinstance(info.value, TransientStorageError)
        assert "permanent" in str(info.value)
        assert ckpt.steps() == []
        assert not ckpt.storage.exists("snapshots/000000000003/commit.json")
    assert fs_of(ckpt).stats.faults == {"permanent": 1}
    assert retry_records(retry_log) == []


def test_a_torn_chunk_is_never_loaded(tmp_path: Path) -> None:
    model, optim = small_model(seed=0)
    plan = FaultPlan(torn_nth=[1], ops={"write"}, paths=["*/model/0.weight/c.*"])
    with faulty_checkpointer(tmp_path / "run", plan) as ckpt:
        ckpt.save(1, {"model": model, "optim": optim})  # the torn write reported success
        (torn,) = fs_of(ckpt).stats.paths("torn")
        fresh, fresh_optim = small_model(seed=5)
        before = state_tensors(fresh, fresh_optim)
        with pytest.raises(CorruptSnapshotError) as info:
            ckpt.restore({"model": fresh, "optim": fresh_optim})
        assert info.value.key is not None and torn.endswith(info.value.key)
        assert_bitwise_equal(state_tensors(fresh, fresh_optim), before)  # nothing was loaded
        report = ckpt.verify(1)
    assert not report.ok
    assert any(torn.endswith(f.key) for f in report.faults)


def test_a_torn_rank_index_fails_the_save_instead_of_committing(tmp_path: Path) -> None:
    model, optim = small_model(seed=0)
    plan = FaultPlan(torn_nth=[1], ops={"write"}, paths=["*/ranks/*"])
    with faulty_checkpointer(tmp_path / "run", plan) as ckpt:
        with pytest.raises(CorruptSnapshotError, match=r"ranks/00000\.json"):
            ckpt.save(1, {"model": model, "optim": optim})
        assert fs_of(ckpt).stats.faults == {"torn": 1}
        assert ckpt.steps() == []


@pytest.mark.parametrize("pattern", ["*/manifest.json", "*/model/1.weight/zarr.json"])
def test_a_torn_record_is_never_loaded(tmp_path: Path, pattern: str) -> None:
    model, optim = small_model(seed=0)
    plan = FaultPlan(torn_nth=[1], ops={"write"}, paths=[pattern])
    with faulty_checkpointer(tmp_path / "run", plan) as ckpt:
        ckpt.save(1, {"model": model, "optim": optim})
        assert fs_of(ckpt).stats.faults == {"torn": 1}
        fresh, fresh_optim = small_model(seed=5)
        before = state_tensors(fresh, fresh_optim)
        with pytest.raises(CorruptSnapshotError):
            ckpt.restore({"model": fresh, "optim": fresh_optim})
    assert_bitwise_equal(state_tensors(fresh, fresh_optim), before)


def test_a_torn_commit_marker_does_not_count_as_committed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model, optim = small_model(seed=0)
    with Checkpointer(str(run), chunk_bytes=4096) as healthy:
        healthy.save(1, {"model": model, "optim": optim})
    at_1 = state_tensors(model, optim)
    train(model, optim)
    # the marker is created exclusively: on a store without conditional writes it is read back and
    # a torn one written again, so only a marker torn on every try stays torn (and fails the save)
    plan = FaultPlan(torn_nth=[1, 2, 3, 4], ops={"write"}, paths=["*/commit.json"])
    with faulty_checkpointer(run, plan) as ckpt:
        with pytest.raises(TruncatedDataError, match="torn writes"):
            ckpt.save(2, {"model": model, "optim": optim})
        assert fs_of(ckpt).stats.faults == {"torn": 4}
        assert ckpt.steps() == [1]
        assert [(e.step, e.status) for e in ckpt.scan()] == [(1, "committed"), (2, "invalid")]
        step, got = restored(ckpt)
    assert step == 1
    assert_bitwise_equal(got, at_1)


def _read_back_by_restore(path: str) -> bool:
    """Whether restore reads this object as it was torn (group metadata is for zarr readers only;
    objects created exclusively, the marker and the step's claim, are read back and rewritten
    whole; run.json and the lease are outside the snapshot)."""
    if "/snapshots/" not in path:
        return False
    relative = path.split("/snapshots/", 1)[1].split("/", 1)[1]
    if relative in ("commit.json", "claim.json"):
        return False
    return not (relative == "zarr.json" or (relative.count("/") == 1 and relative.endswith("/zarr.json")))


@pytest.mark.parametrize("seed", range(6))
def test_torn_writes_at_random_are_found_by_reading_the_size_back_and_rewritten(tmp_path: Path, seed: int) -> None:
    model, optim = small_model(seed=0)
    expected = state_tensors(model, optim)
    plan = FaultPlan(torn_write_rate=0.3, seed=seed, ops={"write"})
    patient = RetryPolicy(attempts=12, initial_backoff_s=0.001, max_backoff_s=0.01, jitter_s=0.0)
    with faulty_checkpointer(tmp_path / "run", plan, patient, verify_writes=True) as ckpt:
        ckpt.save(1, {"model": model, "optim": optim})
        assert fs_of(ckpt).stats.faults.get("torn", 0) > 0  # writes were torn...
        assert ckpt.steps() == [1] and ckpt.verify(1).ok  # ...and made again until whole
        _, got = restored(ckpt)
        assert_bitwise_equal(got, expected)


@pytest.mark.parametrize("seed", range(4))
def test_torn_writes_the_size_check_cannot_see_never_load_wrong_data(tmp_path: Path, seed: int) -> None:
    """A storage that keeps a prefix yet reports the full size: only the checksums catch it."""
    model, optim = small_model(seed=0)
    expected = state_tensors(model, optim)
    plan = FaultPlan(torn_write_rate=0.1, seed=seed, ops={"write"})
    with faulty_checkpointer(tmp_path / "run", plan) as ckpt:
        try:
            ckpt.save(1, {"model": model, "optim": optim})
        except CorruptSnapshotError:  # a torn rank index is caught before the commit
            torn = fs_of(ckpt).stats.paths("torn")
            # ...and so is an object created exclusively (lease, claim, run.json, marker) that
            # read back torn on every rewrite
            assert any("/ranks/" in p for p in torn) or max(Counter(torn).values()) >= 4
            assert ckpt.steps() == []
            return
        torn = fs_of(ckpt).stats.paths("torn")
        assert ckpt.steps() == [1]  # a marker torn once was read back and written again
        if any(_read_back_by_restore(p) for p in torn):
            with pytest.raises(CorruptSnapshotError):
                restored(ckpt)
        else:
            _, got = restored(ckpt)
            assert_bitwise_equal(got, expected)


def test_retrying_a_storage_call_never_moves_the_training_jobs_random_streams(tmp_path: Path) -> None:
    import random

    import numpy as np
    import torch

    from moai_ckpt.testing.faulty import FaultPlan

    ckpt = Checkpointer(f"faulty://{tmp_path / 'run'}", target_protocol="file", plan=FaultPlan(fail_nth=[1, 2, 3]))
    before = (random.getstate(), np.random.get_state(legacy=False)["state"]["key"].tobytes(), torch.get_rng_state())
    ckpt.storage.write("x/y.bin", b"retried three times")
    after = (random.getstate(), np.random.get_state(legacy=False)["state"]["key"].tobytes(), torch.get_rng_state())
    assert ckpt.storage.fs.stats.faults["fail_nth"] == 3
    assert before[0] == after[0] and before[1] == after[1] and torch.equal(before[2], after[2])
