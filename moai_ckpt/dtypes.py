"""Tensor dtypes and how each is stored in zarr v3.

zarr v3's core data types cover the IEEE floats, integers, bool and complex. bfloat16 and the
float8 variants have no core zarr type (zarr-python 3.1 knows none of them), so they are stored as
raw little-endian words of the same width (``uint16`` / ``uint8``) with the logical dtype recorded
in the array's attributes (``moai_ckpt.dtype``) and in the manifest. Every array therefore opens
with plain zarr; a reader that wants values reinterprets the words (for example with
``ml_dtypes``: ``arr[...].view(ml_dtypes.bfloat16)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moai_ckpt.errors import UnserializableStateError, UnsupportedFormatError


@dataclass(frozen=True)
class StoredDtype:
    """How one torch dtype is laid out on storage."""

    logical: str  # the torch dtype name, e.g. "bfloat16"
    zarr: str  # the zarr v3 data type of the stored words, e.g. "uint16"
    torch_words: torch.dtype  # torch dtype with the zarr layout, used to view the bytes
    itemsize: int

    @property
    def reinterpreted(self) -> bool:
        return self.logical != self.zarr


def _native(t: torch.dtype, zarr_name: str) -> StoredDtype:
    name = str(t).removeprefix("torch.")
    return StoredDtype(name, zarr_name, t, t.itemsize)


def _words(t: torch.dtype, words: torch.dtype, zarr_name: str) -> StoredDtype:
    return StoredDtype(str(t).removeprefix("torch."), zarr_name, words, t.itemsize)


_TABLE: list[StoredDtype] = [
    _native(torch.float64, "float64"),
    _native(torch.float32, "float32"),
    _native(torch.float16, "float16"),
    _native(torch.int64, "int64"),
    _native(torch.int32, "int32"),
    _native(torch.int16, "int16"),
    _native(torch.int8, "int8"),
    _native(torch.uint8, "uint8"),
    _native(torch.bool, "bool"),
    _native(torch.complex64, "complex64"),
    _native(torch.complex128, "complex128"),
    _words(torch.bfloat16, torch.uint16, "uint16"),
]
for _opt in ("uint16", "uint32", "uint64"):
    if hasattr(torch, _opt):
        _TABLE.append(_native(getattr(torch, _opt), _opt))
for _f8 in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"):
    if hasattr(torch, _f8):
        _TABLE.append(_words(getattr(torch, _f8), torch.uint8, "uint8"))

_BY_TORCH: dict[torch.dtype, StoredDtype] = {}
for _entry in _TABLE:
    _BY_TORCH[getattr(torch, _entry.logical)] = _entry
_BY_NAME: dict[str, StoredDtype] = {e.logical: e for e in _TABLE}


def stored_dtype(dtype: torch.dtype, *, key: str | None = None) -> StoredDtype:
    """The storage layout for a torch dtype; raises for dtypes that cannot be stored."""
    try:
        return _BY_TORCH[dtype]
    except KeyError:
        raise UnserializableStateError(f"tensor dtype {dtype} is not supported for snapshots", key=key) from None


def from_name(name: str) -> StoredDtype:
    """The storage layout for a logical dtype name read from a manifest.

    Raises:
        UnsupportedFormatError: the name is no dtype this moai-ckpt and torch build can store
            (a ``ValueError``; readers add the URL, step and key).
    """
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):  # TypeError: an unhashable value where a name belongs
        raise UnsupportedFormatError(
            f"unknown tensor dtype {name!r} (written by a newer torch or moai-ckpt?)"
        ) from None


def is_known(name: object) -> bool:
    return isinstance(name, str) and name in _BY_NAME


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, from_name(name).logical)
    assert isinstance(dtype, torch.dtype)
    return dtype
