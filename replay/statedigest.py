"""The exact digest of a run's complete tracked state after a step, one entry per tensor.

Every entry of what a snapshot holds gets a digest: each tensor (a module's parameters and
buffers, optimizer state, any tensor inside a tracked object's state) by `moai_ckpt.digest`,
where it lives, and each tracked object's non-tensor state (a scheduler's counters, the data
position, param groups, JSON extras) by the crc32c of its canonical JSON encoding
(`moai_ckpt.tree`, tensors by their entry names). Entry names are readable and canonical:
``model/b2.running_var`` (wrapper prefixes dropped), ``optim/state.3.exp_avg``, ``sched``,
``_data``.

The training thread starts the digests at step end: `capture_state` walks the whole state each
time (the reference, and what a plan is built from); a run keeps a plan between steps instead
(`replay.stateplan.StateDigests`), with the same names and digests. CPU tensors are hashed at
once, device tensors reduced on their stream and read back without a wait, and the JSON trees
are only built; hashing them and reading the device results is the recorder thread's part
(`PendingState.wait`, or `PendingState.packed` straight into the log's blob). Each rank digests
what it holds (a DTensor its local shard).

In the log, a rank's digests are one compact binary blob (`pack`, `unpack`) and the entry
names are stored once per log (`names_blob`, `names_of`).
"""

from __future__ import annotations

import json
import struct
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import crc32c as _crc32c
import torch

from moai_ckpt.capture import kind_of, state_of
from moai_ckpt.digest import PendingDigests, digest_tensors, local_tensor
from moai_ckpt.digest_plan import PlannedDigests, packed_digest
from moai_ckpt.tree import TensorSink, encode
from moai_ckpt.wrappers import canonical_names

__all__ = [
    "Entries",
    "KnownJson",
    "PendingState",
    "canonical_json",
    "capture_state",
    "json_digest",
    "module_state",
    "names_blob",
    "names_of",
    "pack",
    "tracked_state",
    "unpack",
]

# a module's live state_dict keys -> canonical names, recomputed only when the keys change
_CANONICAL: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple[str, ...], dict[str, str]]] = (
    weakref.WeakKeyDictionary()
)


@dataclass
class PendingState:
    """A step's state digests on their way: tensor digests in flight, JSON trees to hash."""

    names: list[str]
    tensors: PendingDigests
    trees: dict[str, Any]  # entry name -> the object's encoded non-tensor state
    planned: list[tuple[list[str], PlannedDigests]] = field(default_factory=list)  # a plan's entries, in order

    def wait(self) -> list[str]:
        """Every entry's digest, in the order of `names` (waits for the device copies only)."""
        done = self.tensors.wait()
        for names, pending in self.planned:
            done.update(zip(names, pending.wait(), strict=True))
        out = []
        for name in self.names:
            tree = self.trees.get(name)
            out.append(done[name] if tree is None else json_digest(tree))
        return out

    def packed(self) -> bytes:
        """``pack(self.wait())``, built from the plan's results without formatting and parsing every digest."""
        parts = {name: _packed_one(digest) for name, digest in self.tensors.wait().items()}
        for names, planned in self.planned:
            parts.update(zip(names, planned.packed(), strict=True))
        out = []
        for name in self.names:
            tree = self.trees.get(name)
            out.append(parts[name] if tree is None else _packed_one(json_digest(tree)))
        return b"".join(out)


@dataclass(frozen=True)
class KnownJson:
    """An encoded tree whose canonical JSON is partly known already (a plan keeps it between steps).

    Either the text of the whole tree, or that of some members of a mapping (``members``) with
    the other members still encoded (``rest``).
    """

    text: str | None = None
    members: dict[str, str] = field(default_factory=dict)
    rest: dict[str, Any] = field(default_factory=dict)

    def json(self) -> str:
        """The tree's canonical JSON, as `canonical_json` of the whole tree gives it."""
        if self.text is not None:
            return self.text
        keys = sorted(self.members.keys() | self.rest.keys())
        items = (
            json.dumps(k) + ":" + (self.members[k] if k in self.members else canonical_json(self.rest[k])) for k in keys
        )
        return "{" + ",".join(items) + "}"


def canonical_json(tree: Any) -> str:
    """An encoded tree as the JSON its digest hashes: sorted keys, no spaces."""
    return json.dumps(tree, sort_keys=True, separators=(",", ":"))


def json_digest(tree: Any) -> str:
    """The digest of an object's encoded non-tensor state: crc32c of its canonical JSON."""
    data = (tree.json() if isinstance(tree, KnownJson) else canonical_json(tree)).encode()
    return f"crc32c:{len(data):x}:{_crc32c.crc32c(data):08x}"


class Entries(TensorSink):
    """The tensors of one tracked object, each named ``<key>/<path below the key>``, once.

    Identical views (tied weights) are one entry; names are unique within one capture. The walk
    handles tensors and dicts itself (the bulk of any state) and leaves every other value to
    `moai_ckpt.tree.encode`, so non-tensor state is encoded as a snapshot encodes it.
    """

    def __init__(self, key: str, used: set[str] | frozenset[str]) -> None:
        super().__init__(lambda path: path)
        self.key = key
        self.used = used  # a frozenset is copied at the first name added
        self.names: list[str] = []
        self.found: list[torch.Tensor] = []
        self._ids: dict[tuple[Any, ...], str] = {}

    def add(self, path: str, tensor: torch.Tensor) -> str:
        local = local_tensor(tensor)
        identity = None
        pointer = local.data_ptr()  # 0 for a tensor without bytes (empty, meta): never shared
        if pointer:
            identity = (pointer, local.dtype, local.shape, local.stride())
            if identity in self._ids:
                return self._ids[identity]
        below = path[len(self.key) + 1 :] if path.startswith(self.key + ".") else "value"
        name, n = f"{self.key}/{below}", 1
        while name in self.used:
            n += 1
            name = f"{self.key}/{below}#{n}"
        if isinstance(self.used, frozenset):
            self.used = set(self.used)
        self.used.add(name)
        self.names.append(name)
        self.found.append(tensor)
        if identity is not None:
            self._ids[identity] = name
        return name

    def walk(self, value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor) and value.layout == torch.strided:
            return {"$tensor": self.add(path, value)}
        if isinstance(value, Mapping):
            if all(isinstance(k, str) and not k.startswith("$") for k in value):
                return {k: self.walk(v, f"{path}.{k}") for k, v in value.items()}
            return {
                "$dict": [[encode(k, f"{path}.<key>", self), self.walk(v, f"{path}.{k}")] for k, v in value.items()]
            }
        return encode(value, path, self)


def module_state(module: torch.nn.Module, *, keep_vars: bool = False) -> dict[str, Any]:
    """``module.state_dict(keep_vars=...)`` under canonical names (the mapping cached per module)."""
    state = module.state_dict(keep_vars=keep_vars)
    keys = tuple(state)
    cached = _CANONICAL.get(module)
    if cached is None or cached[0] != keys:
        cached = (keys, canonical_names(module, keys))
        _CANONICAL[module] = cached
    mapping = cached[1]
    return {mapping[k]: v for k, v in state.items()}


def _scaler_state(scaler: torch.amp.GradScaler) -> dict[str, Any]:
    """A GradScaler's state with its scale and growth tracker as tensors.

    ``state_dict()`` reads them with ``.item()``, which waits for a CUDA device.
    """
    if not scaler.is_enabled():
        return {}
    scale = getattr(scaler, "_scale", None)
    tracker = getattr(scaler, "_growth_tracker", None)
    return {
        "scale": scale if scale is not None else scaler._init_scale,
        "growth_factor": scaler._growth_factor,
        "backoff_factor": scaler._backoff_factor,
        "growth_interval": scaler._growth_interval,
        "_growth_tracker": tracker if tracker is not None else scaler._init_growth_tracker,
    }


def tracked_state(obj: Any) -> Any:
    """What the digest walks of a tracked object (a module's state under canonical names)."""
    if isinstance(obj, torch.amp.GradScaler):
        return _scaler_state(obj)
    if isinstance(obj, torch.nn.Module):
        return module_state(obj)
    return state_of(obj, kind_of(obj))


def capture_state(state: Mapping[str, Any]) -> PendingState:
    """Start the digests of every entry of ``state`` (the tracked objects, by key).

    Entries of one object: ``<key>`` (its non-tensor state) then ``<key>/<path>`` for each
    distinct tensor (identical views, such as tied weights, once). Raises
    `UnserializableStateError` for state a snapshot could not hold either.
    """
    used = set(state)
    names: list[str] = []
    trees: dict[str, Any] = {}
    tensors: list[tuple[str, torch.Tensor]] = []
    for key, obj in state.items():
        entries = Entries(key, used)
        trees[key] = entries.walk(tracked_state(obj), key)
        names.append(key)
        names.extend(entries.names)
        tensors.extend(zip(entries.names, entries.found, strict=True))
    return PendingState(names, digest_tensors(tensors), trees)


# -- in the log ---------------------------------------------------------------------------------

_META, _CRC, _SUM = 0, 1, 2
_U32, _U64x2 = struct.Struct("<I"), struct.Struct("<QQ")  # the layout of `packed_digest`


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    n, shift = 0, 0
    while True:
        if offset >= len(data) or shift > 63:
            raise ValueError(f"state digests cut short at byte {offset}")
        byte = data[offset]
        n |= (byte & 0x7F) << shift
        offset += 1
        if byte < 0x80:
            return n, offset
        shift += 7


def pack(digests: list[str]) -> bytes:
    """A rank's digests as one blob: per entry a tag byte, then its fields.

    ``0``: no bytes (a meta tensor); ``1``: byte length (LEB128), crc32c (u32 LE); ``2``: byte
    length (LEB128), plain word sum and the sum of the words mixed with their positions (u64 LE each).
    The layout is `moai_ckpt.digest_plan.packed_digest`'s, which builds entries without strings.
    """
    return b"".join(map(_packed_one, digests))


def _packed_one(digest: str) -> bytes:
    kind, _, rest = digest.partition(":")
    if kind == "meta":
        return packed_digest(None)
    if kind == "crc32c":
        length, crc = rest.split(":")
        return packed_digest(int(length, 16), int(crc, 16))
    if kind == "mix64":
        length, plain, weighted = rest.split(":")
        return packed_digest(int(length, 16), int(plain, 16), int(weighted, 16))
    raise ValueError(f"unknown digest {digest!r}")


def unpack(data: bytes) -> list[str]:
    """The digests of `pack` back as strings; raises ValueError on a malformed blob."""
    out = []
    offset = 0
    while offset < len(data):
        tag = data[offset]
        if tag == _META:
            out.append("meta")
            offset += 1
            continue
        if tag not in (_CRC, _SUM):
            raise ValueError(f"unknown digest tag {tag} at byte {offset}")
        length, offset = _read_varint(data, offset + 1)
        fields = _U32 if tag == _CRC else _U64x2
        if offset + fields.size > len(data):
            raise ValueError(f"state digests cut short at byte {offset}")
        if tag == _CRC:
            (crc,) = _U32.unpack_from(data, offset)
            out.append(f"crc32c:{length:x}:{crc:08x}")
        else:
            plain, weighted = _U64x2.unpack_from(data, offset)
            out.append(f"mix64:{length:x}:{plain:016x}:{weighted:016x}")
        offset += fields.size
    return out


def names_blob(per_rank: list[list[str]]) -> bytes:
    """Every rank's entry names as JSON: a list per rank, or the index of an earlier rank with the same."""
    out: list[list[str] | int] = []
    for names in per_rank:
        same = next((i for i, earlier in enumerate(per_rank[: len(out)]) if earlier == names), None)
        out.append(names if same is None else same)
    return json.dumps(out).encode()


def names_of(data: bytes) -> list[list[str]]:
    """Every rank's entry names from `names_blob`; raises ValueError on anything else."""
    raw = json.loads(data)
    if not isinstance(raw, list):
        raise ValueError("state names are not a list")
    out: list[list[str]] = []
    for i, item in enumerate(raw):
        if isinstance(item, int) and 0 <= item < i:
            out.append(out[item])
        elif isinstance(item, list) and all(isinstance(n, str) for n in item):
            out.append(item)
        else:
            raise ValueError(f"state names of rank {i} are malformed")
    return out
