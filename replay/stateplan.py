"""The exact state digest of every step, at a cost on the training thread that does not grow with the state.

`replay.statedigest.capture_state` walks every tracked object on every call: tens of microseconds
of Python per entry (a GPT-2 small state with AdamW has about 600). `StateDigests` walks once,
keeps a plan, and on later steps only checks that the plan still holds, with passes that run at
C speed, then starts the digests of every planned tensor at once (`moai_ckpt.digest_plan`).

What the plan keeps, per tracked object:

- **a module**: its entry names, its encoded tree (a module's state is all tensors) and its
  tensors. It holds while the same module is tracked and every submodule's parameter, buffer and
  child dicts hold the same objects, as many as before.
- **an optimizer**: the same for its ``state``; its param groups' scalars are encoded again every
  step (schedulers change them). It holds while its state maps the same parameters to the same
  dicts of the same tensors, and its groups hold the same parameters.
- **anything else** (a scheduler, the data position, a GradScaler, extras), and a module or an
  optimizer whose state the plan could not reproduce (state dict hooks, extra state, state that
  is not all tensors): walked every step, as `capture_state` does; such objects are small.

Every planned tensor must also still be at its address, of its size (`DigestPlan.holds`). When
anything does not hold, the step is digested from a fresh walk, which becomes the new plan: the
names and digests are those `capture_state` gives, planned or not (the tests compare them).

Planned tensors come in two sets: those only an optimizer's step writes (its parameters and its
state: *late*), and the others (*early*). The early ones are queued first, then ``between`` is
called (the caller marks the point: the next step may not begin before it), then the late ones,
which may still be read while the next step's forward and backward run (`moai_ckpt.run.step`).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from moai_ckpt.capture import kind_of
from moai_ckpt.digest import digest_tensors, local_tensor
from moai_ckpt.digest_plan import DigestPlan
from replay.statedigest import Entries, KnownJson, PendingState, canonical_json, module_state, tracked_state

__all__ = ["StateDigests"]

_GET = dict.get
_PARAMS = operator.itemgetter("params")


@dataclass
class _Structure:
    """What must stay the same for a planned object's entries to stay right (identity and counts)."""

    sized: list[Any] = field(default_factory=list)  # containers whose lengths must not change
    lengths: list[int] = field(default_factory=list)
    owners: list[dict[Any, Any]] = field(default_factory=list)  # owners[i][keys[i]] is held[i]
    keys: list[Any] = field(default_factory=list)
    held: list[Any] = field(default_factory=list)

    def add_dict(self, d: dict[Any, Any]) -> None:
        self.sized.append(d)
        self.lengths.append(len(d))
        for k, v in d.items():
            self.owners.append(d)
            self.keys.append(k)
            self.held.append(v)

    def holds(self) -> bool:
        return list(map(len, self.sized)) == self.lengths and all(
            map(operator.is_, map(_GET, self.owners, self.keys), self.held)
        )


@dataclass
class _Object:
    """One tracked object: planned (``structure`` set) or walked every step."""

    key: str
    obj: Any
    names: list[str]  # its entry names: the key, then one per tensor
    tree: Any = None  # planned: the whole tree (module) or the tree of ``state`` (optimizer)
    tensors: list[torch.Tensor] = field(default_factory=list)
    structure: _Structure | None = None
    params: list[torch.Tensor] = field(default_factory=list)  # optimizer: every group's, in order
    ids: list[list[int]] = field(default_factory=list)  # optimizer: each group's parameter indices
    used_before: frozenset[str] = frozenset()  # walked: the names taken when its walk starts
    text: str = ""  # planned: the canonical JSON of ``tree``

    def __post_init__(self) -> None:
        if self.structure is not None:
            self.text = canonical_json(self.tree)

    def step_tree(self) -> KnownJson | None:
        """A planned object's tree now, its fixed part as JSON text (None: it changed; the plan is rebuilt)."""
        if isinstance(self.obj, torch.optim.Optimizer):
            groups = self.obj.param_groups
            if len(groups) != len(self.ids) or not all(
                map(operator.is_, itertools.chain.from_iterable(map(_PARAMS, groups)), self.params)
            ):
                return None
            tree = _groups_tree(self.key, groups, self.ids)
            return None if tree is None else KnownJson(members={"state": self.text}, rest={"param_groups": tree})
        return KnownJson(text=self.text)


def _groups_tree(key: str, groups: list[dict[str, Any]], ids: list[list[int]]) -> Any | None:
    """The encoded param groups as ``Optimizer.state_dict`` packs them (None: they hold a tensor)."""
    packed = [{**{k: v for k, v in g.items() if k != "params"}, "params": i} for g, i in zip(groups, ids, strict=True)]
    entries = Entries(key, frozenset())
    tree = entries.walk(packed, f"{key}.param_groups")
    return None if entries.names else tree


def _module_plan(key: str, module: torch.nn.Module, used: set[str]) -> _Object | None:
    modules = list(module.modules())
    if any(
        m._state_dict_hooks or m._state_dict_pre_hooks or type(m).get_extra_state is not torch.nn.Module.get_extra_state
        for m in modules
    ):
        return None  # state_dict may give other tensors on every call
    state = module_state(module, keep_vars=True)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    structure = _Structure()
    for m in modules:
        for d in (m._parameters, m._buffers, m._modules):
            structure.add_dict(d)
    entries = Entries(key, used)
    tree = entries.walk(state, key)
    return _Object(key, module, [key, *entries.names], tree, entries.found, structure)


def _optimizer_plan(key: str, opt: torch.optim.Optimizer, used: set[str]) -> _Object | None:
    if opt._optimizer_state_dict_pre_hooks or opt._optimizer_state_dict_post_hooks:
        return None
    state = opt.state_dict()
    inner = list(state["state"].values())
    if not all(isinstance(v, torch.Tensor) and v.layout == torch.strided for s in inner for v in s.values()):
        return None
    ids = [list(g["params"]) for g in state["param_groups"]]
    groups = _groups_tree(key, opt.param_groups, ids)
    if groups is None:
        return None
    structure = _Structure()
    structure.add_dict(opt.state)  # parameter -> its state dict
    for s in opt.state.values():
        structure.add_dict(s)
    structure.sized.extend(opt.param_groups)
    structure.lengths.extend(map(len, opt.param_groups))
    entries = Entries(key, used)
    tree = entries.walk(state["state"], f"{key}.state")
    params = list(itertools.chain.from_iterable(map(_PARAMS, opt.param_groups)))
    return _Object(key, opt, [key, *entries.names], tree, entries.found, structure, params, ids)


def _addresses(tensors: list[torch.Tensor]) -> set[tuple[torch.device, int]]:
    locals_ = map(local_tensor, tensors)
    return {(t.device, t.data_ptr()) for t in locals_ if t.device.type != "meta"}


class StateDigests:
    """Start the exact digests of a tracked state every step, from a plan kept between steps."""

    def __init__(self) -> None:
        self._objects: list[_Object] = []
        self._keys: list[str] = []
        self._early: DigestPlan | None = None
        self._late: DigestPlan | None = None
        self._early_names: list[str] = []
        self._late_names: list[str] = []
        self.rebuilds = 0  # how many times a plan was (re)built: tests and benchmarks read it

    def capture(self, state: Mapping[str, Any], between: Callable[[], None] | None = None) -> PendingState:
        """Start the digests of every entry of ``state``, as `capture_state` does.

        Raises:
            UnserializableStateError: state a snapshot could not hold either.
        """
        step = self._from_plan(state)
        if step is None:
            self._build(state)
            step = self._from_plan(state)
            assert step is not None, "a plan built from this state does not hold for it"
        names, trees, dynamic = step
        assert self._early is not None and self._late is not None
        pending = PendingState(names, digest_tensors(dynamic), trees)
        for local in (local_tensor(t) for _, t in dynamic):
            if local.device.type == "cuda":  # its owner may free it before the queued work reads it
                local.detach().record_stream(torch.cuda.current_stream(local.device))
        pending.planned.append((self._early_names, self._early.start()))
        if between is not None:
            between()
        pending.planned.append((self._late_names, self._late.start()))
        return pending

    def _from_plan(
        self, state: Mapping[str, Any]
    ) -> tuple[list[str], dict[str, Any], list[tuple[str, torch.Tensor]]] | None:
        """(names, trees, tensors of walked objects) from the plan; None when it no longer holds."""
        if self._early is None or self._late is None or list(state) != self._keys:
            return None
        names: list[str] = []
        trees: dict[str, Any] = {}
        dynamic: list[tuple[str, torch.Tensor]] = []
        for planned in self._objects:
            obj = state[planned.key]
            if planned.structure is not None:
                if obj is not planned.obj or not planned.structure.holds():
                    return None
                tree = planned.step_tree()
                if tree is None:
                    return None
            else:
                entries = Entries(planned.key, planned.used_before)
                tree = entries.walk(tracked_state(obj), planned.key)
                if entries.names != planned.names[1:]:
                    return None
                dynamic.extend(zip(entries.names, entries.found, strict=True))
            trees[planned.key] = tree
            names.extend(planned.names)
        if not (self._early.holds() and self._late.holds()):
            return None
        return names, trees, dynamic

    def _build(self, state: Mapping[str, Any]) -> None:
        """Walk ``state`` once (as `capture_state` does) and keep what the walk found as the plan."""
        self.rebuilds += 1
        used = set(state)
        objects: list[_Object] = []
        for key, obj in state.items():
            kind = kind_of(obj)
            planned = None
            if kind == "module":
                planned = _module_plan(key, obj, used)
            elif kind == "optimizer":
                planned = _optimizer_plan(key, obj, used)
            if planned is None:
                before = frozenset(used)
                entries = Entries(key, used)
                entries.walk(tracked_state(obj), key)
                planned = _Object(key, obj, [key, *entries.names], used_before=before)
            objects.append(planned)
        written_by_step = set()  # what only an optimizer's step writes: its parameters and state
        for planned in objects:
            if isinstance(planned.obj, torch.optim.Optimizer) and planned.structure is not None:
                written_by_step |= _addresses(planned.params) | _addresses(planned.tensors)
        early: list[tuple[str, torch.Tensor]] = []
        late: list[tuple[str, torch.Tensor]] = []
        for planned in objects:
            if planned.structure is None:
                continue  # its tensors are digested as found, every step
            for name, tensor in zip(planned.names[1:], planned.tensors, strict=True):
                local = local_tensor(tensor)
                owned = local.device.type != "meta" and (local.device, local.data_ptr()) in written_by_step
                (late if owned else early).append((name, tensor))
        self._objects, self._keys = objects, list(state)
        self._early_names, self._late_names = [n for n, _ in early], [n for n, _ in late]
        self._early = DigestPlan([t for _, t in early])
        self._late = DigestPlan([t for _, t in late])
