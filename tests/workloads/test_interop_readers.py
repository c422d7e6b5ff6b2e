"""A snapshot read without moai-ckpt: TensorStore's zarr3 driver and plain zarr-python, every tensor bitwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
import zarr

from moai_ckpt import Checkpointer
from moai_ckpt.layout import snapshot_dir

ts = pytest.importorskip("tensorstore", reason="the TensorStore reader test needs the tensorstore package")

pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized")

# (torch dtype, zarr data type of the stored words, numpy dtype that gives the values, or None when
# the words are the values). Written out here rather than taken from moai_ckpt.dtypes: this is the
# layout docs/format.md promises to outside readers.
LAYOUT: list[tuple[str, str, Any]] = [
    ("float64", "float64", None),
    ("float32", "float32", None),
    ("float16", "float16", None),
    ("bfloat16", "uint16", ml_dtypes.bfloat16),
    ("int64", "int64", None),
    ("int32", "int32", None),
    ("int16", "int16", None),
    ("int8", "int8", None),
    ("uint8", "uint8", None),
    ("uint16", "uint16", None),
    ("uint32", "uint32", None),
    ("uint64", "uint64", None),
    ("bool", "bool", None),
    ("complex64", "complex64", None),
    ("complex128", "complex128", None),
    ("float8_e4m3fn", "uint8", ml_dtypes.float8_e4m3fn),
    ("float8_e5m2", "uint8", ml_dtypes.float8_e5m2),
    ("float8_e4m3fnuz", "uint8", ml_dtypes.float8_e4m3fnuz),
    ("float8_e5m2fnuz", "uint8", ml_dtypes.float8_e5m2fnuz),
    ("float8_e8m0fnu", "uint8", getattr(ml_dtypes, "float8_e8m0fnu", None)),
]
LAYOUT = [entry for entry in LAYOUT if hasattr(torch, entry[0])]
SHAPES = {"rows": (37, 5), "scalar": (), "empty": (0, 3), "vector": (6,)}
STEP = 12


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random bit patterns (NaNs, infinities, -0.0 and subnormals included); bool as 0/1."""
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    n = int(np.prod(shape)) * dtype.itemsize
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[str, torch.Tensor]]]:
    """A committed snapshot of every dtype in every shape; name -> (array path, the live tensor)."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"{name}_{label}": random_tensor(getattr(torch, name), shape, g)
        for name, _, _ in LAYOUT
        for label, shape in SHAPES.items()
    }
    run = tmp_path_factory.mktemp("readers") / "run"
    with Checkpointer(str(run), chunk_bytes=64) as ckpt:  # several chunks per array, an odd edge chunk
        ckpt.save(STEP, {"t": tensors})
        tree = ckpt.manifest(STEP).objects["t"].tree
    return run / snapshot_dir(STEP), {n: (tree[n]["$tensor"], t) for n, t in tensors.items()}


def cases() -> list[tuple[str, str, Any, str]]:
    return [(name, words, view, label) for name, words, view in LAYOUT for label in SHAPES]


def check_values(words: np.ndarray, view: Any, live: torch.Tensor) -> None:
    """The words reinterpreted by a reader's own dtype give the values torch holds."""
    values = words.view(view).astype(np.float32)
    np.testing.assert_array_equal(values, live.float().numpy())


@pytest.mark.parametrize(("name", "words", "view", "label"), cases())
def test_zarr_python_reads_every_tensor_bitwise(
    snapshot: tuple[Path, dict[str, tuple[str, torch.Tensor]]], name: str, words: str, view: Any, label: str
) -> None:
    root, arrays = snapshot
    path, live = arrays[f"{name}_{label}"]
    group = zarr.open_group(str(root), mode="r")

    array = group[path]

    assert isinstance(array, zarr.Array)
    assert array.dtype == np.dtype(words)
    assert array.attrs["moai_ckpt"]["dtype"] == name
    data = np.asarray(array[...])
    assert data.shape == tuple(live.shape)
    assert data.tobytes() == raw(live)
    if view is not None:
        check_values(data, view, live)


@pytest.mark.parametrize(("name", "words", "view", "label"), cases())
def test_tensorstore_reads_every_tensor_bitwise(
    snapshot: tuple[Path, dict[str, tuple[str, torch.Tensor]]], name: str, words: str, view: Any, label: str
) -> None:
    root, arrays = snapshot
    path, live = arrays[f"{name}_{label}"]

    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / path)}}, read=True).result()

    assert store.dtype.name == words
    data = store.read().result()
    assert data.shape == tuple(live.shape)
    assert data.tobytes() == raw(live)
    if view is not None:
        # TensorStore's own bfloat16 / float8 types read the stored words as the recorded dtype
        native = getattr(ts, name)
        assert native.numpy_dtype == np.dtype(view)
        check_values(data, native.numpy_dtype, live)


def test_both_readers_detect_a_flipped_bit_through_the_chunk_crc32c(
    snapshot: tuple[Path, dict[str, tuple[str, torch.Tensor]]], tmp_path: Path
) -> None:
    root, arrays = snapshot
    path, _ = arrays["bfloat16_rows"]
    copy = tmp_path / "array"
    copy.mkdir()
    (copy / "zarr.json").write_bytes((root / path / "zarr.json").read_bytes())
    for chunk in (root / path).glob("c.*"):
        (copy / chunk.name).write_bytes(chunk.read_bytes())
    first = copy / "c.0.0"
    data = bytearray(first.read_bytes())
    data[3] ^= 0x10
    first.write_bytes(bytes(data))

    with pytest.raises(ValueError, match="checksum"):
        zarr.open_array(str(copy), mode="r")[...]
    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(copy)}}, read=True).result()
    with pytest.raises(ValueError, match="Digest mismatch"):
        store.read().result()
