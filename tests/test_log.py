"""The op-stream log: framed records in immutable segments, torn tails dropped, corruption caught."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from moai_ckpt.storage import Storage, open_storage
from replay.log import (
    CorruptLogError,
    Digests,
    LogWriter,
    StepRecord,
    get_blob,
    prune_log,
    read_log,
    segment_key,
    segments,
)

_memory = itertools.count()


@pytest.fixture(params=["local", "memory"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(str(tmp_path / "run"))
    return open_storage(f"memory://log-tests-{next(_memory)}")


def record(step: int, writer: LogWriter | None = None) -> StepRecord:
    rng = {"torch": writer.put_blob(f"rng state {step % 3}".encode())} if writer else {}
    return StepRecord(
        step=step,
        samples=[step * 4 + i for i in range(4)],
        rng=rng,
        hparams={"lr": [0.1 / step, 0.01], "loss_scale": 1024.0, "accumulation": 2},
        digests=Digests(loss=1.0 / step, grad_norm=0.5, state=f"{step:08x}"),
    )


def write(storage: Storage, base: int, steps: range, **options: object) -> LogWriter:
    writer = LogWriter(storage, base, **options)  # type: ignore[arg-type]
    for step in steps:
        writer.append(record(step, writer))
    return writer


def test_records_read_back_in_order_with_every_field(storage: Storage) -> None:
    write(storage, 10, range(11, 21)).close()
    contents = read_log(storage, 10)
    assert [r.step for r in contents.records] == list(range(11, 21))
    assert contents.records[3] == record(14, LogWriter(storage, 10))
    assert contents.torn_tail is None and contents.corruption is None
    assert len(segments(storage, 10)) == 10  # one durable segment per step by default


def test_group_commit_writes_one_segment_per_group_and_a_crash_loses_at_most_the_group(storage: Storage) -> None:
    writer = write(storage, 0, range(1, 13), flush_every=5)  # 12 appended, "crash" without close
    assert [(f, last) for f, last, _ in segments(storage, 0)] == [(1, 5), (6, 10)]
    assert read_log(storage, 0).last_step == 10
    writer.close()
    assert read_log(storage, 0).last_step == 12


def test_a_torn_tail_is_dropped_and_the_rest_kept(storage: Storage) -> None:
    write(storage, 0, range(1, 9), flush_every=4).close()
    _, _, last = segments(storage, 0)[-1]
    data = storage.read(last)
    storage.write(last, data[: len(data) - 17])  # the writer died mid-write
    contents = read_log(storage, 0)
    assert [r.step for r in contents.records] == [1, 2, 3, 4, 5, 6, 7]
    assert contents.torn_tail is not None and contents.corruption is None


def test_a_corrupt_record_stops_reading_before_it_with_a_clear_message(storage: Storage) -> None:
    write(storage, 0, range(1, 10), flush_every=3).close()
    _, _, middle = segments(storage, 0)[1]  # steps 4-6
    data = bytearray(storage.read(middle))
    data[len(data) // 2] ^= 0x20
    storage.write(middle, bytes(data))
    contents = read_log(storage, 0)
    assert contents.last_step in (4, 5)  # records before the damaged one
    assert isinstance(contents.corruption, CorruptLogError)
    assert "replay stops at step" in str(contents.corruption) and middle in str(contents.corruption)
    with pytest.raises(CorruptLogError):
        LogWriter.resume(storage, 0)


def test_a_missing_segment_is_a_gap_not_a_silent_skip(storage: Storage) -> None:
    write(storage, 0, range(1, 7), flush_every=2).close()
    storage.delete([segment_key(0, 3, 4)])
    contents = read_log(storage, 0)
    assert contents.last_step == 2
    assert "jumps from step 2 to 5" in str(contents.corruption)


def test_resume_after_a_torn_tail_keeps_the_valid_records_and_continues(storage: Storage) -> None:
    write(storage, 5, range(6, 12), flush_every=3).close()
    _, _, last = segments(storage, 5)[-1]  # steps 9-11
    torn = storage.read(last)[:-9]
    storage.write(last, torn)
    writer, contents = LogWriter.resume(storage, 5)
    assert contents.last_step == 10 and writer.last_step == 10
    assert [(f, lst) for f, lst, _ in segments(storage, 5)] == [(6, 8), (9, 10)]
    writer.append(record(11, writer))
    writer.close()
    assert [r.step for r in read_log(storage, 5).records] == list(range(6, 12))
    with pytest.raises(ValueError, match="expected a record for step 12"):
        writer.append(record(14))


def test_a_crash_between_rewriting_and_deleting_a_torn_segment_still_reads_consistently(storage: Storage) -> None:
    write(storage, 0, range(1, 7), flush_every=3).close()
    _, _, last = segments(storage, 0)[-1]  # steps 4-6
    torn = storage.read(last)[:-5]
    storage.write(last, torn)
    rewritten = LogWriter(storage, 0)
    rewritten._write([(r.step, r.model_dump_json().encode()) for r in read_log(storage, 0).records[3:]])
    contents = read_log(storage, 0)  # both the rewrite (4-5) and the torn original (4-6) exist
    assert contents.last_step == 5 and contents.corruption is None


def test_blobs_are_content_addressed_stored_once_and_checked(storage: Storage) -> None:
    writer = LogWriter(storage, 0)
    a, b = writer.put_blob(b"state"), writer.put_blob(b"state")
    assert a == b and len(storage.list("log/blobs")) == 1
    assert get_blob(storage, a) == b"state"
    storage.write(storage.list("log/blobs")[0], b"tampered")
    with pytest.raises(CorruptLogError, match="digest"):
        get_blob(storage, a)
    with pytest.raises(CorruptLogError):
        get_blob(storage, "../../etc/passwd")


def test_logs_of_pruned_snapshots_and_their_blobs_are_removed(storage: Storage) -> None:
    old = write(storage, 0, range(1, 4))
    old.put_blob(b"only in the old log")
    write(storage, 3, range(4, 7)).close()
    blobs_before = set(storage.list("log/blobs"))
    assert prune_log(storage, oldest_kept_snapshot=3) == [0]
    assert segments(storage, 0) == [] and len(segments(storage, 3)) == 3
    kept = read_log(storage, 3)
    referenced = {d for r in kept.records for d in r.rng.values()}
    assert {k.rsplit("/", 1)[-1] for k in storage.list("log/blobs")} == referenced
    assert len(storage.list("log/blobs")) < len(blobs_before)
