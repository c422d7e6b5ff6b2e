"""A small training run whose op stream the op-capture tests look at, with plantable differences.

``MOAI_TEST_PLANT`` (read at each step):

- ``bf16``: the first MLP layer's matmul is computed in bfloat16 and cast back (lower precision);
- ``ordered`` / ``perturbed``: the batch mean goes through the custom op ``moai_test::ordered_sum``,
  which adds the rows in order; ``perturbed`` also scales the sum by ``1 + 1e-3``, as a
  non-deterministic reduction would change it (same inputs, another result). A relative 1e-3
  differs on every machine, where a changed summation order may round to the same bits on some
  CPUs' kernels.

Snapshots every 2 steps, none at the end, so a run of 3 steps leaves step 3 in the log after the
snapshot of step 2; ``capture_ops="after_snapshot"`` captures steps 1 and 3.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import moai_ckpt
from moai_ckpt.run import Run

PLANT_ENV = "MOAI_TEST_PLANT"
PERTURBATION = 1e-3


@torch.library.custom_op("moai_test::ordered_sum", mutates_args=())
def ordered_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over dimension 0, one row after another (off by a relative 1e-3 when the plant says so)."""
    total = torch.zeros_like(x[0])
    for row in x.unbind(0):
        total = total + row
    if os.environ.get(PLANT_ENV) == "perturbed":
        total = total * (1 + PERTURBATION)
    return total


@ordered_sum.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[1:])


def _backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    return grad.unsqueeze(0).expand(ctx.rows, *grad.shape).clone()


def _setup(ctx: Any, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
    ctx.rows = inputs[0].shape[0]


ordered_sum.register_autograd(_backward, setup_context=_setup)


class Net(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(0.1)
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("scale", torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if os.environ.get(PLANT_ENV) == "bf16":
            h = (x.bfloat16() @ self.up.weight.t().bfloat16()).float() + self.up.bias
        else:
            h = x @ self.up.weight.t() + self.up.bias
        h = self.drop(F.gelu(h))
        y = self.norm(self.down(h)) * self.scale
        if os.environ.get(PLANT_ENV) in ("ordered", "perturbed"):  # a custom op: not replayable without its code
            return ordered_sum(y) / y.shape[0]
        return y.mean(0)


def build(dim: int = 16) -> tuple[Net, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Net(dim)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    data = torch.randn(64, dim)
    targets = torch.randn(64, dim)
    return model, opt, data, targets


def one_step(
    model: Net, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    opt.zero_grad(set_to_none=True)
    out = model(x)
    loss = F.mse_loss(out, y.mean(0))
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss, grad_norm


@moai_ckpt.fault_tolerant(
    storage="{run_dir}",
    snapshot_every=2,
    async_snapshots=False,
    log_sync=True,
    snapshot_at_end=False,
    capture_ops="after_snapshot",
)
def train(run: Run, *, run_dir: str, total: int = 3) -> dict[str, Any]:
    torch.set_num_threads(1)
    model, opt, data, targets = build()
    run.track(model=model, optim=opt)
    run.sampler(len(data), 8, seed=0)
    losses = {}
    for step in run.steps(total):
        indices = torch.tensor(run.batch())
        loss, grad_norm = one_step(model, opt, data[indices], targets[indices])
        run.record(loss=loss, grad_norm=grad_norm)
        losses[step] = float(loss.detach())
    return {"losses": losses, "replayed": run.replayed}
