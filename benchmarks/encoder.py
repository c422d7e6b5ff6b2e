"""The training setup of the end-to-end snapshot and restore benchmarks: an encoder stack + AdamW.

On a GPU (the default of `GPU`): 24 ``nn.TransformerEncoderLayer`` of width 1024 (302M fp32
parameters) with AdamW, bf16 autocast, 16 x 1024 tokens a step: about 3.6 GB of training state
and, on an H200, a step of about 65 ms. On a CPU (`CPU`): 3 layers of width 512 and 16 tokens a
step, about 113 MB of state and a step of a few tens of ms on one core. The loss is a regression
on fixed random inputs: the benchmarks time the step, not what it learns.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of the model and of one step's batch."""

    layers: int
    d_model: int
    heads: int
    batch: int
    seq: int


GPU = EncoderConfig(layers=24, d_model=1024, heads=16, batch=16, seq=1024)
CPU = EncoderConfig(layers=3, d_model=512, heads=8, batch=2, seq=8)


def default_config(device: torch.device) -> EncoderConfig:
    return GPU if device.type == "cuda" else CPU


def build_model(cfg: EncoderConfig, device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [
        nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, 4 * cfg.d_model, dropout=0.0, batch_first=True)
        for _ in range(cfg.layers)
    ]
    return nn.Sequential(*layers).to(device)


class Trainer:
    """One model, its AdamW (fused) and a fixed batch; `step` is one training step.

    The optimizer state exists from the start (one step is taken), so the state a snapshot
    holds is the same size at every step.
    """

    def __init__(self, cfg: EncoderConfig, device: torch.device, seed: int = 0) -> None:
        self.cfg = cfg
        self.device = device
        self.model = build_model(cfg, device, seed)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5, fused=True)
        gen = torch.Generator().manual_seed(seed + 1)
        shape = (cfg.batch, cfg.seq, cfg.d_model)
        self.x = torch.randn(shape, generator=gen).to(device)
        self.y = torch.randn(shape, generator=gen).to(device)
        self.step()
        self.sync()

    def autocast(self) -> AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def forward_backward(self) -> None:
        with self.autocast():
            loss = (self.model(self.x).float() - self.y).pow(2).mean()
        loss.backward()

    def optimizer_step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.forward_backward()
        self.optimizer_step()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def state(self) -> dict[str, Any]:
        """What a snapshot saves, as moai-ckpt takes it (live objects)."""
        return {"model": self.model, "optim": self.opt}

    def state_dict(self) -> dict[str, Any]:
        """The same as plain state dicts (what DCP and torch.save take)."""
        return {"model": self.model.state_dict(), "optim": self.opt.state_dict()}

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the state: parameters and buffers, then the optimizer's."""
        out = list(self.model.state_dict().values())
        for s in self.opt.state_dict()["state"].values():
            out += [v for v in s.values() if isinstance(v, torch.Tensor)]
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
