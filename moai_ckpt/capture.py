"""From user state to (manifest objects, tensors) and back into the user's objects.

`capture` turns ``{"model": model, "optim": opt, "extra": {...}}`` into encoded trees plus the
tensors to store. `Restorer` does the reverse in two phases: `Restorer.check` validates every
object against what the snapshot holds (names, shapes, structure) without touching anything, then
`Restorer.apply` loads. A failure in the first phase leaves every user object untouched.
"""

from __future__ import annotations

import contextlib
import copy
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from moai_ckpt import tree
from moai_ckpt.errors import StateMismatchError, UnserializableStateError
from moai_ckpt.format import ObjectRecord
from moai_ckpt.keys import sanitize_segment
from moai_ckpt.wrappers import canonical_names, canonical_state_dict, live_state_dict, stored_to_live

RNG_KEY = "_rng"


class PartialState(ABC):
    """State of which each rank holds some entries: a pipeline stage's parameters, their optimizer state.

    ``state_dict()`` maps entry names that mean the same thing on every rank (a parameter's
    whole-model name) to values (tensors, JSON-able trees). A snapshot stores the union of every
    rank's entries; an entry held by several ranks (data-parallel replicas) is stored once, and a
    DTensor entry is one global array whose regions its owners write. A restore reads, on each
    rank, only the entries that rank's object `holds` (and only the regions `like` says it keeps),
    so the same snapshot restores into another split of the entries over the ranks.
    """

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """This rank's entries."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load exactly the entries `holds` names, as the snapshot stores them."""

    @abstractmethod
    def holds(self) -> list[str]:
        """The entries this rank holds (what a restore reads), even before they have values."""

    def like(self, entry: str) -> torch.Tensor | None:
        """The live tensor whose shape and sharding the entry's tensors mirror (None: read whole)."""
        return None


def merge_partial(trees: list[Any]) -> dict[str, Any]:
    """The union of every rank's encoded entries of one `PartialState` (the lowest rank's copy wins)."""
    merged: dict[str, Any] = {}
    for tree_ in trees:
        if isinstance(tree_, dict):
            for entry, value in tree_.items():
                merged.setdefault(entry, value)
    return merged


def _type_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def kind_of(obj: Any) -> str:
    if isinstance(obj, PartialState):
        return "partial"
    if isinstance(obj, torch.nn.Module):
        return "module"
    if isinstance(obj, torch.optim.Optimizer):
        return "optimizer"
    if isinstance(obj, torch.Generator):
        return "generator"
    if isinstance(obj, (np.random.Generator, np.random.RandomState)):
        return "numpy_rng"
    if isinstance(obj, random.Random):
        return "python_rng"
    if isinstance(obj, torch.Tensor):
        return "tensor"
    if callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
        return "stateful"
    return "json"


def state_of(obj: Any, kind: str) -> Any:
    """The state of ``obj`` (of `kind_of` ``kind``) as it is stored: a module's under canonical names."""
    if kind == "module":
        return canonical_state_dict(obj)
    if kind in ("optimizer", "stateful", "partial"):
        return obj.state_dict()
    if kind == "generator":
        return obj.get_state()
    if kind == "numpy_rng":
        return obj.bit_generator.state if isinstance(obj, np.random.Generator) else obj.get_state(legacy=False)
    if kind == "python_rng":
        return obj.getstate()
    return obj


@dataclass
class Captured:
    """The encoded state of one save, ready to be written."""

    objects: dict[str, ObjectRecord]
    tensors: dict[str, torch.Tensor]  # array path -> tensor (any device, any layout)
    devices: set[str] = field(default_factory=set)


def capture(state: Mapping[str, Any], *, rng: Any | None = None, rng_key: str = RNG_KEY) -> Captured:
    """Encode ``state`` (and the global RNG state under ``rng_key`` if ``rng`` is given)."""
    if not isinstance(state, Mapping):
        raise UnserializableStateError(f"state must be a dict of named objects, got {type(state).__name__}")
    items: list[tuple[str, Any]] = list(state.items())
    reserved = [k for k in state if isinstance(k, str) and (k == RNG_KEY or k.startswith(RNG_KEY + "."))]
    if reserved:
        raise UnserializableStateError(f"state key {reserved[0]!r} is reserved for the RNG state", key=reserved[0])
    if rng is not None:
        items.append((rng_key, rng))
    used: set[str] = set()
    groups: dict[str, str] = {}
    for key, _ in items:
        if not isinstance(key, str) or not key:
            raise UnserializableStateError(f"state keys must be non-empty strings, got {key!r}")
        groups[key] = _unique(sanitize_segment(key), used)

    objects: dict[str, ObjectRecord] = {}
    names: set[str] = set()
    all_tensors: dict[str, torch.Tensor] = {}
    for key, obj in items:
        group = groups[key]

        def name_for(path: str, group: str = group) -> str:
            leaf = sanitize_segment(path.split(".", 1)[1] if "." in path else "value")
            return _unique(f"{group}/{leaf}", names)

        sink = tree.TensorSink(name_for)
        kind = "stateful" if key == rng_key and rng is not None else kind_of(obj)
        encoded = tree.encode(state_of(obj, kind), key, sink)
        objects[key] = ObjectRecord(kind=kind, type=_type_name(obj), tree=encoded)
        all_tensors.update(sink.tensors)
    devices = {t.device.type for t in all_tensors.values()}
    return Captured(objects=objects, tensors=all_tensors, devices=devices)


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate.lower() in used:
        n += 1
        candidate = f"{name}_{n}"
    used.add(candidate.lower())
    return candidate


class Restorer:
    """Two-phase restore of decoded state into live objects."""

    def __init__(
        self, objects: Mapping[str, ObjectRecord], tensors: Mapping[str, torch.Tensor], *, url: str, step: int
    ) -> None:
        self.records = objects
        self.tensors = tensors
        self.url = url
        self.step = step
        self._decoded: dict[str, Any] = {}

    def decoded(self, key: str) -> Any:
        if key not in self._decoded:
            self._decoded[key] = tree.decode(self.records[key].tree, self.tensors)
        return self._decoded[key]

    def _error(self, message: str, key: str) -> StateMismatchError:
        return StateMismatchError(message, url=self.url, step=self.step, key=key)

    def check(self, state: Mapping[str, Any]) -> None:
        """Validate that every requested object fits the snapshot; touches nothing."""
        missing = [k for k in state if k not in self.records]
        if missing:
            raise self._error(
                f"snapshot has no entries {missing}; it holds {sorted(k for k in self.records if k != RNG_KEY)}",
                missing[0],
            )
        for key, obj in state.items():
            record = self.records[key]
            kind = kind_of(obj)
            if kind != record.kind and not (record.kind == "json" and kind == "json"):
                raise self._error(
                    f"snapshot holds a {record.kind} ({record.type}) here, got a {kind} ({_type_name(obj)})",
                    key,
                )
            checkers: dict[str, Callable[[str, Any, Any], None]] = {
                "module": self._check_module,
                "optimizer": self._check_optimizer,
                "tensor": self._check_tensor,
                "partial": self._check_partial,
            }
            checker = checkers.get(kind)
            if checker is not None:
                checker(key, obj, self.decoded(key))

    def _check_module(self, key: str, module: torch.nn.Module, saved: Mapping[str, Any]) -> None:
        """Every stored name has one live counterpart (canonical, or an older snapshot's wrapped
        name), every live entry is stored, and the shapes agree."""
        live = module.state_dict()
        to_live = stored_to_live(module, saved)
        canonical = canonical_names(module, live)
        extra = sorted(name for name, target in to_live.items() if target not in live)
        absent = sorted(canonical[k] for k in set(live) - set(to_live.values()))
        if extra or absent:
            raise self._error(
                f"module parameter names differ: in snapshot only {extra[:5]}, in model only {absent[:5]}",
                key,
            )
        for name, stored in saved.items():
            value = live[to_live[name]]
            if isinstance(value, torch.Tensor) and isinstance(stored, torch.Tensor) and value.shape != stored.shape:
                raise self._error(
                    f"{canonical[to_live[name]]}: shape {tuple(stored.shape)} in snapshot, {tuple(value.shape)} in model",
                    f"{key}.{canonical[to_live[name]]}",
                )

    def _check_optimizer(self, key: str, opt: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
        groups, saved_groups = opt.param_groups, saved.get("param_groups", [])
        if len(groups) != len(saved_groups):
            raise self._error(f"{len(saved_groups)} param groups in snapshot, {len(groups)} in optimizer", key)
        params = [p for g in groups for p in g["params"]]
        for i, (g, sg) in enumerate(zip(groups, saved_groups, strict=True)):
            if len(g["params"]) != len(sg["params"]):
                raise self._error(
                    f"param group {i}: {len(sg['params'])} params in snapshot, {len(g['params'])} in optimizer",
                    key,
                )
        ids = [pid for sg in saved_groups for pid in sg["params"]]
        by_id = dict(zip(ids, params, strict=True))
        for pid, pstate in saved.get("state", {}).items():
            param = by_id.get(pid)
            if param is None:
                raise self._error(f"state for unknown parameter id {pid}", key)
            for name, value in pstate.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise self._error(
                        f"state[{pid}].{name}: shape {tuple(value.shape)} in snapshot, "
                        f"parameter shape {tuple(param.shape)}",
                        key,
                    )

    def _check_partial(self, key: str, obj: PartialState, saved: Mapping[str, Any]) -> None:
        absent = [entry for entry in obj.holds() if entry not in saved]
        if absent:
            raise self._error(
                f"the snapshot holds no entries {absent[:5]}{' ...' if len(absent) > 5 else ''} "
                f"({len(absent)} of the {len(obj.holds())} this rank needs)",
                key,
            )
        for entry in obj.holds():
            live, stored = obj.like(entry), saved[entry]
            if live is not None and isinstance(stored, torch.Tensor) and tuple(live.shape) != tuple(stored.shape):
                raise self._error(
                    f"{entry}: shape {tuple(stored.shape)} in snapshot, {tuple(live.shape)} live", f"{key}.{entry}"
                )

    def _check_tensor(self, key: str, live: torch.Tensor, saved: torch.Tensor) -> None:
        if live.shape != saved.shape:
            raise self._error(f"tensor shape {tuple(saved.shape)} in snapshot, {tuple(live.shape)} live", key)

    def apply(self, state: MutableMapping[str, Any]) -> None:
        """Load every entry. Generic objects are rolled back if a later one fails."""
        backups: list[tuple[Any, Any]] = []
        try:
            for key in list(state):
                obj = state[key]
                kind = kind_of(obj)
                value = self.decoded(key)
                if kind == "stateful":
                    backups.append((obj, copy.deepcopy(obj.state_dict())))
                self._load(state, key, obj, kind, value)
        except Exception:
            for obj, backup in reversed(backups):
                with contextlib.suppress(Exception):  # best effort; the original error matters
                    obj.load_state_dict(backup)
            raise

    def _load(self, state: MutableMapping[str, Any], key: str, obj: Any, kind: str, value: Any) -> None:
        if kind == "module":
            obj.load_state_dict(live_state_dict(obj, value), strict=True)
        elif kind in ("optimizer", "stateful", "partial"):
            obj.load_state_dict(value)
        elif kind == "generator":
            obj.set_state(value)
        elif kind == "numpy_rng":
            if isinstance(obj, np.random.Generator):
                obj.bit_generator.state = value
            else:
                obj.set_state(value)
        elif kind == "python_rng":
            version, internal, gauss = value
            obj.setstate((version, tuple(internal), gauss))
        elif kind == "tensor":
            with torch.no_grad():
                obj.copy_(value)
        elif isinstance(obj, dict) and isinstance(value, dict):
            obj.clear()
            obj.update(value)
        elif isinstance(obj, list) and isinstance(value, list):
            obj[:] = value
        else:
            state[key] = value
