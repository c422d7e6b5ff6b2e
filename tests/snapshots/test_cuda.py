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
    ckpt.wait_staged()  # a manual write (not an optimizer step) waits for the copies first
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
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
    saved = launch("tests.scenarios.dist_scenarios:save", 2, backend="nccl", run_dir=run_dir, ref_path=ref, mode="fsdp")
    assert all(r.returncode == 0 for r in saved), [r.output[-2000:] for r in saved]
    for backend, env_device in (("nccl", "cuda"), ("gloo", "cpu")):
        import os

        os.environ["MOAI_TEST_DEVICE"] = env_device
        try:
            restored = launch(
                "tests.scenarios.dist_scenarios:restore",
                1,
                backend=backend,
                run_dir=run_dir,
                ref_path=ref,
                mode="single",
            )
        finally:
            del os.environ["MOAI_TEST_DEVICE"]
        assert restored[0].returncode == 0, restored[0].output[-2000:]
        assert restored[0].value["mismatches"] == [] and restored[0].value["step"] == 2


def _scenario(run_dir: str, total: int, faults: str | None = None) -> dict:
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOAI_TEST_DEVICE": "cuda"}
    env.pop("MOAI_CKPT_FAULTS", None)
    if faults:
        env["MOAI_CKPT_FAULTS"] = faults
    proc = subprocess.run(
        [sys.executable, "-m", "tests.scenarios.ft_scenario", run_dir, str(total)],
        capture_output=True,
        text=True,
        env=env,
    )
    if faults:
        assert proc.returncode == -9, proc.stderr[-3000:]
        return {}
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("phase", ["forward", "backward", "optimizer", "snapshot.persist", "log.write"])
def test_fault_tolerant_on_a_gpu_killed_in_any_phase_resumes_bitwise(tmp_path, phase: str) -> None:  # type: ignore[no-untyped-def]
    import json

    reference = _scenario(str(tmp_path / "ref"), 14)
    fault = [{"at": phase, "step": 8 if phase.startswith("snapshot") else 7, "once": str(tmp_path / "fired")}]
    _scenario(str(tmp_path / "run"), 14, json.dumps(fault))
    resumed = _scenario(str(tmp_path / "run"), 14)
    assert resumed["digest"] == reference["digest"]
    assert resumed["replayed"] >= 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for an NCCL run")
@pytest.mark.parametrize(("phase", "rank"), [("forward", 1), ("log.write", 0)])
def test_fault_tolerant_over_nccl_one_gpu_killed_resumes_bitwise(tmp_path, monkeypatch, phase: str, rank: int) -> None:  # type: ignore[no-untyped-def]
    import json

    from moai_ckpt.testing.dist import launch

    target = "tests.scenarios.dist_scenarios:fault_tolerant_train"
    reference = launch(target, 2, backend="nccl", run_dir=str(tmp_path / "ref"), total=10)
    assert all(r.returncode == 0 for r in reference), reference[0].output[-3000:]
    fault = [{"at": phase, "step": 6, "rank": rank, "once": str(tmp_path / "fired")}]
    monkeypatch.setenv("MOAI_CKPT_FAULTS", json.dumps(fault))
    monkeypatch.setenv("MOAI_TEST_DUMP_AFTER", "50")
    killed = launch(target, 2, backend="nccl", run_dir=str(tmp_path / "run"), total=10, timeout=90)
    assert killed[rank].returncode == -9, "\n".join(r.output[-4000:] for r in killed)
    monkeypatch.delenv("MOAI_CKPT_FAULTS")
    resumed = launch(target, 2, backend="nccl", run_dir=str(tmp_path / "run"), total=10)
    assert all(r.returncode == 0 for r in resumed), resumed[0].output[-3000:]
    for r in resumed:
        assert r.value["digest"] == reference[0].value["digest"]
        # steps 1..5 were done; the record of step 5 may still have been in flight
        assert r.value["first_step"] + r.value["replayed"] in (5, 6)
