"""The op-stream log: framed records in immutable segments, torn tails dropped, corruption caught."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from moai_ckpt import Checkpointer
from moai_ckpt.errors import UnsupportedFormatError
from moai_ckpt.layout import log_segment_key
from moai_ckpt.pruning import prune_run
from moai_ckpt.storage import Storage, open_storage
from replay.log import (
    CorruptLogError,
    Digests,
    LogWriter,
    Placement,
    SegmentHeader,
    StepRecord,
    history,
    read_log,
    records_after,
    segments,
)

_memory = itertools.count()


@pytest.fixture(params=["local", "memory"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(str(tmp_path / "run"))
    return open_storage(f"memory://log-tests-{next(_memory)}")


def record(step: int, writer: LogWriter | None = None) -> tuple[StepRecord, dict[str, bytes]]:
    blobs = {}
    rng = {}
    if writer is not None:
        data = f"rng state {step % 3}".encode()
        digest = __import__("hashlib").sha256(data).hexdigest()
        blobs[digest] = data
        rng = {"rank0": {"torch_cpu": digest}}
    rec = StepRecord(
        step=step,
        samples=[step * 4 + i for i in range(4)],
        rng=rng,
        hparams={"optim.0.lr": 0.1 / step, "optim.0.betas": [0.9, 0.95], "scaler.scale": 1024.0, "accumulation": 2},
        digests=Digests(loss=1.0 / step, grad_norm=0.5, state=float.hex(float(step))),
    )
    return rec, blobs


def write(storage: Storage, base: int, steps: range, **options: object) -> LogWriter:
    writer = LogWriter(storage, base, **options)  # type: ignore[arg-type]
    for step in steps:
        writer.append(*record(step, writer))
    return writer


def test_records_read_back_in_order_with_every_field_and_their_blobs(storage: Storage) -> None:
    write(storage, 10, range(11, 21)).close()
    contents = read_log(storage, 10)
    assert [r.step for r in contents.records] == list(range(11, 21))
    expected, blobs = record(14, LogWriter(storage, 10))
    assert contents.records[3] == expected
    assert all(contents.blob(d) == data for d, data in blobs.items())
    assert contents.torn_tail is None and contents.corruption is None
    assert len(segments(storage, 10)) == 10  # one durable segment per step by default


def test_a_repeated_blob_is_stored_once_per_log(storage: Storage) -> None:
    write(storage, 0, range(1, 10)).close()  # three distinct RNG states over nine steps
    raw = b"".join(storage.read(k) for _, _, k in segments(storage, 0))
    assert raw.count(b"MBLB") == 3
    assert len(read_log(storage, 0).blobs) == 3


def test_every_segment_says_where_its_records_were_made(storage: Storage) -> None:
    placement = Placement(world_size=4, device_type="cuda", device_name="NVIDIA H100 80GB HBM3", torch="2.11.0")
    writer = LogWriter(storage, 0, header=SegmentHeader(base_step=0, placement=placement))
    writer.append(*record(1, writer))
    writer.set_header(SegmentHeader(base_step=0, placement=Placement(world_size=3)))
    writer.append(*record(2, writer))
    contents = read_log(storage, 0)
    assert contents.placement(1) == placement
    assert contents.placement(2) == Placement(world_size=3)
    assert placement.differences(Placement(world_size=3)) == [
        "world_size: 4 -> 3",
        "device_type: cuda -> cpu",
        "device_name: NVIDIA H100 80GB HBM3 -> ",
        "torch: 2.11.0 -> ",
    ]


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


@pytest.mark.parametrize("where", [0.3, 0.5, 0.8])
def test_a_corrupt_record_stops_reading_before_it_with_a_clear_message(storage: Storage, where: float) -> None:
    write(storage, 0, range(1, 10), flush_every=3).close()
    _, _, middle = segments(storage, 0)[1]  # steps 4-6
    data = bytearray(storage.read(middle))
    data[int(len(data) * where)] ^= 0x20
    storage.write(middle, bytes(data))
    contents = read_log(storage, 0)
    assert contents.last_step in (3, 4, 5)  # records before the damaged one
    assert isinstance(contents.corruption, CorruptLogError)
    assert "replay stops at step" in str(contents.corruption) and middle in str(contents.corruption)
    with pytest.raises(CorruptLogError):
        LogWriter.resume(storage, 0)


def test_a_missing_segment_is_a_gap_not_a_silent_skip(storage: Storage) -> None:
    write(storage, 0, range(1, 7), flush_every=2).close()
    storage.delete([log_segment_key(0, 3, 4)])
    contents = read_log(storage, 0)
    assert contents.last_step == 2
    assert "jumps from step 2 to 5" in str(contents.corruption)


def test_a_record_whose_blob_is_gone_is_corruption(storage: Storage) -> None:
    write(storage, 0, range(1, 3)).close()  # step 1 carries its RNG blob; step 2 a new one
    key = segments(storage, 0)[1][2]
    data = storage.read(key)
    blob_at = data.index(b"MBLB")
    length = int.from_bytes(data[blob_at + 4 : blob_at + 8], "little")
    storage.write(key, data[:blob_at] + data[blob_at + 12 + length :])  # the blob frame cut out whole
    contents = read_log(storage, 0)
    assert contents.last_step == 1
    assert "does not hold" in str(contents.corruption)


def test_a_newer_log_format_is_refused_with_an_upgrade_hint(storage: Storage) -> None:
    from replay.log import HEADER_FRAME, frame

    storage.write(log_segment_key(0, 1, 1), frame(HEADER_FRAME, b'{"version": 99, "base_step": 0}'))
    with pytest.raises(UnsupportedFormatError, match="upgrade moai-ckpt"):
        read_log(storage, 0)


def test_resume_after_a_torn_tail_keeps_the_valid_records_and_continues(storage: Storage) -> None:
    write(storage, 5, range(6, 12), flush_every=3).close()
    _, _, last = segments(storage, 5)[-1]  # steps 9-11
    torn = storage.read(last)[:-9]
    storage.write(last, torn)
    writer, contents = LogWriter.resume(storage, 5)
    assert contents.last_step == 10 and writer.last_step == 10
    assert [(f, lst) for f, lst, _ in segments(storage, 5)] == [(6, 8), (9, 10)]
    writer.append(*record(11, writer))
    writer.close()
    reread = read_log(storage, 5)
    assert [r.step for r in reread.records] == list(range(6, 12))
    assert reread.corruption is None and all(reread.blob(d) for r in reread.records for d in r.blob_refs())
    with pytest.raises(ValueError, match="expected a record for step 12"):
        writer.append(*record(14))


def test_a_crash_between_rewriting_and_deleting_a_torn_segment_still_reads_consistently(storage: Storage) -> None:
    write(storage, 0, range(1, 7), flush_every=3).close()
    _, _, last = segments(storage, 0)[-1]  # steps 4-6
    torn = storage.read(last)[:-5]
    storage.write(last, torn)
    contents = read_log(storage, 0)
    rewritten = LogWriter(storage, 0)
    rewritten.last_step = 3
    rewritten.copy(contents.records[3:], contents)
    reread = read_log(storage, 0)  # both the rewrite (4-5) and the torn original (4-6) exist
    assert reread.last_step == 5 and reread.corruption is None


def test_records_after_a_snapshot_whose_log_never_moved_come_from_the_older_log(storage: Storage) -> None:
    write(storage, 0, range(1, 9)).close()  # the snapshot of step 4 committed; the run died before moving
    carried = records_after(storage, 4)
    assert [r.step for r in carried.records] == [5, 6, 7, 8] and carried.carried_from == 0
    assert all(carried.blob(d) for r in carried.records for d in r.blob_refs())
    assert sorted(history(storage)) == list(range(1, 9))


def test_logs_older_than_the_oldest_kept_snapshot_are_pruned_with_it(tmp_path: Path) -> None:
    ckpt = Checkpointer(str(tmp_path / "run"))
    for base, steps in ((0, range(1, 4)), (3, range(4, 7)), (6, range(7, 8))):
        ckpt.save(base, {"extra": {"at": base}})
        write(ckpt.storage, base, steps).close()
    assert prune_run(ckpt, keep=2).deleted == [0]
    assert segments(ckpt.storage, 0) == [] and len(segments(ckpt.storage, 3)) == 3


def test_prune_keeps_an_older_log_that_holds_the_only_records_after_the_kept_snapshot(tmp_path: Path) -> None:
    ckpt = Checkpointer(str(tmp_path / "run"))
    ckpt.save(0, {"extra": {}})
    write(ckpt.storage, 0, range(1, 7)).close()
    ckpt.save(4, {"extra": {}})  # committed, but the run died before its log moved over
    assert prune_run(ckpt, keep=1).deleted == [0]
    assert [r.step for r in records_after(ckpt.storage, 4).records] == [5, 6]
