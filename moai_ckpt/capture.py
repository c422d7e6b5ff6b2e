"""From user state to (manifest objects, tensors) and back into the user's objects.

`capture` turns ``{"model": model, "optim": opt, "extra": {...}}`` into encoded trees plus the
tensors to store. `Restorer` does the reverse in two phases: `Restorer.check` decodes every entry
and validates it against its live object (names, types, shapes, dtypes, structure) without
touching anything, then `Restorer.apply` loads, first what it can put back should a later load
fail, then the tensors `check` validated entry by entry.
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
from moai_ckpt.errors import CorruptSnapshotError, MoaiCkptError, StateMismatchError, UnserializableStateError
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


SinkFactory = Callable[[Callable[[str], str]], tree.TensorSink]
StateReader = Callable[[str, Any, str], Any]
Encoder = Callable[[Any, str, tree.TensorSink], Any]


def capture(
    state: Mapping[str, Any],
    *,
    rng: Any | None = None,
    rng_key: str = RNG_KEY,
    make_sink: SinkFactory = tree.TensorSink,
    read: StateReader | None = None,
    encode: Encoder = tree.encode,
) -> Captured:
    """Encode ``state`` (and the global RNG state under ``rng_key`` if ``rng`` is given).

    Args:
        make_sink: builds the sink of one entry from its naming function (`moai_ckpt.plan`
            passes one that reuses the names of the previous capture).
        read: ``read(key, obj, kind)``, the state of one entry (default: `state_of`).
        encode: ``encode(value, key, sink)``, the encoded tree of one entry (`moai_ckpt.tree.encode`,
            or one that follows the previous capture's tree).
    """
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

        sink = make_sink(name_for)
        kind = "stateful" if key == rng_key and rng is not None else kind_of(obj)
        value = state_of(obj, kind) if read is None else read(key, obj, kind)
        encoded = encode(value, key, sink)
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
    """Two-phase restore of decoded state into live objects.

    `check` decodes every entry and validates it against its live object without touching
    anything; `apply` then loads, in an order that keeps a failure harmless (see `apply`).
    """

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
            self._decoded[key] = tree.decode(self.records[key].tree, self.tensors, key, url=self.url, step=self.step)
        return self._decoded[key]

    def _error(self, message: str, key: str) -> StateMismatchError:
        return StateMismatchError(message, url=self.url, step=self.step, key=key)

    def _corrupt(self, message: str, key: str) -> CorruptSnapshotError:
        return CorruptSnapshotError(message, url=self.url, step=self.step, key=key)

    def check(self, state: Mapping[str, Any]) -> None:
        """Decode every requested entry and validate it against its live object; touches nothing."""
        missing = [k for k in state if k not in self.records]
        if missing:
            raise self._error(
                f"snapshot has no entries {missing}; it holds {sorted(k for k in self.records if k != RNG_KEY)}",
                missing[0],
            )
        for key in state:  # every entry decodes before any is checked: plain JSON entries too
            self.decoded(key)
        checkers: dict[str, Callable[[str, Any, Any], None]] = {
            "module": self._check_module,
            "optimizer": self._check_optimizer,
            "tensor": self._check_tensor,
            "partial": self._check_partial,
            "generator": self._check_generator,
            "numpy_rng": self._check_numpy_rng,
            "python_rng": self._check_python_rng,
        }
        for key, obj in state.items():
            record = self.records[key]
            kind = kind_of(obj)
            if kind != record.kind and not (record.kind == "json" and kind == "json"):
                raise self._error(
                    f"snapshot holds a {record.kind} ({record.type}) here, got a {kind} ({_type_name(obj)})",
                    key,
                )
            checker = checkers.get(kind)
            if checker is not None:
                checker(key, obj, self.decoded(key))

    def _check_module(self, key: str, module: torch.nn.Module, saved: Any) -> None:
        """Every stored name has one live counterpart (canonical, or an older snapshot's wrapped
        name), every live entry is stored, and shapes and dtypes agree."""
        if not isinstance(saved, Mapping):
            raise self._corrupt(f"module state is a {type(saved).__name__}, not a mapping", key)
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
            if isinstance(value, torch.Tensor):
                self._check_tensor(f"{key}.{canonical[to_live[name]]}", value, stored)

    def _check_optimizer(self, key: str, opt: torch.optim.Optimizer, saved: Any) -> None:
        record_type = self.records[key].type
        if record_type not in _optimizer_types(opt):
            raise self._error(f"snapshot holds the state of a {record_type}, the optimizer is a {_type_name(opt)}", key)
        if not (
            isinstance(saved, Mapping)
            and isinstance(saved.get("state"), Mapping)
            and isinstance(saved.get("param_groups"), list)
            and all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in saved["param_groups"])
        ):
            raise self._corrupt("optimizer state is not a state dict (state, param_groups with params)", key)
        groups, saved_groups = opt.param_groups, saved["param_groups"]
        if len(groups) != len(saved_groups):
            raise self._error(f"{len(saved_groups)} param groups in snapshot, {len(groups)} in optimizer", key)
        for i, (g, sg) in enumerate(zip(groups, saved_groups, strict=True)):
            if len(g["params"]) != len(sg["params"]):
                raise self._error(
                    f"param group {i}: {len(sg['params'])} params in snapshot, {len(g['params'])} in optimizer",
                    key,
                )
            self._check_group(key, i, g, sg)
        ids = [pid for sg in saved_groups for pid in sg["params"]]
        if not all(type(pid) is int for pid in ids) or len(set(ids)) != len(ids):
            raise self._corrupt("optimizer param ids are not distinct integers", key)
        by_id = dict(zip(ids, [p for g in groups for p in g["params"]], strict=True))
        for pid, pstate in saved["state"].items():
            param = by_id.get(pid)
            if param is None:
                raise self._error(f"state for unknown parameter id {pid}", key)
            if not isinstance(pstate, Mapping):
                raise self._corrupt(f"state[{pid}] is a {type(pstate).__name__}, not a mapping", key)
            for name, value in pstate.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise self._error(
                        f"state[{pid}].{name}: shape {tuple(value.shape)} in snapshot, "
                        f"parameter shape {tuple(param.shape)}",
                        key,
                    )

    def _check_group(self, key: str, index: int, live: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
        """Every hyperparameter the optimizer has is in the snapshot's group, with a value of its kind."""
        for name, value in live.items():
            if name in ("params", "param_names"):
                continue
            if name not in saved:
                raise self._error(f"param group {index} in the snapshot has no {name!r}", key)
            if not _same_kind(value, saved[name]):
                raise self._error(
                    f"param group {index}: {name!r} is {_describe(saved[name])} in the snapshot, "
                    f"{_describe(value)} in the optimizer",
                    key,
                )

    def _check_partial(self, key: str, obj: PartialState, saved: Any) -> None:
        if not isinstance(saved, Mapping):
            raise self._corrupt(f"partial state is a {type(saved).__name__}, not a mapping", key)
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

    def _check_tensor(self, key: str, live: torch.Tensor, saved: Any) -> None:
        if not isinstance(saved, torch.Tensor):
            raise self._error(f"snapshot holds {_describe(saved)} where the live object has a tensor", key)
        if live.shape != saved.shape:
            raise self._error(f"shape {tuple(saved.shape)} in snapshot, {tuple(live.shape)} live", key)
        if live.dtype != saved.dtype:
            raise self._error(f"dtype {saved.dtype} in snapshot, {live.dtype} live", key)

    def _check_generator(self, key: str, gen: torch.Generator, saved: Any) -> None:
        self._dry_run(key, saved, lambda: torch.Generator(device=gen.device).set_state(saved))

    def _check_numpy_rng(self, key: str, rng: Any, saved: Any) -> None:
        if isinstance(rng, np.random.Generator):
            spare = type(rng.bit_generator)()
            self._dry_run(key, saved, lambda: setattr(spare, "state", saved))
        else:
            self._dry_run(key, saved, lambda: np.random.RandomState().set_state(saved))

    def _check_python_rng(self, key: str, rng: random.Random, saved: Any) -> None:
        def load() -> None:
            version, internal, gauss = saved
            random.Random().setstate((version, tuple(internal), gauss))

        self._dry_run(key, saved, load)

    def _dry_run(self, key: str, saved: Any, load: Callable[[], object]) -> None:
        """Load ``saved`` into a spare generator of the same kind: the live one must not fail half-way."""
        try:
            load()
        except Exception as exc:  # noqa: BLE001 - any failure of a spare object means the state is unusable
            raise self._corrupt(f"stored generator state does not load ({type(exc).__name__}: {exc})", key) from None

    def apply(self, state: MutableMapping[str, Any]) -> None:
        """Load every entry, in an order that keeps a failure harmless.

        First what can be put back cheaply (plain values, generators, stateful objects,
        optimizers), then partial objects, tensors and modules, which `check` has validated entry
        by entry (putting them back would take a copy of their tensors). If a load fails, the
        objects of the first group are put back and the error names the entry.
        """
        undo: list[Callable[[], object] | None] = []
        order = sorted(state, key=lambda k: _APPLY_ORDER.get(kind_of(state[k]), 0))
        loaded: list[str] = []
        try:
            for key in order:
                obj = state[key]
                kind = kind_of(obj)
                undo.append(_undo(state, key, obj, kind))
                self._load(state, key, obj, kind, self.decoded(key))
                loaded.append(key)
        except Exception as exc:
            for put_back in reversed(undo):
                with contextlib.suppress(Exception):  # best effort; the original error matters
                    if put_back is not None:
                        put_back()
            if isinstance(exc, MoaiCkptError):
                raise
            kept = [k for k, u in zip(loaded, undo, strict=False) if u is None]
            raise self._error(
                f"loading failed ({type(exc).__name__}: {exc}); the entries loaded before it were put back"
                + (f", except {kept}, which were loaded already" if kept else ""),
                key,
            ) from exc

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


#: what `Restorer.apply` loads first: objects that can be put back, then validated tensors
_APPLY_ORDER = {"stateful": 1, "optimizer": 2, "partial": 3, "tensor": 4, "module": 4}


def _undo(state: MutableMapping[str, Any], key: str, obj: Any, kind: str) -> Callable[[], object] | None:
    """How to put ``obj`` back as it is now, should a later load fail (None: it cannot be, cheaply)."""
    if kind == "optimizer":
        # load_state_dict builds a new state and new groups; the old ones stay as they are
        state_before, groups_before = obj.state, obj.param_groups

        def put_back_optimizer() -> None:
            obj.state, obj.param_groups = state_before, groups_before

        return put_back_optimizer
    if kind == "stateful":
        backup = copy.deepcopy(obj.state_dict())
        return lambda: obj.load_state_dict(backup)
    if kind == "generator":
        saved = obj.get_state()
        return lambda: obj.set_state(saved)
    if kind == "numpy_rng" and isinstance(obj, np.random.Generator):
        bit_state = obj.bit_generator.state
        return lambda: setattr(obj.bit_generator, "state", bit_state)
    if kind == "numpy_rng":
        legacy = obj.get_state(legacy=False)
        return lambda: obj.set_state(legacy)
    if kind == "python_rng":
        internal = obj.getstate()
        return lambda: obj.setstate(internal)
    if kind == "json" and isinstance(obj, dict):
        items = dict(obj)

        def put_back_dict() -> None:
            obj.clear()
            obj.update(items)

        return put_back_dict
    if kind == "json" and isinstance(obj, list):
        values = list(obj)
        return lambda: obj.__setitem__(slice(None), values)
    if kind == "json":
        return lambda: state.__setitem__(key, obj)
    return None  # partial objects, tensors, modules: validated by `check`, loaded last


def _optimizer_types(opt: Any) -> set[str]:
    """The type names of an optimizer and of the optimizers it wraps (accelerate, lightning)."""
    names: set[str] = set()
    for _ in range(8):
        names.add(_type_name(opt))
        inner = getattr(opt, "optimizer", None) or getattr(opt, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is opt:
            break
        opt = inner
    return names


def _same_kind(live: Any, saved: Any) -> bool:
    """Whether a stored hyperparameter can stand where the live one is (numbers for numbers...)."""
    if live is None or saved is None:
        return True
    if isinstance(live, bool) or isinstance(saved, bool):
        return isinstance(live, bool) and isinstance(saved, bool)
    if isinstance(live, (int, float)) or (isinstance(live, torch.Tensor) and live.numel() == 1):
        return isinstance(saved, (int, float)) or (isinstance(saved, torch.Tensor) and saved.numel() == 1)
    if isinstance(live, torch.Tensor):
        return isinstance(saved, torch.Tensor) and saved.shape == live.shape
    if isinstance(live, (tuple, list)):
        return (
            isinstance(saved, (tuple, list))
            and len(saved) == len(live)
            and all(_same_kind(a, b) for a, b in zip(live, saved, strict=True))
        )
    if isinstance(live, str):
        return isinstance(saved, str)
    return True


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
