"""Canonical names: a module's state under the names of the plain model, whatever wraps it.

DDP and ``nn.DataParallel`` hold the model as ``module``, ``torch.compile`` as ``_orig_mod``,
activation checkpointing as ``_checkpoint_wrapped_module`` and FSDP (1) as
``_fsdp_wrapped_module``; each adds its attribute to every name of ``state_dict()``. FSDP2
(``fully_shard``) changes no names. Snapshots store the canonical names (wrapper segments
dropped), so a snapshot restores into the same model wrapped differently or not at all, and
names that a wrapper added in an older snapshot are recognised and mapped the same way.
"""

from __future__ import annotations

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

__all__ = ["WRAPPER_SEGMENTS", "canonical_names", "canonical_state_dict", "live_state_dict", "unwrap"]


def _wrapped_attr(module: torch.nn.Module) -> str | None:
    for cls in type(module).__mro__:
        attr = _WRAPPED_ATTR.get(cls.__name__)
        if attr is not None and isinstance(getattr(module, attr, None), torch.nn.Module):
            return attr
    return None


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The innermost model under top-level wrappers (DDP around a compiled model, and so on)."""
    seen: set[int] = set()
    while id(module) not in seen:
        seen.add(id(module))
        attr = _wrapped_attr(module)
        if attr is None:
            break
        module = getattr(module, attr)
    return module


def canonical_name(module: torch.nn.Module, name: str) -> str:
    """``name`` (a key of ``module.state_dict()``) without the segments wrappers added."""
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
    """Live ``state_dict`` key -> canonical key, for every key (or those in ``names``)."""
    keys = list(module.state_dict().keys()) if names is None else list(names)
    mapping = {key: canonical_name(module, key) for key in keys}
    if len(set(mapping.values())) != len(mapping):
        return {key: key for key in keys}  # a name collision: keep the live names rather than merge two
    return mapping


def canonical_state_dict(module: torch.nn.Module) -> dict[str, Any]:
    """``module.state_dict()`` under canonical names."""
    state = module.state_dict()
    mapping = canonical_names(module, state.keys())
    return {mapping[key]: value for key, value in state.items()}


def legacy_canonical(names: Iterable[str]) -> dict[str, str]:
    """Stored name -> canonical name, for names an older snapshot stored with wrapper segments.

    Segments only wrappers use are dropped everywhere; a leading ``module.`` is dropped when
    every name has it (DDP or DataParallel around the whole model).
    """
    names = list(names)
    out = {n: ".".join(p for p in n.split(".") if p not in WRAPPER_SEGMENTS) for n in names}
    if out and all(v.startswith("module.") for v in out.values()):
        out = {k: v.removeprefix("module.") for k, v in out.items()}
    if len(set(out.values())) != len(out):
        return {n: n for n in names}
    return out


def live_state_dict(module: torch.nn.Module, stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored module state (canonical names, or an older snapshot's wrapped ones) under the
    live module's ``state_dict`` keys, ready for ``load_state_dict``.

    Names with no live counterpart are kept as they are, so ``load_state_dict`` and the checks
    before it report them.
    """
    to_canonical = canonical_names(module)
    live_of = {canonical: live for live, canonical in to_canonical.items()}
    if not set(stored) <= set(live_of):
        mapped = legacy_canonical(stored)
        if set(mapped.values()) <= set(live_of):
            stored = {mapped[k]: v for k, v in stored.items()}
    return {live_of.get(key, key): value for key, value in stored.items()}
