"""Canonical names: a module's state under the names of the plain model, whatever wraps it.

DDP and ``nn.DataParallel`` hold the model as ``module``, ``torch.compile`` as ``_orig_mod``,
activation checkpointing as ``_checkpoint_wrapped_module`` and FSDP (1) as
``_fsdp_wrapped_module``; each adds its attribute to the names of ``state_dict()`` or
``named_parameters()`` (checkpoint wrappers strip theirs from ``state_dict()`` but not from
``named_parameters()``). FSDP2 (``fully_shard``) changes no names. Wrappers may sit around the
whole model or around any submodule, and inside one another.

Snapshots store the canonical names (wrapper segments dropped), so a snapshot restores into the
same model wrapped differently or not at all. Names that a wrapper added in an older snapshot are
recognised and mapped onto the live model (`stored_to_live`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch

# attribute through which each wrapper holds what it wraps, by the wrapper's class name (no
# imports: torch builds without distributed, and checks that cost nothing when unused)
_WRAPPED_ATTR = {
    "DistributedDataParallel": "module",
    "DataParallel": "module",
    "OptimizedModule": "_orig_mod",
    "CheckpointWrapper": "_checkpoint_wrapped_module",
    "OffloadWrapper": "_checkpoint_wrapped_module",
    "FullyShardedDataParallel": "_fsdp_wrapped_module",
}
#: segments that only wrappers put into names (``module`` is also an ordinary attribute name)
WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})
#: segments a wrapper may have put into a stored name (DDP, DataParallel: ``module``)
_MAYBE_WRAPPER = "module"
# a stored name with more ``module`` segments than this is matched exactly or not at all
_MAX_MODULE_SEGMENTS = 6

__all__ = [
    "WRAPPER_SEGMENTS",
    "canonical_name",
    "canonical_names",
    "canonical_state_dict",
    "legacy_canonical",
    "live_state_dict",
    "stored_to_live",
    "unwrap",
]


def _wrapped_attr(module: torch.nn.Module) -> str | None:
    for cls in type(module).__mro__:
        attr = _WRAPPED_ATTR.get(cls.__name__)
        if attr is not None and isinstance(getattr(module, attr, None), torch.nn.Module):
            return attr
    return None


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model under top-level wrappers (DDP around a compiled model, and so on)."""
    seen: set[int] = set()
    while id(module) not in seen:
        seen.add(id(module))
        attr = _wrapped_attr(module)
        if attr is None:
            break
        module = getattr(module, attr)
    return module


def canonical_name(module: torch.nn.Module, name: str) -> str:
    """``name`` (a key of ``module.state_dict()`` or ``named_parameters()``) without wrapper segments.

    The name is followed through the live module tree, so only segments that really are a
    wrapper's attribute are dropped (a user attribute called ``module`` stays).
    """
    parts = name.split(".")
    kept: list[str] = []
    current: Any = module
    for i, part in enumerate(parts):
        is_module = isinstance(current, torch.nn.Module)
        if is_module and i < len(parts) - 1 and _wrapped_attr(current) == part:
            current = getattr(current, part)
            continue
        kept.append(part)
        current = getattr(current, part, None) if is_module else None
    return ".".join(kept)


def canonical_names(module: torch.nn.Module, names: Iterable[str] | None = None) -> dict[str, str]:
    """Live name -> canonical name, for every ``state_dict`` key (or each of ``names``).

    If two live names would become one (a model that really has both), the live names are kept.
    """
    keys = list(module.state_dict().keys()) if names is None else list(names)
    mapping = {key: canonical_name(module, key) for key in keys}
    if len(set(mapping.values())) != len(mapping):
        return {key: key for key in keys}
    return mapping


def canonical_state_dict(module: torch.nn.Module) -> dict[str, Any]:
    """``module.state_dict()`` under canonical names, in the same order."""
    state = module.state_dict()
    mapping = canonical_names(module, state.keys())
    return {mapping[key]: value for key, value in state.items()}


def _reductions(name: str) -> Iterable[str]:
    """``name`` with wrapper-only segments dropped, then with ever more ``module`` segments dropped."""
    parts = [p for p in name.split(".") if p not in WRAPPER_SEGMENTS]
    yield ".".join(parts)
    spots = [i for i, p in enumerate(parts[:-1]) if p == _MAYBE_WRAPPER]
    if len(spots) > _MAX_MODULE_SEGMENTS:
        return
    for count in range(1, len(spots) + 1):
        for dropped in itertools.combinations(spots, count):
            yield ".".join(p for i, p in enumerate(parts) if i not in dropped)


def legacy_canonical(names: Iterable[str], known: Iterable[str] | None = None) -> dict[str, str]:
    """Stored name -> canonical name, for names an older snapshot stored with wrapper segments.

    With ``known`` (the live model's canonical names), each stored name maps to the known name it
    equals, or else to the one known name it becomes once wrapper segments are dropped
    (``_orig_mod``, ``_checkpoint_wrapped_module``, ``_fsdp_wrapped_module`` anywhere, and as few
    ``module`` segments as needed: DDP or DataParallel around the model or any submodule). A name
    with no such match is kept as it is.

    Without ``known``: wrapper-only segments are dropped everywhere, and a leading ``module.`` when
    every name has it (DDP or DataParallel around the whole model).

    Two stored names never map to one: if they would, every name is kept as it is.
    """
    names = list(names)
    if known is None:
        out = {n: ".".join(p for p in n.split(".") if p not in WRAPPER_SEGMENTS) for n in names}
        if out and all(v.startswith(_MAYBE_WRAPPER + ".") for v in out.values()):
            out = {k: v.removeprefix(_MAYBE_WRAPPER + ".") for k, v in out.items()}
    else:
        targets = set(known)
        out = {}
        for n in names:
            out[n] = n if n in targets else next((r for r in _reductions(n) if r in targets), n)
    if len(set(out.values())) != len(out):
        return {n: n for n in names}
    return out


def stored_to_live(module: torch.nn.Module, stored: Iterable[str]) -> dict[str, str]:
    """Stored name (canonical, or an older snapshot's wrapped one) -> the live ``state_dict`` key.

    Names with no live counterpart map to themselves, so the checks that follow report them.
    """
    to_canonical = canonical_names(module)
    live_of = {canonical: live for live, canonical in to_canonical.items()}
    mapped = legacy_canonical(stored, known=live_of)
    return {name: live_of.get(canonical, name) for name, canonical in mapped.items()}


def live_state_dict(module: torch.nn.Module, stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored module state under the live module's ``state_dict`` keys, for ``load_state_dict``."""
    keys = stored_to_live(module, stored)
    return {keys[name]: value for name, value in stored.items()}
