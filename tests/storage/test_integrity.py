"""Bad data on storage is refused with a clear error, and the user's objects are never touched."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

import moai_ckpt
from moai_ckpt.format import canonical_json, sha256
from moai_ckpt.layout import snapshot_dir
from tests.helpers import Trainer, full_state_tensors


def snapshot_path(run_dir: str, step: int, *parts: str) -> str:
    return os.path.join(run_dir, snapshot_dir(step), *parts)


def first_chunk(run_dir: str, step: int, array: str = "model/body.0.weight") -> str:
    base = snapshot_path(run_dir, step, *array.split("/"))
    for f in sorted(os.listdir(base)):
        if f == "c" or f.startswith("c."):  # zarr v3 default chunk keys, "." separator
            return os.path.join(base, f)
    raise AssertionError(f"no chunk in {base}")


def reseal(run_dir: str, step: int, **changes: object) -> None:
    """Rewrite the commit marker with a valid checksum (a careful tamperer)."""
    path = snapshot_path(run_dir, step, "commit.json")
    body = {**json.loads(Path(path).read_text())["body"], **changes}
    with open(path, "w") as f:
        json.dump({"body": body, "checksum": sha256(canonical_json(body))}, f)


def edit_manifest(run_dir: str, step: int, edit) -> None:
    path = snapshot_path(run_dir, step, "manifest.json")
    manifest = json.loads(Path(path).read_text())
    edit(manifest)
    data = json.dumps(manifest).encode()
    Path(path).write_bytes(data)
    reseal(run_dir, step, manifest_sha256=sha256(data))


@pytest.fixture
def saved(run_dir: str) -> moai_ckpt.Checkpointer:
    trainer = Trainer.build(seed=0)
    trainer.step()
    ckpt = moai_ckpt.Checkpointer(run_dir, chunk_bytes=1024)
    ckpt.save(1, trainer.state({"tokens": 1}))
    trainer.step()
    ckpt.save(2, trainer.state({"tokens": 2}))
    return ckpt


def restore_into_fresh(ckpt: moai_ckpt.Checkpointer, **kwargs: object) -> tuple[Trainer, dict[str, torch.Tensor]]:
    """Restore into a fresh trainer; returns it and its tensors from before the attempt."""
    fresh = Trainer.build(seed=9)
    before = {k: v.clone() for k, v in full_state_tensors(fresh).items()}
    ckpt.restore(fresh.state(), **kwargs)
    return fresh, before


def assert_untouched(ckpt: moai_ckpt.Checkpointer, error: type[Exception], **kwargs: object) -> pytest.ExceptionInfo:
    fresh = Trainer.build(seed=9)
    before = {k: v.clone() for k, v in full_state_tensors(fresh).items()}
    sched_before = fresh.sched.state_dict()
    with pytest.raises(error) as info:
        ckpt.restore(fresh.state(), **kwargs)
    after = full_state_tensors(fresh)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert fresh.sched.state_dict() == sched_before
    assert str(ckpt.url) in str(info.value)
    return info


def test_a_flipped_bit_in_a_chunk_is_caught_and_named(saved: moai_ckpt.Checkpointer, run_dir: str) -> None:
    path = first_chunk(run_dir, 2)
    data = bytearray(Path(path).read_bytes())
    data[3] ^= 0x10
    Path(path).write_bytes(data)
    info = assert_untouched(saved, moai_ckpt.ChecksumError)
    assert info.value.step == 2 and "model/body.0.weight" in (info.value.key or "")
    report = saved.verify(2)
    assert not report.ok and any("body.0.weight" in f.key for f in report.faults)
    assert saved.verify(1).ok


def test_a_truncated_chunk_is_caught(saved: moai_ckpt.Checkpointer, run_dir: str) -> None:
    path = first_chunk(run_dir, 2)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:-7])
    assert_untouched(saved, moai_ckpt.TruncatedDataError)
    assert any(f.kind == "TruncatedDataError" for f in saved.verify(2).faults)


def test_a_missing_chunk_or_array_is_caught(saved: moai_ckpt.Checkpointer, run_dir: str) -> None:
    os.unlink(first_chunk(run_dir, 2))
    assert_untouched(saved, moai_ckpt.MissingDataError)
    os.unlink(snapshot_path(run_dir, 1, "model", "norm.bias", "zarr.json"))
    info = assert_untouched(saved, moai_ckpt.MissingDataError, step=1)
    assert "norm.bias" in str(info.value)


def test_a_tampered_manifest_fails_its_hash(saved: moai_ckpt.Checkpointer, run_dir: str) -> None:
    path = snapshot_path(run_dir, 2, "manifest.json")
    manifest = json.loads(Path(path).read_text())
    manifest["arrays"]["model/body.0.weight"]["shape"] = [16, 16]
    Path(path).write_text(json.dumps(manifest))
    assert_untouched(saved, moai_ckpt.CorruptSnapshotError)


def test_a_manifest_that_disagrees_with_its_arrays_is_refused_even_when_resealed(
    saved: moai_ckpt.Checkpointer, run_dir: str
) -> None:
    def wrong_shape(m: dict) -> None:
        m["arrays"]["model/body.0.weight"]["shape"] = [16, 16]

    edit_manifest(run_dir, 2, wrong_shape)
    info = assert_untouched(saved, moai_ckpt.ManifestMismatchError)
    assert "shape" in str(info.value)

    def wrong_dtype(m: dict) -> None:
        m["arrays"]["model/body.0.weight"]["dtype"] = "float16"

    edit_manifest(run_dir, 1, wrong_dtype)
    assert_untouched(saved, moai_ckpt.ManifestMismatchError, step=1)


def test_an_array_whose_metadata_was_edited_is_refused(saved: moai_ckpt.Checkpointer, run_dir: str) -> None:
    path = snapshot_path(run_dir, 2, "model", "norm.weight", "zarr.json")
    meta = json.loads(Path(path).read_text())
    meta["data_type"] = "int32"
    Path(path).write_text(json.dumps(meta))
    info = assert_untouched(saved, moai_ckpt.ManifestMismatchError)
    assert "data_type" in str(info.value)


@pytest.mark.parametrize(
    "bad", ["../../../etc/passwd", "/etc/passwd", "model/../../x", "model/we ird", "a\\b", "model//x"]
)
def test_a_manifest_key_that_tries_to_leave_the_run_directory_is_refused(
    saved: moai_ckpt.Checkpointer, run_dir: str, bad: str
) -> None:
    def escape(m: dict) -> None:
        record = m["arrays"].pop("model/norm.weight")
        record["path"] = bad
        m["arrays"][bad] = record
        m["objects"]["model"]["tree"]["norm.weight"] = {"$tensor": bad}

    edit_manifest(run_dir, 2, escape)
    info = assert_untouched(saved, moai_ckpt.UnsafeKeyError)
    assert info.value.step == 2


def test_a_corrupt_commit_marker_means_the_snapshot_does_not_exist(saved: moai_ckpt.Checkpointer, run_dir: str) -> None:
    path = snapshot_path(run_dir, 2, "commit.json")
    data = bytearray(Path(path).read_bytes())
    data[data.index(b'"total_bytes": ') + 15] ^= 0x01
    Path(path).write_bytes(data)
    assert saved.steps() == [1]
    assert [e.status for e in saved.scan()] == ["committed", "invalid"]
    with pytest.raises(moai_ckpt.ChecksumError):
        saved.restore(Trainer.build(seed=3).state(), step=2)
    with pytest.warns(UserWarning, match="step 2 are not committed: .* commit marker is damaged"):
        restore_into_fresh(saved)  # the newer snapshot is passed over, and the restore says so
    assert saved.latest_step() == 1


def test_a_newer_format_version_is_refused_with_an_upgrade_hint(saved: moai_ckpt.Checkpointer, run_dir: str) -> None:
    reseal(run_dir, 2, format_version=moai_ckpt.FORMAT_VERSION + 1)
    assert saved.steps() == [1, 2]
    info = assert_untouched(saved, moai_ckpt.UnsupportedFormatError)
    assert "upgrade" in str(info.value) and str(moai_ckpt.FORMAT_VERSION + 1) in str(info.value)


def test_a_model_with_other_parameter_names_or_shapes_is_refused(saved: moai_ckpt.Checkpointer) -> None:
    class Renamed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.other = torch.nn.Linear(3, 3)

    with pytest.raises(moai_ckpt.StateMismatchError, match="names differ"):
        saved.restore({"model": Renamed()})

    from tests.helpers import TinyNet

    wider = TinyNet(dim=24)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(moai_ckpt.StateMismatchError, match="shape") as info:
        saved.restore({"model": wider})
    assert info.value.step == 2
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())


def test_restoring_an_entry_the_snapshot_lacks_is_refused(saved: moai_ckpt.Checkpointer) -> None:
    with pytest.raises(moai_ckpt.StateMismatchError, match="no entries"):
        saved.restore({"model": Trainer.build(0).model, "ema": torch.nn.Linear(2, 2)})


def test_a_corrupt_newest_snapshot_raises_unless_fallback_is_asked_for(
    saved: moai_ckpt.Checkpointer, run_dir: str
) -> None:
    path = first_chunk(run_dir, 2)
    data = bytearray(Path(path).read_bytes())
    data[0] ^= 0xFF
    Path(path).write_bytes(data)
    assert_untouched(saved, moai_ckpt.ChecksumError)
    fresh = Trainer.build(seed=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = saved.restore(fresh.state(), fallback=True)
    assert step == 1
    assert any("restored step 1" in str(w.message) and "step 2" in str(w.message) for w in caught)
    reference = Trainer.build(seed=0)
    reference.step()
    assert all(
        torch.equal(a, b)
        for a, b in zip(reference.model.state_dict().values(), fresh.model.state_dict().values(), strict=True)
    )


def test_errors_belong_to_one_hierarchy_and_to_the_builtins_callers_catch() -> None:
    assert issubclass(moai_ckpt.ChecksumError, moai_ckpt.CorruptSnapshotError)
    assert issubclass(moai_ckpt.CorruptSnapshotError, ValueError)
    assert issubclass(moai_ckpt.StorageError, OSError)
    assert issubclass(moai_ckpt.SnapshotNotFoundError, FileNotFoundError)
    for cls in (
        moai_ckpt.ChecksumError,
        moai_ckpt.StorageError,
        moai_ckpt.UnsafeKeyError,
        moai_ckpt.StateMismatchError,
    ):
        assert issubclass(cls, moai_ckpt.MoaiCkptError)


def test_verify_checks_the_zarr_group_documents_that_plain_zarr_needs(
    saved: moai_ckpt.Checkpointer, run_dir: str
) -> None:
    path = snapshot_path(run_dir, 2, "zarr.json")
    Path(path).write_text('{"zarr_format": 3, "node_ty')
    report = saved.verify(2)
    assert [f.key for f in report.faults] == [f"{snapshot_dir(2)}/zarr.json"]
    os.unlink(snapshot_path(run_dir, 1, "optim", "zarr.json"))
    assert [f.kind for f in saved.verify(1).faults] == ["MissingDataError"]
