"""CUDA state: device tensors and every CUDA device's RNG round-trip (needs a GPU)."""

from __future__ import annotations

import pytest
import torch

import moai_ckpt
from tests.helpers import TinyNet, assert_bitwise_equal, tensors_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, 32, (4, 8), device="cuda")  # draws from the CUDA generator
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens).float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_cuda_run_resumes_bitwise_with_cuda_rng(run_dir: str) -> None:
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(0)
    model = TinyNet().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train(model, opt, 3)
    ckpt = moai_ckpt.Checkpointer(run_dir)
    marker = ckpt.save(3, {"model": model, "optim": opt})
    assert "cuda" in marker.body.device_types
    expected_losses = _train(model, opt, 3)
    expected_next = torch.rand(5, device="cuda").cpu()

    torch.manual_seed(1)
    torch.cuda.manual_seed_all(1)
    fresh = TinyNet().cuda()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    ckpt.restore({"model": fresh, "optim": fresh_opt})
    assert _train(fresh, fresh_opt, 3) == expected_losses
    assert torch.equal(torch.rand(5, device="cuda").cpu(), expected_next)
    assert_bitwise_equal(tensors_of(fresh.state_dict()), tensors_of(model.state_dict()))
    assert_bitwise_equal(tensors_of(fresh_opt.state_dict()), tensors_of(opt.state_dict()))


def test_a_cuda_snapshot_restores_onto_cpu_and_back(run_dir: str) -> None:
    torch.manual_seed(0)
    gpu = TinyNet().cuda().to(torch.bfloat16)
    ckpt = moai_ckpt.Checkpointer(run_dir)
    ckpt.save(1, {"model": gpu})
    cpu = TinyNet().to(torch.bfloat16)
    ckpt.restore({"model": cpu}, restore_rng=False)
    assert_bitwise_equal(tensors_of(cpu.state_dict()), tensors_of({k: v.cpu() for k, v in gpu.state_dict().items()}))
    ckpt.save(2, {"model": cpu})
    back = TinyNet().cuda().to(torch.bfloat16)
    ckpt.restore({"model": back}, step=2, restore_rng=False)
    assert all(t.is_cuda for t in back.state_dict().values())
    assert_bitwise_equal(tensors_of(back.state_dict()), tensors_of(gpu.state_dict()))
