"""What a step reads and produces, captured cheaply at its boundaries.

At step start: every RNG's state, as raw bytes per generator (`rng_components`), and the scalar
hyperparameters in force (`Hyperparameters`). At step end: the loss, the grad norm and the L2
norm of every parameter, gathered into one small tensor with a single device-to-host copy that
does not wait for the device (`StepValues`). Nothing here pickles: RNG states are raw words.
"""

from __future__ import annotations

import random
import struct
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from moai_ckpt.errors import CorruptLogError
from moai_ckpt.rng import _REGISTERED
from moai_ckpt.wrappers import canonical_names

_NUMPY_TAIL = struct.Struct("<iid")  # pos, has_gauss, cached_gaussian
_PY_HEAD = struct.Struct("<I?d")  # version, has gauss_next, gauss_next


def rng_components() -> dict[str, bytes]:
    """Every process-wide RNG state now, one entry per generator, as bytes.

    Keys: ``torch_cpu``, ``cuda:<i>`` (each initialised CUDA device), ``numpy`` (the legacy
    global generator), ``python`` (``random``), ``gen:<name>`` (`moai_ckpt.register_generator`).
    """
    out = {"torch_cpu": torch.get_rng_state().numpy().tobytes()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            out[f"cuda:{i}"] = torch.cuda.get_rng_state(i).numpy().tobytes()
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    out["numpy"] = np.asarray(keys, dtype="<u4").tobytes() + _NUMPY_TAIL.pack(pos, has_gauss, cached)
    version, internal, gauss = random.getstate()
    out["python"] = _PY_HEAD.pack(version, gauss is not None, gauss or 0.0) + array("I", internal).tobytes()
    for name, gen in sorted(_REGISTERED.items()):
        out[f"gen:{name}"] = gen.get_state().numpy().tobytes()
    return out


def load_rng_components(states: Mapping[str, bytes]) -> list[str]:
    """Set every generator named in ``states``; returns the names this process cannot set.

    The states come from the log, which is untrusted: each is checked (its size, and a load into
    a spare generator) before any generator is set, so a forged state changes none of them.

    Raises:
        CorruptLogError: a state has the wrong size or does not load.
    """
    skipped: list[str] = []
    setters: list[Callable[[], object]] = []
    for name, data in states.items():
        setter = _rng_setter(name, data)
        if setter is None:
            skipped.append(name)
        else:
            setters.append(setter)
    for setter in setters:
        setter()
    return skipped


_NUMPY_BYTES = 624 * 4 + _NUMPY_TAIL.size
_PY_BYTES = _PY_HEAD.size + 625 * 4


def _rng_setter(name: str, data: bytes) -> Callable[[], object] | None:
    """A function that sets generator ``name`` to ``data``, checked first; None if not here."""

    def bad(why: str) -> CorruptLogError:
        return CorruptLogError(f"the logged state of generator {name!r} {why}", key=name)

    def tried(load: Callable[[], object]) -> None:
        try:
            load()
        except (RuntimeError, ValueError, TypeError, OverflowError, struct.error) as exc:
            raise bad(f"does not load: {exc}") from None

    if name == "torch_cpu" or (name.startswith("gen:") and name[4:] in _REGISTERED):
        live = _REGISTERED[name[4:]] if name.startswith("gen:") else torch.default_generator
        if len(data) != live.get_state().numel():
            raise bad(f"is {len(data)} bytes, this generator's is {live.get_state().numel()}")
        tried(lambda: torch.Generator().set_state(_bytes_tensor(data)))
        return lambda: live.set_state(_bytes_tensor(data))
    if name.startswith("cuda:"):
        index = name.split(":", 1)[1]
        if not index.isdecimal() or not torch.cuda.is_available() or int(index) >= torch.cuda.device_count():
            return None
        expected = torch.cuda.get_rng_state(int(index)).numel()
        if len(data) != expected:
            raise bad(f"is {len(data)} bytes, this device's is {expected}")
        return lambda: torch.cuda.set_rng_state(_bytes_tensor(data), int(index))
    if name == "numpy":
        if len(data) != _NUMPY_BYTES:
            raise bad(f"is {len(data)} bytes, not {_NUMPY_BYTES}")
        keys = np.frombuffer(data[: 624 * 4], dtype="<u4").astype(np.uint32)
        pos, has_gauss, cached = _NUMPY_TAIL.unpack(data[624 * 4 :])
        state = ("MT19937", keys, pos, has_gauss, cached)
        tried(lambda: np.random.RandomState().set_state(state))
        return lambda: np.random.set_state(state)
    if name == "python":
        if len(data) != _PY_BYTES:
            raise bad(f"is {len(data)} bytes, not {_PY_BYTES}")
        version, has_gauss, gauss = _PY_HEAD.unpack(data[: _PY_HEAD.size])
        py_state = (version, tuple(array("I", data[_PY_HEAD.size :])), gauss if has_gauss else None)
        tried(lambda: random.Random().setstate(py_state))
        return lambda: random.setstate(py_state)
    return None


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@dataclass
class Hyperparameters:
    """The scalars in force at a step's start.

    ``host`` holds plain numbers (every optimizer param group's scalars, user values);
    ``device`` holds 0-d device tensors (a CUDA GradScaler's scale), copied so a later update
    cannot reach them, and read without a device wait at the end of the step.
    """

    host: dict[str, Any] = field(default_factory=dict)
    device: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def capture(cls, tracked: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> Hyperparameters:
        hp = cls()
        for name, obj in tracked.items():
            if isinstance(obj, torch.optim.Optimizer):
                for i, group in enumerate(obj.param_groups):
                    for key, value in group.items():
                        if key != "params":
                            hp._add(f"{name}.{i}.{key}", value)
            elif isinstance(obj, torch.amp.GradScaler) and obj.is_enabled():
                scale = getattr(obj, "_scale", None)
                hp._add(f"{name}.scale", scale if scale is not None else float(obj.get_scale()))
        for key, value in (extra or {}).items():
            hp._add(key, value)
        return hp

    def _add(self, key: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                return
            if value.device.type == "cpu":
                self.host[key] = value.item()
            else:
                self.device[key] = value.detach().reshape(()).to(torch.float32, copy=True)
        elif isinstance(value, bool | int | float):
            self.host[key] = value
        elif isinstance(value, tuple | list) and value and all(isinstance(v, bool | int | float) for v in value):
            self.host[key] = list(value)


def parameters_of(tracked: Mapping[str, Any]) -> tuple[list[str], list[torch.Tensor], list[bool]]:
    """(names, this rank's local tensors, sharded?) of every tracked module's parameters, once each.

    Names are ``<tracked key>.<canonical parameter name>``: the same whatever wraps the model
    (DDP, ``torch.compile``, activation checkpointing), so a log replays under another wrapping.
    """
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    sharded: list[bool] = []
    seen: set[int] = set()
    for module_name, obj in tracked.items():
        if not isinstance(obj, torch.nn.Module):
            continue
        named = list(obj.named_parameters())
        canonical = canonical_names(obj, [name for name, _ in named])
        for name, p in named:
            if id(p) in seen:
                continue
            seen.add(id(p))
            local = p.to_local() if hasattr(p, "to_local") else p
            placements = getattr(p, "placements", ())
            names.append(f"{module_name}.{canonical[name]}")
            tensors.append(local.detach())
            sharded.append(any(pl.is_shard() for pl in placements))
    return names, tensors, sharded


@dataclass
class StepValues:
    """A step's results on their way to the host: [param norms..., loss, grad norm, device hparams...]."""

    values: torch.Tensor
    event: Any | None  # a CUDA event to wait on before reading ``values``
    n_params: int
    has_grad_norm: bool
    device_keys: list[str]

    @classmethod
    def capture(
        cls,
        params: list[torch.Tensor],
        loss: float | torch.Tensor,
        grad_norm: float | torch.Tensor | None,
        hp: Hyperparameters,
    ) -> StepValues:
        parts: list[torch.Tensor] = []
        if params:
            parts.extend(torch._foreach_norm(params, 2, dtype=torch.float32))
        device = params[0].device if params else torch.device("cpu")
        for x in (loss, grad_norm if grad_norm is not None else 0.0):
            if hasattr(x, "full_tensor"):  # a DTensor (FSDP2's clip_grad_norm_): the value every rank agrees on
                x = x.full_tensor()
            if isinstance(x, torch.Tensor):
                parts.append(x.detach().reshape(()).to(device=device, dtype=torch.float32))
            else:  # filled on the device: a copy from the host would wait for it
                parts.append(torch.full((), float(x), dtype=torch.float32, device=device))
        parts.extend(t.to(device) for t in hp.device.values())
        stacked = torch.stack(parts)
        event = None
        if stacked.device.type == "cuda":
            stacked = stacked.to("cpu", non_blocking=True)  # lands in pinned memory; no wait here
            event = torch.cuda.Event()
            event.record()
        return cls(stacked, event, len(params), grad_norm is not None, list(hp.device))

    def read(self) -> tuple[list[float], float, float | None, dict[str, float]]:
        """(param norms, loss, grad norm, device hparams), waiting for the copy if needed."""
        if self.event is not None:
            self.event.synchronize()
        values = self.values.tolist()
        n = self.n_params
        hps = dict(zip(self.device_keys, values[n + 2 :], strict=True))
        return values[:n], values[n], values[n + 1] if self.has_grad_norm else None, hps
