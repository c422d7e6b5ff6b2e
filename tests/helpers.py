"""Small training setups shared by the tests."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from moai_ckpt.testing import assert_bitwise_equal, tensors_of

__all__ = [
    "TinyNet",
    "Trainer",
    "assert_bitwise_equal",
    "fingerprint",
    "full_state_tensors",
    "next_randoms",
    "tensors_of",
]


class TinyNet(nn.Module):
    """A small model with dropout (draws from torch's CPU RNG) and tied input/output weights."""

    def __init__(self, vocab: int = 32, dim: int = 16, tied: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(self.embed(tokens))))


@dataclass
class Trainer:
    """Everything a bitwise-resumable run needs, built from a seed."""

    model: TinyNet
    optim: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    data_gen: torch.Generator
    np_rng: np.random.Generator

    @classmethod
    def build(cls, seed: int) -> Trainer:
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        model = TinyNet()
        optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=1e-2, total_steps=100)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
        data_gen = torch.Generator().manual_seed(seed + 1)
        return cls(model, optim, sched, scaler, data_gen, np.random.default_rng(seed + 2))

    def state(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "model": self.model,
            "optim": self.optim,
            "sched": self.sched,
            "scaler": self.scaler,
            "data_gen": self.data_gen,
            "np_rng": self.np_rng,
            "extra": extra if extra is not None else {},
        }

    def step(self) -> float:
        tokens = torch.randint(0, 32, (4, 8), generator=self.data_gen)
        noise = float(np.random.standard_normal()) * 1e-3 + self.np_rng.standard_normal() * 1e-3
        jitter = random.random() * 1e-3
        self.model.train()
        self.optim.zero_grad(set_to_none=True)
        logits = self.model(tokens)
        loss = nn.functional.cross_entropy(logits.reshape(-1, 32), tokens.reshape(-1)) * (1 + noise + jitter)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optim)
        self.scaler.update()
        self.sched.step()
        return float(loss.detach())


def next_randoms(trainer: Trainer) -> dict[str, Any]:
    """The next draw of every generator a run uses (consumes them)."""
    return {
        "torch": torch.rand(4).tolist(),
        "numpy_global": np.random.random(3).tolist(),
        "python": [random.random() for _ in range(3)],
        "data_gen": torch.rand(4, generator=trainer.data_gen).tolist(),
        "np_rng": trainer.np_rng.random(3).tolist(),
    }


def full_state_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {
        **tensors_of(trainer.model.state_dict(), "model"),
        **tensors_of(trainer.optim.state_dict(), "optim"),
    }


def fingerprint(value: Any) -> Any:
    """Everything a state holds, as comparable plain data (tensors by dtype, shape and bytes)."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        return ("tensor", str(value.dtype), tuple(value.shape), bytes(flat.numpy()))
    if isinstance(value, torch.Generator):
        return ("generator", fingerprint(value.get_state()))
    if callable(getattr(value, "state_dict", None)):  # modules, optimizers, schedulers, scalers
        return (type(value).__name__, fingerprint(value.state_dict()))
    if isinstance(value, random.Random):
        return ("random", value.getstate())
    if isinstance(value, np.random.Generator):
        return ("numpy", fingerprint(value.bit_generator.state))
    if isinstance(value, float):
        return ("float", value.hex())
    if isinstance(value, np.generic):
        return ("np", value.dtype.str, repr(value.item()))
    if isinstance(value, dict):
        return ("dict", sorted(((repr(k), fingerprint(v)) for k, v in value.items()), key=lambda kv: kv[0]))
    if isinstance(value, list | tuple):
        return (type(value).__name__, [fingerprint(v) for v in value])
    return (type(value).__name__, repr(value))
