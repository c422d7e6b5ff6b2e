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


def test_save_async_stages_cuda_tensors_in_pinned_memory_and_leaks_nothing(run_dir: str) -> None:
    torch.manual_seed(0)
    model = TinyNet().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train(model, opt, 2)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt = moai_ckpt.Checkpointer(run_dir)
    handle = ckpt.save_async(2, {"model": model, "optim": opt})
    assert handle is not None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # queued on the same stream, after the staging copies
    handle.result(timeout=120)
    staged_from_gpu = [b for name, b in ckpt._pool._buffers.items() if name.startswith(("model/", "optim/"))]
    assert staged_from_gpu and all(b.is_pinned() for b in staged_from_gpu if b.numel() > 1)
    fresh = TinyNet().cuda()
    ckpt.restore({"model": fresh}, restore_rng=False)
    assert_bitwise_equal(tensors_of(fresh.state_dict()), tensors_of(expected))
    ckpt.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for an NCCL run")
def test_an_nccl_fsdp_snapshot_on_2_gpus_restores_on_1_gpu_and_on_cpu(tmp_path) -> None:
    from moai_ckpt.testing.dist import launch

    run_dir, ref = str(tmp_path / "run"), str(tmp_path / "ref.npz")
    saved = launch("tests.dist_scenarios:save", 2, backend="nccl", run_dir=run_dir, ref_path=ref, mode="fsdp")
    assert all(r.returncode == 0 for r in saved), [r.output[-2000:] for r in saved]
    for backend, env_device in (("nccl", "cuda"), ("gloo", "cpu")):
        import os

        os.environ["MOAI_TEST_DEVICE"] = env_device
        try:
            restored = launch(
                "tests.dist_scenarios:restore", 1, backend=backend, run_dir=run_dir, ref_path=ref, mode="single"
            )
        finally:
            del os.environ["MOAI_TEST_DEVICE"]
        assert restored[0].returncode == 0, restored[0].output[-2000:]
        assert restored[0].value["mismatches"] == [] and restored[0].value["step"] == 2
