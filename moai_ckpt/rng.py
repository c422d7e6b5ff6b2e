"""Every random number generator a training run draws from, as one Stateful object.

Captured: torch's CPU generator, each CUDA device's generator (when CUDA is initialised), numpy's
legacy global generator, Python's ``random`` module, and any ``torch.Generator`` registered with
`register_generator`. Restoring them makes the next random numbers of every generator equal.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch

_REGISTERED: dict[str, torch.Generator] = {}


def register_generator(name: str, generator: torch.Generator) -> None:
    """Include ``generator`` in every snapshot's RNG state under ``name``.

    Registering a name again replaces the generator; `unregister_generator` drops it.
    (Held strongly: some torch releases' generators cannot be weakly referenced.)
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"expected a torch.Generator, got {type(generator).__name__}")
    _REGISTERED[name] = generator


def unregister_generator(name: str) -> None:
    _REGISTERED.pop(name, None)


class GlobalRNG:
    """The process-wide RNG states, with ``state_dict`` / ``load_state_dict``."""

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "torch_cpu": torch.get_rng_state(),
            "numpy": np.random.get_state(legacy=False),
            "python": random.getstate(),
            "generators": {name: g.get_state() for name, g in sorted(_REGISTERED.items())},
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch_cpu"])
        np.random.set_state(state["numpy"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        for name, gstate in state.get("generators", {}).items():
            gen = _REGISTERED.get(name)
            if gen is None:
                warnings.warn(
                    f"snapshot holds the state of generator {name!r}, which is not registered "
                    "in this process; register it before restore to restore it",
                    stacklevel=3,
                )
                continue
            gen.set_state(gstate)
        cuda_states = state.get("cuda")
        if cuda_states and torch.cuda.is_available():
            count = torch.cuda.device_count()
            if count != len(cuda_states):
                warnings.warn(
                    f"snapshot has RNG states for {len(cuda_states)} CUDA devices, this process "
                    f"sees {count}; restoring the first {min(count, len(cuda_states))}",
                    stacklevel=3,
                )
            for i in range(min(count, len(cuda_states))):
                torch.cuda.set_rng_state(cuda_states[i], device=i)
