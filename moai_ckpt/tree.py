"""State trees as JSON with tensor references; nothing is pickled.

Encoding keeps what JSON loses: tuples, non-string dict keys, non-finite floats, bytes, numpy
scalars, torch dtypes and devices. Tensors (and numpy arrays) are handed to a `TensorSink`, which
stores each distinct tensor once and returns a reference; identical views of one storage (tied
weights) share one reference and come back as one tensor. Anything else is an error that names
its key path and type.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from moai_ckpt.errors import UnserializableStateError

TensorRef = dict[str, str]


class TensorSink:
    """Collects the tensors of a state tree, deduplicating identical views."""

    def __init__(self, name_for: Callable[[str], str]) -> None:
        self._name_for = name_for
        self.tensors: dict[str, torch.Tensor] = {}
        self._seen: dict[tuple[Any, ...], str] = {}

    def add(self, path: str, tensor: torch.Tensor) -> str:
        identity = _view_identity(tensor)
        if identity is not None and identity in self._seen:
            return self._seen[identity]
        name = self._name_for(path)
        self.tensors[name] = tensor
        if identity is not None:
            self._seen[identity] = name
        return name


def _view_identity(t: torch.Tensor) -> tuple[Any, ...] | None:
    if t.numel() == 0 or t.device.type == "meta":
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return (ptr, str(t.device), t.dtype, t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def encode(value: Any, path: str, sink: TensorSink) -> Any:
    """Encode a state value to JSON-able data, sending tensors to ``sink``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, torch.Tensor):
        if value.is_sparse or value.layout != torch.strided:
            raise UnserializableStateError(
                f"sparse or non-strided tensor (layout {value.layout}) at {path!r} is not supported",
                key=path,
            )
        return {"$tensor": sink.add(path, value.detach())}
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise UnserializableStateError(f"numpy object array at {path!r}", key=path)
        return {"$ndarray": sink.add(path, torch.from_numpy(np.ascontiguousarray(value)))}
    if isinstance(value, np.generic):
        return {"$np": value.dtype.str, "v": encode(value.item(), path, sink)}
    if isinstance(value, torch.dtype):
        return {"$dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    if isinstance(value, torch.Size):
        return {"$size": list(value)}
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, (tuple, list)):
        if all(type(v) is int for v in value):  # fast path: RNG states are long runs of ints
            items = list(value)
        else:
            items = [encode(v, f"{path}.{i}", sink) for i, v in enumerate(value)]
        return {"$tuple": items} if isinstance(value, tuple) else items
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: encode(v, f"{path}.{k}", sink) for k, v in value.items()}
        return {"$dict": [[encode(k, f"{path}.<key>", sink), encode(v, f"{path}.{k}", sink)] for k, v in value.items()]}
    raise UnserializableStateError(
        f"value at {path!r} of type {type(value).__module__}.{type(value).__qualname__} is neither "
        "a tensor nor JSON-able; moai-ckpt never pickles. Convert it (e.g. in state_dict()) to "
        "tensors, numbers, strings, lists and dicts",
        key=path,
    )


def decode(data: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of `encode`; tensor references resolve through ``tensors`` (shared refs, shared objects)."""
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [decode(v, tensors) for v in data]
    if not isinstance(data, dict):
        raise ValueError(f"unexpected JSON value of type {type(data).__name__}")
    if len(data) == 1 or (len(data) == 2 and "$np" in data):
        tag = next(iter(data))
        if tag == "$tensor":
            return tensors[data[tag]]
        if tag == "$ndarray":
            return tensors[data[tag]].numpy()
        if tag == "$float":
            return float(data[tag])
        if tag == "$np":
            return np.dtype(data["$np"]).type(decode(data["v"], tensors))
        if tag == "$dtype":
            dtype = getattr(torch, data[tag])
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {data[tag]!r}")
            return dtype
        if tag == "$device":
            return torch.device(data[tag])
        if tag == "$size":
            return torch.Size(data[tag])
        if tag == "$bytes":
            return base64.b64decode(data[tag])
        if tag == "$tuple":
            return tuple(decode(v, tensors) for v in data[tag])
        if tag == "$dict":
            return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in data[tag]}
    return {k: decode(v, tensors) for k, v in data.items()}


def _hashable(key: Any) -> Any:
    if isinstance(key, list):
        return tuple(_hashable(k) for k in key)
    return key


def tensor_refs(data: Any) -> set[str]:
    """All array names referenced by an encoded tree."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for tag in ("$tensor", "$ndarray"):
                if tag in node and isinstance(node[tag], str):
                    found.add(node[tag])
                    return
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(data)
    return found
