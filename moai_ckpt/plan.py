"""Capture plans: what a save finds again when the state's structure has not changed.

Capturing a state of a thousand tensors costs tens of milliseconds of Python on the calling
thread: each tensor is named (sanitised, made unique), identified (its storage, for tied
weights), cut into its piece and given its host buffer. Between two saves of a training loop
none of that changes; only the values do. `PlanCache.capture` therefore records, on a full
capture, every tensor's path in the state tree, the name it got, a cheap identity (dtype, shape,
stride, device) and which earlier tensor it shares bytes with; the next capture walks and
encodes the state again (so every scalar, RNG state and JSON part is read anew, and every error
`moai_ckpt.tree.encode` raises still is) but hands each tensor the recorded name, then checks
that the tensors are the same in every respect that shapes the snapshot:

- the same paths in the same order (a new parameter, buffer, param group or optimizer state
  entry, a renamed or removed one, changes them);
- the same dtype, shape, stride, device and layout, and plain tensors (no DTensor, whose piece
  may need a collective);
- the same sharing: two tensors share one stored array exactly when they did before.

Anything else (or any error on the way) takes the full capture, which records a new plan. The
plan also keeps each module's canonical names (`moai_ckpt.wrappers`), looked up again only when
its ``state_dict`` keys change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from moai_ckpt import tree
from moai_ckpt.capture import Captured, capture, state_of
from moai_ckpt.dtypes import stored_dtype
from moai_ckpt.sharding import Piece
from moai_ckpt.wrappers import canonical_names

#: what must be equal for a tensor to stand where the plan's did (besides its path)
Shape = tuple[torch.dtype, torch.Size, tuple[int, ...], torch.device, torch.layout]


class _Miss(Exception):
    """The state differs from the plan's (handled: the full capture runs)."""


@dataclass
class CapturePlan:
    """One full capture's tensors, in the order the encoder met them (shared ones once per path)."""

    paths: list[str]
    refs: list[str]  # the name each path got
    shapes: list[Shape]
    sharing: list[int]  # per path: the first path with the same bytes
    names: list[str]  # the distinct arrays, in order
    pieces: dict[str, Piece]
    devices: dict[str, str]
    device_types: set[str]
    #: per module entry: (its state_dict keys, their canonical names)
    canonical: dict[str, tuple[tuple[str, ...], dict[str, str]]] = field(default_factory=dict)
    #: per entry: its encoded tree of the last capture (the tree the next one follows)
    templates: dict[str, Any] = field(default_factory=dict)
    #: the `HostPool.generation` at which ``buffers`` were the pool's (-1: not known)
    generation: int = -1
    buffers: list[torch.Tensor] = field(default_factory=list)


def _shape(t: torch.Tensor) -> Shape:
    return t.dtype, t.shape, t.stride(), t.device, t.layout


def _sharing(tensors: list[torch.Tensor]) -> list[int]:
    """Per tensor, the index of the first one that views the same bytes the same way."""
    pointers = [t.data_ptr() for t in tensors]
    if len(set(pointers)) == len(pointers):  # the usual case: no two start at the same byte
        return list(range(len(pointers)))
    first: dict[tuple[Any, ...], int] = {}
    return [first.setdefault((t.data_ptr(), t.dtype, t.shape, t.stride(), t.device), i) for i, t in enumerate(tensors)]


class _Recorder(tree.TensorSink):
    """The full capture's sink of one entry, recording every tensor it is handed."""

    def __init__(self, name_for: Callable[[str], str], calls: list[tuple[str, str, torch.Tensor]]) -> None:
        super().__init__(name_for)
        self._calls = calls

    def add(self, path: str, tensor: torch.Tensor) -> str:
        ref = super().add(path, tensor)
        self._calls.append((path, ref, tensor))
        return ref


class _Replayer(tree.TensorSink):
    """A planned capture's sink of one entry: the plan's names, path by path."""

    def __init__(self, plan: CapturePlan, seen: list[torch.Tensor]) -> None:
        super().__init__(lambda path: path)
        self._plan = plan
        self._met = seen

    def add(self, path: str, tensor: torch.Tensor) -> str:
        i = len(self._met)
        if i >= len(self._plan.paths) or self._plan.paths[i] != path:
            raise _Miss
        self._met.append(tensor)
        return self._plan.refs[i]

    def take(self, path: str, tensor: torch.Tensor) -> str:
        """The name of the next tensor, met where the previous capture's tree had one (its
        properties are checked later, for all tensors at once)."""
        i = len(self._met)
        if i >= len(self._plan.refs) or self._plan.paths[i] != path:
            raise _Miss
        self._met.append(tensor.detach())
        return self._plan.refs[i]


def _follow(value: Any, template: Any, path: str, sink: _Replayer, depth: int) -> Any:
    """``tree.encode(value, path, sink, depth)``, walking only keys where ``template`` (the previous
    capture's tree) has the same keys in the same order: tensors there take their recorded name
    without building the paths of their neighbours' errors; the rest is encoded as usual."""
    if isinstance(value, torch.Tensor):
        if type(template) is dict and len(template) == 1 and "$tensor" in template:
            return {"$tensor": sink.take(path, value)}
    elif isinstance(value, dict) and type(template) is dict:
        # a tree of 3+ keys is a plain dict's (tags have 1 or 2, one starting with "$"): its keys
        # are strings without "$", as the value's are when they are the same
        plain = len(template) > 2 or not any(k.startswith("$") for k in template)
        if plain and len(value) == len(template) and list(value) == list(template):
            return {k: _follow(v, template[k], f"{path}.{k}", sink, depth + 1) for k, v in value.items()}
        pairs = template.get("$dict") if len(template) == 1 else None
        if (
            type(pairs) is list
            and len(pairs) == len(value)
            and all(
                type(k) is int and type(pair[0]) is int and k == pair[0] for k, pair in zip(value, pairs, strict=True)
            )
        ):
            return {
                "$dict": [
                    [k, _follow(v, pair[1], f"{path}.{k}", sink, depth + 3)]
                    for (k, v), pair in zip(value.items(), pairs, strict=True)
                ]
            }
    return tree.encode(value, path, sink, depth)


class PlanCache:
    """The plan of the last full capture, and the captures that reuse it."""

    def __init__(self) -> None:
        self.plan: CapturePlan | None = None
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self.plan = None

    def capture(
        self, state: Mapping[str, Any], *, rng: Any | None, rng_key: str
    ) -> tuple[Captured, CapturePlan | None]:
        """``capture(state, ...)``; with the plan it reused or recorded (None: none fits this state)."""
        plan = self.plan
        if plan is not None:
            try:
                captured = self._replay(plan, state, rng, rng_key)
            except Exception:  # noqa: BLE001 - a miss; the full capture below raises any error with its context
                pass
            else:
                self.hits += 1
                return captured, plan
        self.misses += 1
        self.plan = None
        calls: list[tuple[str, str, torch.Tensor]] = []
        canonical: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {}
        captured = capture(
            state,
            rng=rng,
            rng_key=rng_key,
            make_sink=lambda name_for: _Recorder(name_for, calls),
            read=lambda key, obj, kind: _read(key, obj, kind, canonical, None),
        )
        self.plan = _record(captured, calls, canonical)
        return captured, self.plan

    def _replay(self, plan: CapturePlan, state: Mapping[str, Any], rng: Any | None, rng_key: str) -> Captured:
        seen: list[torch.Tensor] = []
        canonical: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {}
        captured = capture(
            state,
            rng=rng,
            rng_key=rng_key,
            make_sink=lambda name_for: _Replayer(plan, seen),
            read=lambda key, obj, kind: _read(key, obj, kind, canonical, plan.canonical),
            encode=lambda value, key, sink: _follow(value, plan.templates.get(key), key, sink, 0),  # type: ignore[arg-type]
        )
        if len(seen) != len(plan.paths) or [_shape(t) for t in seen] != plan.shapes or _sharing(seen) != plan.sharing:
            raise _Miss
        if any(type(t) is not torch.Tensor for t in seen):
            raise _Miss
        firsts = plan.sharing
        captured.tensors = {plan.refs[i]: seen[i] for i in range(len(seen)) if firsts[i] == i}
        captured.devices = set(plan.device_types)
        plan.canonical = canonical
        plan.templates = {key: record.tree for key, record in captured.objects.items()}
        return captured


def _read(
    key: str,
    obj: Any,
    kind: str,
    found: dict[str, tuple[tuple[str, ...], dict[str, str]]],
    known: dict[str, tuple[tuple[str, ...], dict[str, str]]] | None,
) -> Any:
    """The state of one entry; a module's under canonical names, reused from ``known`` while its
    ``state_dict`` keys are the same (``found`` collects them for the plan)."""
    if kind != "module":
        return state_of(obj, kind)
    live = obj.state_dict()
    keys = tuple(live)
    previous = (known or {}).get(key)
    mapping = previous[1] if previous is not None and previous[0] == keys else canonical_names(obj, keys)
    found[key] = (keys, mapping)
    return {mapping[name]: value for name, value in live.items()}


def _record(
    captured: Captured,
    calls: list[tuple[str, str, torch.Tensor]],
    canonical: dict[str, tuple[tuple[str, ...], dict[str, str]]],
) -> CapturePlan | None:
    """The plan of a full capture, or None when its tensors cannot be checked cheaply next time
    (DTensors, empty or meta tensors, sharing the cheap identity does not see the same way)."""
    tensors = [t for _, _, t in calls]
    if any(type(t) is not torch.Tensor or t.numel() == 0 or t.device.type == "meta" for t in tensors):
        return None
    refs = [ref for _, ref, _ in calls]
    sharing = _sharing(tensors)
    if any(refs[i] != refs[first] for i, first in enumerate(sharing)) or len(set(sharing)) != len(captured.tensors):
        return None
    names = list(captured.tensors)
    return CapturePlan(
        paths=[path for path, _, _ in calls],
        refs=refs,
        shapes=[_shape(t) for t in tensors],
        sharing=sharing,
        names=names,
        pieces={
            n: Piece(stored_dtype(t.dtype, key=n).logical, tuple(t.shape), 0, t.shape[0] if t.dim() else 1)
            for n, t in captured.tensors.items()
        },
        devices={n: str(t.device) for n, t in captured.tensors.items()},
        device_types=set(captured.devices),
        canonical=canonical,
        templates={key: record.tree for key, record in captured.objects.items()},
    )
