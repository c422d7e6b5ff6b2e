"""Every dtype and layout round-trips, and the stored group is plain zarr v3."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import Crc32cCodec

import moai_ckpt
from moai_ckpt.dtypes import stored_dtype
from moai_ckpt.layout import snapshot_dir

FLOAT8 = [
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
]
DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    *FLOAT8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
]


class Holder:
    """A Stateful holding named tensors."""

    def __init__(self, tensors: dict[str, Any] | None = None) -> None:
        self.tensors = tensors or {}

    def state_dict(self) -> dict[str, Any]:
        return self.tensors

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tensors = dict(state)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns (every value a dtype can hold, NaN payloads included)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_and_shape_round_trips_bitwise(run_dir: str, dtype: torch.dtype) -> None:
    tensors = {
        "matrix": random_tensor(dtype, (37, 5), seed=1),
        "scalar": random_tensor(dtype, (), seed=2),
        "empty": random_tensor(dtype, (0, 3)),
        "cube": random_tensor(dtype, (3, 4, 5), seed=3),
        "transposed": random_tensor(dtype, (6, 7), seed=4).t(),
        "strided": random_tensor(dtype, (20,), seed=5)[::3],
    }
    ckpt = moai_ckpt.Checkpointer(run_dir, chunk_bytes=4096)
    ckpt.save(1, {"h": Holder(tensors)})
    assert ckpt.verify(1).ok
    restored = Holder()
    ckpt.restore({"h": restored})
    for name, t in tensors.items():
        assert same_bits(restored.tensors[name], t), name
        assert restored.tensors[name].is_contiguous()


def test_chunks_are_split_along_the_first_dimension(run_dir: str) -> None:
    t = torch.arange(1000, dtype=torch.float32).reshape(100, 10)
    ckpt = moai_ckpt.Checkpointer(run_dir, chunk_bytes=400)  # 10 rows of 40 bytes per chunk
    ckpt.save(1, {"h": Holder({"t": t})})
    arr = zarr.open_array(os.path.join(run_dir, snapshot_dir(1), "h", "t"), mode="r")
    assert arr.chunks == (10, 10)
    # the "." separator: every chunk sits beside the array's zarr.json, no directory per dimension
    entries = sorted(os.listdir(os.path.join(run_dir, snapshot_dir(1), "h", "t")))
    assert entries == sorted(["zarr.json", *(f"c.{i}.0" for i in range(10))])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plain_zarr_reads_every_array_with_checksums(run_dir: str, dtype: torch.dtype) -> None:
    t = random_tensor(dtype, (9, 4), seed=7)
    ckpt = moai_ckpt.Checkpointer(run_dir, chunk_bytes=64)
    ckpt.save(3, {"h": Holder({"t": t})})
    group = zarr.open_group(os.path.join(run_dir, snapshot_dir(3)), mode="r")
    arr = group["h/t"]
    assert isinstance(arr, zarr.Array)
    assert [c.to_dict()["name"] for c in arr.metadata.codecs][-1] == "crc32c"
    values = arr[...]
    stored = stored_dtype(dtype)
    assert arr.attrs["moai_ckpt"]["dtype"] == stored.logical
    if stored.reinterpreted:
        words = t.view(stored.torch_words).numpy()
        np.testing.assert_array_equal(values, words)
        if dtype == torch.bfloat16:
            np.testing.assert_array_equal(values.view(ml_dtypes.bfloat16).astype(np.float32), t.float().numpy())
    else:
        np.testing.assert_array_equal(values, t.numpy())


def test_chunks_are_byte_identical_to_what_zarr_itself_writes(run_dir: str, tmp_path) -> None:
    t = torch.randn(50, 3, dtype=torch.float32)
    ckpt = moai_ckpt.Checkpointer(run_dir, chunk_bytes=240)
    ckpt.save(1, {"h": Holder({"t": t})})
    ours = os.path.join(run_dir, snapshot_dir(1), "h", "t")
    ref = zarr.create_array(
        str(tmp_path / "ref"),
        shape=(50, 3),
        chunks=(17, 3),
        dtype="float32",
        compressors=[Crc32cCodec()],
        fill_value=0.0,
        chunk_key_encoding={"name": "default", "separator": "."},
    )
    ref[...] = t.numpy()
    our_meta, ref_meta = (
        json.loads(Path(os.path.join(p, "zarr.json")).read_text()) for p in (ours, str(tmp_path / "ref"))
    )
    for field in ("shape", "data_type", "chunk_grid", "chunk_key_encoding", "codecs", "fill_value", "zarr_format"):
        assert our_meta[field] == ref_meta[field], field
    for i in range(3):
        with (
            open(os.path.join(ours, f"c.{i}.0"), "rb") as a,
            open(tmp_path / "ref" / f"c.{i}.0", "rb") as b,
        ):
            assert a.read() == b.read()


def _to_slash_keys(snapshot: Path) -> int:
    """Rewrite a snapshot's arrays as moai-ckpt wrote them before the "." separator: chunks at
    ``c/<i>/0`` and ``zarr.json`` documents indented, declaring the "/" separator. Returns the
    number of chunks moved."""
    moved = 0
    for meta_path in snapshot.rglob("zarr.json"):
        meta = json.loads(meta_path.read_text())
        if meta["node_type"] != "array":
            continue
        meta["chunk_key_encoding"]["configuration"]["separator"] = "/"
        meta_path.write_text(json.dumps(meta, indent=1))
        for chunk in meta_path.parent.glob("c*"):
            target = meta_path.parent.joinpath(*chunk.name.split("."))
            target.parent.mkdir(parents=True, exist_ok=True)
            chunk.rename(target)
            moved += 1
    return moved


def test_snapshots_with_slash_chunk_keys_still_restore_and_verify(run_dir: str) -> None:
    t = torch.randn(40, 3)
    scalar = torch.tensor(7.5)
    ckpt = moai_ckpt.Checkpointer(run_dir, chunk_bytes=120, capture_rng=False)
    ckpt.save(1, {"h": Holder({"t": t, "s": scalar})})
    snapshot = Path(run_dir) / snapshot_dir(1)
    assert _to_slash_keys(snapshot) == 5  # 4 chunks of t and the 0-d chunk at "c"
    assert (snapshot / "h" / "t" / "c" / "3" / "0").is_file() and (snapshot / "h" / "s" / "c").is_file()
    assert not list(snapshot.rglob("c.*"))
    assert ckpt.verify(1).ok
    into = Holder({"t": torch.zeros(40, 3), "s": torch.tensor(0.0)})
    ckpt.restore({"h": into}, step=1)
    assert torch.equal(into.tensors["t"], t) and torch.equal(into.tensors["s"], scalar)
    arr = zarr.open_array(str(snapshot / "h" / "t"), mode="r")  # and plain zarr follows it too
    np.testing.assert_array_equal(arr[...], t.numpy())


@pytest.mark.parametrize(
    "encoding",
    [
        {"name": "v2", "configuration": {"separator": "."}},
        {"name": "default", "configuration": {"separator": "-"}},
        {"name": "default", "configuration": {}},
        "default",
    ],
    ids=["v2", "dash", "no-separator", "string"],
)
def test_a_chunk_key_encoding_this_format_never_uses_is_refused(run_dir: str, encoding: Any) -> None:
    t = torch.randn(8, 2)
    ckpt = moai_ckpt.Checkpointer(run_dir, capture_rng=False)
    ckpt.save(1, {"h": Holder({"t": t})})
    meta_path = Path(run_dir) / snapshot_dir(1) / "h" / "t" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["chunk_key_encoding"] = encoding
    meta_path.write_text(json.dumps(meta))
    into = Holder({"t": torch.zeros(8, 2)})
    with pytest.raises(moai_ckpt.ManifestMismatchError, match="chunk_key_encoding") as info:
        ckpt.restore({"h": into}, step=1)
    assert info.value.key == f"{snapshot_dir(1)}/h/t/zarr.json"
    assert torch.equal(into.tensors["t"], torch.zeros(8, 2))  # nothing loaded
    assert not ckpt.verify(1).ok


def test_chunk_keys_of_both_separators_are_recognised() -> None:
    from moai_ckpt.layout import chunk_key, is_chunk_key

    for separator in ("/", "."):
        assert is_chunk_key(chunk_key(3, "model/w", (2, 0), separator))
        assert is_chunk_key(chunk_key(3, "model/w", (), separator))
    assert chunk_key(3, "model/w", (2, 0), ".") == f"{snapshot_dir(3)}/model/w/c.2.0"
    assert chunk_key(3, "model/w", (2, 0), "/") == f"{snapshot_dir(3)}/model/w/c/2/0"
    assert not is_chunk_key(f"{snapshot_dir(3)}/model/w/zarr.json")
    assert not is_chunk_key(f"{snapshot_dir(3)}/manifest.json")


def test_tied_weights_are_stored_once_and_stay_tied(run_dir: str) -> None:
    from tests.helpers import TinyNet

    model = TinyNet(tied=True)
    assert "embed.weight" in model.state_dict() and "head.weight" in model.state_dict()
    ckpt = moai_ckpt.Checkpointer(run_dir)
    ckpt.save(1, {"model": model})
    manifest = ckpt.manifest(1)
    assert manifest.objects["model"].tree["embed.weight"] == manifest.objects["model"].tree["head.weight"]
    assert len([a for a in manifest.arrays if a.startswith("model/")]) == len(model.state_dict()) - 1

    fresh = TinyNet(tied=True)
    ckpt.restore({"model": fresh})
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, model.embed.weight)

    shared = torch.randn(4, 4)
    holder = Holder({"a": shared, "b": shared, "row": shared[1]})
    ckpt.save(2, {"h": holder})
    back = Holder()
    ckpt.restore({"h": back}, step=2)
    assert back.tensors["a"] is back.tensors["b"]
    assert torch.equal(back.tensors["row"], shared[1])


def test_unserializable_values_are_refused_with_their_key_and_nothing_is_written(run_dir: str) -> None:
    ckpt = moai_ckpt.Checkpointer(run_dir)
    with pytest.raises(moai_ckpt.UnserializableStateError) as info:
        ckpt.save(1, {"extra": {"ok": 1, "callback": lambda x: x}})
    assert "extra.callback" in str(info.value) and "function" in str(info.value)
    assert isinstance(info.value, TypeError)
    assert not os.path.exists(os.path.join(run_dir, "snapshots"))


def test_state_keys_with_path_characters_stay_inside_the_run_directory(run_dir: str, tmp_path) -> None:
    ckpt = moai_ckpt.Checkpointer(run_dir)
    evil = {"../../escape": torch.ones(3), "/abs/path": torch.zeros(2), "we ird\n key": torch.arange(4)}
    ckpt.save(1, {"../../outside": Holder(evil), "a/b": {"x": 1}})
    inside = {os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs}
    assert all(p.startswith("run" + os.sep) for p in inside), inside
    back = Holder()
    target: dict[str, Any] = {"../../outside": back, "a/b": {}}
    ckpt.restore(target)
    assert set(back.tensors) == set(evil)
    assert target["a/b"] == {"x": 1}


def test_format_version_is_recorded(run_dir: str) -> None:
    ckpt = moai_ckpt.Checkpointer(run_dir)
    ckpt.save(1, {"x": {"a": 1}})
    marker = json.loads(Path(run_dir, snapshot_dir(1), "commit.json").read_text())
    group = json.loads(Path(run_dir, snapshot_dir(1), "zarr.json").read_text())
    manifest = json.loads(Path(run_dir, snapshot_dir(1), "manifest.json").read_text())
    assert marker["body"]["format_version"] == moai_ckpt.FORMAT_VERSION
    assert group["attributes"]["moai_ckpt"]["format_version"] == moai_ckpt.FORMAT_VERSION
    assert manifest["format_version"] == moai_ckpt.FORMAT_VERSION


def test_the_first_snapshot_records_the_run_identity(run_dir: str) -> None:
    from moai_ckpt.format import RunInfo

    ckpt = moai_ckpt.Checkpointer(run_dir)
    ckpt.save(1, {"x": {"a": 1}})
    first = RunInfo.model_validate_json(Path(run_dir, "run.json").read_text())
    ckpt.save(2, {"x": {"a": 2}})
    again = RunInfo.model_validate_json(Path(run_dir, "run.json").read_text())
    assert first == again and len(first.run_id) == 32
    assert first.versions["moai_ckpt"] == moai_ckpt.__version__ and "torch" in first.versions
