"""Storage nobody vouches for: reads are bounded before they allocate, restores are all-or-nothing,
every failure is a moai-ckpt error naming URL, step and key, and save checks its arguments first.

Edits are made the way an attacker with write access would: `moai_ckpt.testing.tamper` recomputes
every checksum, so what is refused here is refused by the checks on the data itself.
"""

from __future__ import annotations

import json
import os
import random
import resource
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

import moai_ckpt
from moai_ckpt import cli
from moai_ckpt.arrays import array_metadata
from moai_ckpt.dtypes import from_name
from moai_ckpt.format import ArrayRecord
from moai_ckpt.layout import snapshot_dir
from moai_ckpt.testing import tamper
from moai_ckpt.tree import MAX_DEPTH
from tests.helpers import Trainer, fingerprint


def snapshot_file(run_dir: str, step: int, *parts: str) -> Path:
    return Path(run_dir, snapshot_dir(step), *parts)


def forge_manifest(run_dir: str, step: int, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit the manifest and recompute every checksum (an attacker's edit)."""

    def edited(document: dict[str, Any]) -> dict[str, Any]:
        edit(document)
        return document

    tamper.edit_json(snapshot_file(run_dir, step, "manifest.json"), edited)
    tamper.reseal_snapshot(run_dir, step)


def forge_array(run_dir: str, step: int, name: str, *, matching_zarr_json: bool = True, **fields: Any) -> None:
    """Change an array record, write a zarr.json that matches it, and reseal."""

    def edit(manifest: dict[str, Any]) -> None:
        manifest["arrays"][name].update(fields)
        if matching_zarr_json:
            record = ArrayRecord.model_validate(manifest["arrays"][name])
            meta = array_metadata(record, from_name(record.dtype))
            snapshot_file(run_dir, step, name, "zarr.json").write_text(json.dumps(meta))

    forge_manifest(run_dir, step, edit)


def forge_entry_sizes(run_dir: str, step: int, name: str, nbytes: int) -> None:
    """Make the rank index claim ``nbytes`` for every chunk of ``name``, resealing only the hashes."""
    path = snapshot_file(run_dir, step, "ranks", "00000.json")
    index = json.loads(path.read_bytes())
    for entry in index["chunks"][name]:
        entry["nbytes"] = nbytes
    path.write_text(json.dumps(index))
    tamper.reseal_snapshot(run_dir, step, chunks=False)


@pytest.fixture
def saved(run_dir: str) -> moai_ckpt.Checkpointer:
    trainer = Trainer.build(seed=0)
    trainer.step()
    ckpt = moai_ckpt.Checkpointer(run_dir, chunk_bytes=1024)
    ckpt.save(1, trainer.state({"tokens": 1, "x": 1.5}))
    return ckpt


def refused_untouched(
    ckpt: moai_ckpt.Checkpointer, error: type[Exception], state: dict[str, Any] | None = None, **kwargs: Any
) -> moai_ckpt.MoaiCkptError:
    """Restore must raise ``error`` (a moai-ckpt error naming URL and step) and change no object."""
    state = state if state is not None else Trainer.build(seed=9).state({"tokens": 0, "x": 0.0})
    before = fingerprint(state)
    with pytest.raises(error) as info:
        ckpt.restore(state, **kwargs)
    assert fingerprint(state) == before, "a failed restore changed the objects"
    assert isinstance(info.value, moai_ckpt.MoaiCkptError)
    assert info.value.url == ckpt.url and info.value.step is not None
    return info.value


# -- bounded reads ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_trillion_rows_in_chunks_of_one_fail_at_once_by_arithmetic(
    saved: moai_ckpt.Checkpointer, run_dir: str
) -> None:
    # before: verify and restore built the list of 1e12 chunks until MemoryError (55 s, 5.4 GB)
    forge_array(run_dir, 1, "model/body.0.weight", shape=[10**12, 16], chunks=[16, 16])  # the chunks that exist
    error = refused_untouched(saved, moai_ckpt.LimitExceededError)
    assert "max_array_bytes" in str(error) and error.key == f"{snapshot_dir(1)}/model/body.0.weight"
    roomy = moai_ckpt.Checkpointer(run_dir, max_array_bytes=10**15)  # the limit is not what saves us
    error = refused_untouched(roomy, moai_ckpt.MissingDataError)
    assert "the shape implies 62500000000 chunks, the rank indexes list 2" in str(error)
    report = roomy.verify(1)
    assert [f.kind for f in report.faults] == ["MissingDataError"]


def test_one_huge_chunk_is_refused_before_torch_allocates(saved: moai_ckpt.Checkpointer, run_dir: str) -> None:
    # before: a raw RuntimeError from torch.empty; rank index sizes are forged to match the shape
    size = 2**39  # 512 GiB of uint8, under the default limit of 1 TiB
    forge_array(run_dir, 1, "data_gen/value", shape=[size], chunks=[size])
    forge_entry_sizes(run_dir, 1, "data_gen/value", size + 4)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused_untouched(saved, moai_ckpt.CorruptSnapshotError)  # the host refuses it, or the chunk is short
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) * 1024 < 1 << 30
    small = moai_ckpt.Checkpointer(run_dir, max_array_bytes=1 << 20)
    error = refused_untouched(small, moai_ckpt.LimitExceededError)
    assert f"would take {size} bytes, more than the limit of {1 << 20}" in str(error)
    with pytest.raises(ValueError, match="max_array_bytes"):
        moai_ckpt.Checkpointer(run_dir, max_array_bytes=0)


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"chunks": [0, 16]}, moai_ckpt.ManifestMismatchError, "along dimension 0 alone"),  # was ZeroDivisionError
        ({"chunks": []}, moai_ckpt.ManifestMismatchError, "along dimension 0 alone"),  # was IndexError
        ({"chunks": [16, 8]}, moai_ckpt.ManifestMismatchError, "along dimension 0 alone"),
        ({"dtype": "float99"}, moai_ckpt.UnsupportedFormatError, "unknown tensor dtype 'float99'"),  # was ValueError
        ({"shape": [2**64, 16], "chunks": [1, 16]}, moai_ckpt.ManifestMismatchError, "64-bit"),
    ],
)
def test_array_records_this_format_never_writes_are_refused_by_kind(
    saved: moai_ckpt.Checkpointer, run_dir: str, fields: dict[str, Any], error: type[Exception], message: str
) -> None:
    forge_array(run_dir, 1, "model/body.0.weight", matching_zarr_json=False, **fields)
    found = refused_untouched(saved, error)
    assert message in str(found) and "model/body.0.weight" in (found.key or "")
    assert any(message in f.message for f in saved.verify(1).faults)


# -- decoding and restoring -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "node",
    [
        {"$tensor": 5},  # was KeyError
        {"$float": [1]},  # was TypeError
        {"$np": "zz", "v": 1},
        {"$np": "<i8", "v": 10**30},  # was OverflowError
        {"$np": "O", "v": 1},
        {"$np": "<i8"},
        {"$dtype": 3},
        {"$dtype": "Tensor"},
        {"$device": "bogus:0"},  # was RuntimeError
        {"$size": [-1]},
        {"$bytes": "!!"},
        {"$tuple": 5},
        {"$dict": [[1]]},
        {"$dict": [[{"a": 1}, 2]]},  # an unhashable key
        {"$ndarray": ["model/body.0.weight"]},
    ],
    ids=repr,
)
def test_a_malformed_tree_node_is_a_corrupt_snapshot_error_naming_its_key(
    saved: moai_ckpt.Checkpointer, run_dir: str, node: dict[str, Any]
) -> None:
    forge_manifest(run_dir, 1, lambda m: m["objects"]["extra"]["tree"].update(x=node))
    error = refused_untouched(saved, moai_ckpt.CorruptSnapshotError)
    assert error.key == "extra.x" and "malformed" in str(error)
    assert any(f.key == "extra" and "malformed" in f.message for f in saved.verify(1).faults)


def test_an_entry_tampered_to_a_wrong_type_changes_nothing(saved: moai_ckpt.Checkpointer, run_dir: str) -> None:
    # before: a raw RuntimeError from load_state_dict, after the optimizer's lr had changed
    forge_manifest(run_dir, 1, lambda m: m["objects"]["model"]["tree"].update({"norm.weight": 3}))
    error = refused_untouched(saved, moai_ckpt.StateMismatchError)
    assert error.key == "model.norm.weight" and "where the live object has a tensor" in str(error)


def test_an_sgd_optimizer_does_not_restore_from_an_adamw_snapshot(saved: moai_ckpt.Checkpointer) -> None:
    trainer = Trainer.build(seed=9)
    sgd = torch.optim.SGD(trainer.model.parameters(), lr=0.1, momentum=0.9)
    error = refused_untouched(saved, moai_ckpt.StateMismatchError, {"model": trainer.model, "optim": sgd})
    assert "torch.optim.adamw.AdamW" in str(error) and "torch.optim.sgd.SGD" in str(error)
    assert error.key == "optim"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda group: group.pop("lr"), "has no 'lr'"),
        (lambda group: group.update(betas={"$tuple": [0.9, 0.99, 0.5]}), "'betas'"),
        (lambda group: group.update(weight_decay="a lot"), "'weight_decay'"),
        (lambda group: group.update(params=[0, 0, 1, 2, 3, 4, 5]), "not distinct"),
    ],
)
def test_param_groups_must_fit_the_optimizer(
    saved: moai_ckpt.Checkpointer, run_dir: str, edit: Callable[[dict[str, Any]], Any], message: str
) -> None:
    forge_manifest(run_dir, 1, lambda m: edit(m["objects"]["optim"]["tree"]["param_groups"][0]))
    error = refused_untouched(saved, moai_ckpt.MoaiCkptError)
    assert message in str(error) and error.key == "optim"


def test_a_module_of_another_dtype_is_refused(saved: moai_ckpt.Checkpointer) -> None:
    trainer = Trainer.build(seed=9)
    trainer.model.double()
    error = refused_untouched(saved, moai_ckpt.StateMismatchError, {"model": trainer.model})
    assert "dtype torch.float32 in snapshot, torch.float64 live" in str(error)


def test_a_generator_state_that_would_not_load_is_refused_before_any_is_touched(
    saved: moai_ckpt.Checkpointer, run_dir: str
) -> None:
    forge_manifest(run_dir, 1, lambda m: m["objects"]["np_rng"]["tree"].update(state={"state": "x", "inc": 1}))
    error = refused_untouched(saved, moai_ckpt.CorruptSnapshotError)
    assert error.key == "np_rng" and "does not load" in str(error)


class Counter:
    """A user object with state; it refuses a state it did not write only when told to."""

    def __init__(self, value: int, refuse: bool = False) -> None:
        self.value, self.refuse = value, refuse

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self.refuse:
            raise RuntimeError("refused by the object itself")
        self.value = state["value"]


def test_a_load_that_fails_late_puts_back_every_object_loaded_before_it(run_dir: str) -> None:
    trainer = Trainer.build(seed=0)
    trainer.step()
    ckpt = moai_ckpt.Checkpointer(run_dir)
    ckpt.save(1, {**trainer.state({"tokens": 1}), "counter": Counter(5), "rng": random.Random(1)})
    fresh = Trainer.build(seed=9)

    def refuse(*_: Any) -> None:
        raise RuntimeError("the module's own hook refuses")

    fresh.model.register_load_state_dict_pre_hook(refuse)  # modules load last: after everything else
    state = {**fresh.state({"tokens": 0}), "counter": Counter(0), "rng": random.Random(2)}
    error = refused_untouched(ckpt, moai_ckpt.StateMismatchError, state)
    assert error.key == "model" and "put back" in str(error)
    state["counter"].refuse = True  # a user object that refuses, after the optimizer has loaded
    fresh.model._load_state_dict_pre_hooks.clear()
    error = refused_untouched(ckpt, moai_ckpt.StateMismatchError, state)
    assert error.key == "counter" and "refused by the object itself" in str(error)


# -- saving -----------------------------------------------------------------------------------------


def _deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("step", "state", "info", "error"),
    [
        (1.0, {"x": torch.ones(2)}, None, moai_ckpt.InvalidArgumentError),
        (True, {"x": torch.ones(2)}, None, moai_ckpt.InvalidArgumentError),
        (-1, {"x": torch.ones(2)}, None, moai_ckpt.InvalidArgumentError),
        (10**12, {"x": torch.ones(2)}, None, moai_ckpt.InvalidArgumentError),
        (1, {"e": {"v": np.longdouble(1.5)}}, None, moai_ckpt.UnserializableStateError),  # was RecursionError
        (1, {"e": {"v": np.zeros(2, dtype="datetime64[s]")}}, None, moai_ckpt.UnserializableStateError),
        (1, {"x": torch.empty(3, device="meta")}, None, moai_ckpt.UnserializableStateError),  # NotImplementedError
        (1, {"e": _deep(5000)}, None, moai_ckpt.UnserializableStateError),  # was RecursionError
        (1, {"e": _deep(MAX_DEPTH + 2)}, None, moai_ckpt.UnserializableStateError),
        (1, {"x": torch.ones(2)}, {"o": object()}, moai_ckpt.UnserializableStateError),  # after every chunk
        (1, {"x": torch.ones(2)}, {1: 2}, moai_ckpt.UnserializableStateError),
        (1, {"x": torch.ones(2)}, {"nan": float("nan")}, moai_ckpt.UnserializableStateError),
    ],
    ids=lambda v: type(v).__name__,
)
def test_save_checks_its_arguments_before_writing_anything(
    run_dir: str, step: Any, state: dict[str, Any], info: Any, error: type[Exception]
) -> None:
    ckpt = moai_ckpt.Checkpointer(run_dir)
    with pytest.raises(error) as info_save:
        ckpt.save(step, state, info=info)
    with pytest.raises(error) as info_async:
        ckpt.save_async(step, state, info=info)
    for raised in (info_save.value, info_async.value):
        assert isinstance(raised, moai_ckpt.MoaiCkptError) and raised.url == ckpt.url
        assert raised.step == (step if error is not moai_ckpt.InvalidArgumentError else None)
    assert not os.path.exists(run_dir) or not any(files for _, _, files in os.walk(run_dir))


def test_a_numpy_integer_step_is_a_step_and_lazy_views_save_their_values(run_dir: str) -> None:
    # before: a numpy step failed with TypeError after every chunk was written
    ckpt = moai_ckpt.Checkpointer(run_dir)
    z = torch.tensor([1 + 2j, 3 - 4j])
    ckpt.save(np.int64(3), {"conj": z.conj(), "neg": z.conj().imag, "deep": {"v": _deep(MAX_DEPTH)}})
    assert ckpt.steps() == [3] and isinstance(ckpt.steps()[0], int)
    state: dict[str, Any] = {"conj": torch.zeros(2, dtype=torch.complex64), "neg": torch.zeros(2), "deep": {}}
    ckpt.restore(state, step=np.int64(3))
    assert torch.equal(state["conj"], z.conj().resolve_conj()) and torch.equal(state["neg"], -z.imag)
    assert state["deep"] == {"v": _deep(MAX_DEPTH)}  # the deepest tree a save takes reads back
    with pytest.raises(moai_ckpt.InvalidArgumentError):
        ckpt.restore(state, step=10**20)


# -- verify and the snapshots a restore passes over -------------------------------------------------


def test_verify_compares_the_whole_zarr_json(run_dir: str) -> None:
    ckpt = moai_ckpt.Checkpointer(run_dir)
    ckpt.save(1, {"weights": torch.randn(4, 3).bfloat16(), "norm": torch.ones(3)})
    norm = snapshot_file(run_dir, 1, "norm", "value", "zarr.json")
    tamper.edit_json(norm, lambda meta: {("fillvalue" if k == "fill_value" else k): v for k, v in meta.items()})
    with pytest.raises(Exception):  # noqa: B017 - plain zarr cannot open it: the field matters
        zarr.open_array(str(norm.parent), mode="r")
    weights = snapshot_file(run_dir, 1, "weights", "value", "zarr.json")

    def relabel(meta: dict[str, Any]) -> dict[str, Any]:  # plain zarr now reads the words as float16
        meta["data_type"] = "float16"
        meta["attributes"]["moai_ckpt"] = {"dtype": "float16"}
        return meta

    tamper.edit_json(weights, relabel)
    faults = {f.key: f.message for f in ckpt.verify(1).faults}
    assert "fill_value is missing" in faults[str(norm.relative_to(run_dir))]
    assert "unexpected field 'fillvalue'" in faults[str(norm.relative_to(run_dir))]
    assert (
        "data_type is 'float16' on storage but the manifest implies 'uint16'"
        in faults[str(weights.relative_to(run_dir))]
    )
    refused_untouched(ckpt, moai_ckpt.ManifestMismatchError, {"norm": torch.zeros(3)})


def test_a_newer_snapshot_with_a_damaged_marker_is_reported_not_passed_over_silently(run_dir: str) -> None:
    # before: verify said the older step was OK (exit 0), and restore returned it without a word
    trainer = Trainer.build(seed=0)
    ckpt = moai_ckpt.Checkpointer(run_dir)
    ckpt.save(1, trainer.state())
    trainer.step()
    ckpt.save(2, trainer.state())
    tamper.flip_bit(snapshot_file(run_dir, 2, "commit.json"), 8 * 40 + 2)
    report = ckpt.verify()
    assert report.step == 1 and not report.ok
    assert [f.key for f in report.faults] == [f"{snapshot_dir(2)}/commit.json"]
    assert "step 2 are not committed" in report.faults[0].message
    assert ckpt.verify(1).faults == report.faults  # the newest committed step is the one that reports it
    assert report.snapshot_ok and [e.step for e in report.passed_over] == [2]  # step 1 itself is sound
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ckpt.restore(Trainer.build(seed=9).state()) == 1
    assert any("step 2 are not committed" in str(w.message) and "step 1 is used" in str(w.message) for w in caught)
    result = CliRunner().invoke(cli.app, ["verify", run_dir], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and "not committed" in result.stdout


def test_a_logged_batch_that_does_not_parse_is_a_corrupt_snapshot_error() -> None:
    from replay import codec

    data = codec.pack({"x": torch.arange(6).reshape(3, 2), "ids": [1, 2]}, parts=[2, 1])
    batch, parts = codec.unpack(data)
    assert torch.equal(batch["x"], torch.arange(6).reshape(3, 2)) and parts == [2, 1]
    (length,) = codec._LEN.unpack_from(data, 0)
    header = json.loads(data[4 : 4 + length])

    def forged(edit: Callable[[dict[str, Any]], Any]) -> bytes:
        copy = json.loads(json.dumps(header))
        edit(copy)
        text = json.dumps(copy).encode()
        return codec._LEN.pack(len(text)) + text + data[4 + length :]

    name = next(iter(header["tensors"]))
    for bad in [
        data[:3],
        data[: 4 + length // 2],
        forged(lambda h: h["tensors"][name].__setitem__(1, [10**12, 2])),  # more rows than bytes
        forged(lambda h: h["tensors"][name].__setitem__(0, "Tensor")),
        forged(lambda h: h["tensors"].__setitem__(name, [1])),
        forged(lambda h: h.update(parts="all")),
        forged(lambda h: h.update(tree={"$tensor": 5})),
        forged(lambda h: h.pop("tree")),
    ]:
        with pytest.raises(moai_ckpt.CorruptSnapshotError):
            codec.unpack(bad)
