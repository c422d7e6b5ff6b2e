"""State trees as JSON with tensor references; nothing is pickled.

Encoding keeps what JSON loses: tuples, non-string dict keys, non-finite floats, bytes, numpy
scalars, torch dtypes and devices. Tensors (and numpy arrays) are handed to a `TensorSink`, which
stores each distinct tensor once and returns a reference; identical views of one storage (tied
weights) share one reference and come back as one tensor. Anything else is an error that names
its key path and type.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from moai_ckpt.errors import CorruptSnapshotError, UnserializableStateError

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


#: deepest nesting of an encoded tree: manifests are parsed with a JSON depth limit of 200 levels,
#: and the manifest's own levels (objects, entry, tree) come on top
MAX_DEPTH = 160

#: numpy scalar kinds that round-trip through JSON exactly: bool, integers, floats, strings
_NP_KINDS = frozenset("biufSU")


def encode(value: Any, path: str, sink: TensorSink, depth: int = 0) -> Any:
    """Encode a state value to JSON-able data, sending tensors to ``sink``.

    ``depth`` is the nesting of ``value`` in a tree being encoded (counted towards `MAX_DEPTH`).

    Raises:
        UnserializableStateError: a value that is neither a tensor nor JSON-able, a tensor with no
            data of its own (meta, nested, sparse), or a tree nested deeper than `MAX_DEPTH`.
    """
    return _encode(value, path, sink, depth)


def _encode(value: Any, path: str, sink: TensorSink, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise UnserializableStateError(
            f"value at {path!r} is nested more than {MAX_DEPTH} levels deep (or contains itself)", key=path
        )
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, torch.Tensor):
        return {"$tensor": sink.add(path, _storable(value, path))}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufc":
            raise UnserializableStateError(
                f"numpy array at {path!r} has dtype {value.dtype}, which has no tensor counterpart", key=path
            )
        try:
            tensor = torch.from_numpy(np.ascontiguousarray(value))
        except TypeError as exc:  # e.g. float128: no torch dtype
            raise UnserializableStateError(f"numpy array at {path!r}: {exc}", key=path) from None
        return {"$ndarray": sink.add(path, tensor)}
    if isinstance(value, np.generic):
        item = value.item()
        if value.dtype.kind not in _NP_KINDS or isinstance(item, np.generic):
            raise UnserializableStateError(
                f"numpy scalar at {path!r} of dtype {value.dtype} has no exact JSON form", key=path
            )
        return {"$np": value.dtype.str, "v": _encode(item, path, sink, depth + 1)}
    if isinstance(value, torch.dtype):
        return {"$dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    if isinstance(value, torch.Size):
        return {"$size": list(value)}
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, (tuple, list)):
        inner = depth + 2 if isinstance(value, tuple) else depth + 1
        if all(type(v) is int for v in value):  # fast path: RNG states are long runs of ints
            items = list(value)
        else:
            items = [_encode(v, f"{path}.{i}", sink, inner) for i, v in enumerate(value)]
        return {"$tuple": items} if isinstance(value, tuple) else items
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, f"{path}.{k}", sink, depth + 1) for k, v in value.items()}
        return {
            "$dict": [
                [_encode(k, f"{path}.<key>", sink, depth + 3), _encode(v, f"{path}.{k}", sink, depth + 3)]
                for k, v in value.items()
            ]
        }
    raise UnserializableStateError(
        f"value at {path!r} of type {type(value).__module__}.{type(value).__qualname__} is neither "
        "a tensor nor JSON-able; moai-ckpt never pickles. Convert it (e.g. in state_dict()) to "
        "tensors, numbers, strings, lists and dicts",
        key=path,
    )


def _storable(value: torch.Tensor, path: str) -> torch.Tensor:
    """``value`` detached, or an error naming ``path`` for a tensor whose bytes cannot be stored."""
    if value.is_nested or value.is_sparse or value.layout != torch.strided:
        raise UnserializableStateError(
            f"sparse, nested or non-strided tensor (layout {value.layout}) at {path!r} is not supported", key=path
        )
    if value.device.type == "meta":
        raise UnserializableStateError(
            f"tensor at {path!r} is on the meta device and has no data; materialize it before saving", key=path
        )
    return value.detach()


class _Malformed(Exception):
    """A node of a stored tree that `encode` never writes (turned into a `CorruptSnapshotError`)."""


def decode(
    data: Any,
    tensors: Mapping[str, torch.Tensor],
    path: str = "",
    *,
    url: str | None = None,
    step: int | None = None,
) -> Any:
    """Inverse of `encode`; tensor references resolve through ``tensors`` (shared refs, shared objects).

    Trees come from storage and are untrusted: anything `encode` never writes (a tag with a value
    of the wrong type, a reference to an array that was not read, an unknown dtype, a number too
    large for its numpy type) is refused.

    Raises:
        CorruptSnapshotError: a malformed node (its key names the node's path below ``path``,
            URL and step are ``url`` and ``step``).
    """
    try:
        return _decode(data, tensors, path)
    except _Malformed as exc:
        where, message = exc.args
        raise CorruptSnapshotError(
            f"stored state tree is malformed at {where!r}: {message}", url=url, step=step, key=where or None
        ) from None
    except RecursionError:
        raise CorruptSnapshotError(
            "stored state tree is nested too deeply", url=url, step=step, key=path or None
        ) from None


def _decode(data: Any, tensors: Mapping[str, torch.Tensor], path: str) -> Any:
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [_decode(v, tensors, f"{path}.{i}") for i, v in enumerate(data)]
    if not isinstance(data, dict):
        raise _Malformed(path, f"unexpected JSON value of type {type(data).__name__}")
    if len(data) == 1 or (len(data) == 2 and "$np" in data and "v" in data):
        tag = "$np" if len(data) == 2 else next(iter(data))
        handler = _TAGS.get(tag)
        if handler is not None:
            return handler(data, tensors, path)
    return {k: _decode(v, tensors, f"{path}.{k}") for k, v in data.items()}


def _text(data: dict[str, Any], tag: str, path: str) -> str:
    value = data[tag]
    if not isinstance(value, str):
        raise _Malformed(path, f"{tag} holds a {type(value).__name__}, not a string")
    return value


def _array(data: dict[str, Any], tensors: Mapping[str, torch.Tensor], path: str, tag: str) -> Any:
    name = _text(data, tag, path)
    try:
        return tensors[name]
    except KeyError:
        raise _Malformed(path, f"references array {name!r}, which was not read") from None


def _ndarray(data: dict[str, Any], tensors: Mapping[str, torch.Tensor], path: str) -> Any:
    value = _array(data, tensors, path, "$ndarray")
    try:
        return value.numpy()
    except (TypeError, RuntimeError) as exc:  # bfloat16 or a device tensor: not what encode wrote
        raise _Malformed(path, f"array {data['$ndarray']!r} is not a numpy array: {exc}") from None


def _float(data: dict[str, Any], tensors: Mapping[str, torch.Tensor], path: str) -> float:
    try:
        return float(_text(data, "$float", path))
    except ValueError:
        raise _Malformed(path, f"$float {data['$float']!r} is not a number") from None


def _np_scalar(data: dict[str, Any], tensors: Mapping[str, torch.Tensor], path: str) -> Any:
    try:
        dtype = np.dtype(_text(data, "$np", path))
    except (TypeError, ValueError):
        raise _Malformed(path, f"unknown numpy dtype {data['$np']!r}") from None
    if "v" not in data:
        raise _Malformed(path, "$np without a value")
    value = _decode(data["v"], tensors, f"{path}.v")
    if dtype.kind not in _NP_KINDS or not isinstance(value, (bool, int, float, str, bytes)):
        raise _Malformed(path, f"numpy scalar of dtype {dtype} holding a {type(value).__name__}")
    try:
        return dtype.type(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _Malformed(path, f"{value!r} is no {dtype}: {exc}") from None


def _dtype(data: dict[str, Any], tensors: Mapping[str, torch.Tensor], path: str) -> torch.dtype:
    dtype = getattr(torch, _text(data, "$dtype", path), None)
    if not isinstance(dtype, torch.dtype):
        raise _Malformed(path, f"unknown dtype {data['$dtype']!r}")
    return dtype


def _device(data: dict[str, Any], tensors: Mapping[str, torch.Tensor], path: str) -> torch.device:
    try:
        return torch.device(_text(data, "$device", path))
    except (RuntimeError, ValueError) as exc:
        raise _Malformed(path, f"invalid device {data['$device']!r}: {exc}") from None


def _size(data: dict[str, Any], tensors: Mapping[str, torch.Tensor], path: str) -> torch.Size:
    dims = data["$size"]
    if not isinstance(dims, list) or not all(type(d) is int and 0 <= d < 2**63 for d in dims):
        raise _Malformed(path, "$size is not a list of sizes")
    return torch.Size(dims)


def _bytes(data: dict[str, Any], tensors: Mapping[str, torch.Tensor], path: str) -> bytes:
    try:
        return base64.b64decode(_text(data, "$bytes", path), validate=True)
    except binascii.Error:
        raise _Malformed(path, "$bytes is not base64") from None


def _tuple(data: dict[str, Any], tensors: Mapping[str, torch.Tensor], path: str) -> tuple[Any, ...]:
    items = data["$tuple"]
    if not isinstance(items, list):
        raise _Malformed(path, f"$tuple holds a {type(items).__name__}, not a list")
    return tuple(_decode(v, tensors, f"{path}.{i}") for i, v in enumerate(items))


def _dict(data: dict[str, Any], tensors: Mapping[str, torch.Tensor], path: str) -> dict[Any, Any]:
    pairs = data["$dict"]
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise _Malformed(path, "$dict is not a list of [key, value] pairs")
    out = {}
    for k, v in pairs:
        key = _hashable(_decode(k, tensors, f"{path}.<key>"))
        try:
            hash(key)
        except TypeError:
            raise _Malformed(path, f"a key of type {type(key).__name__} cannot be a dict key") from None
        out[key] = _decode(v, tensors, f"{path}.{key}")
    return out


_TAGS: dict[str, Callable[[dict[str, Any], Mapping[str, torch.Tensor], str], Any]] = {
    "$tensor": lambda data, tensors, path: _array(data, tensors, path, "$tensor"),
    "$ndarray": _ndarray,
    "$float": _float,
    "$np": _np_scalar,
    "$dtype": _dtype,
    "$device": _device,
    "$size": _size,
    "$bytes": _bytes,
    "$tuple": _tuple,
    "$dict": _dict,
}


def _hashable(key: Any) -> Any:
    if isinstance(key, list):
        return tuple(_hashable(k) for k in key)
    return key


def json_depth(value: Any) -> int:
    """Nesting depth of lists, tuples and dicts in ``value`` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Mapping):
            children: Any = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


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
