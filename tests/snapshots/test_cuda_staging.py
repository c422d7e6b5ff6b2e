"""Overlapped staging on CUDA: save_async returns with its copies queued, and the snapshot still
holds the state at the call, bitwise, whatever the training does right after (needs a GPU)."""

from __future__ import annotations

import pytest
import torch

import moai_ckpt
from moai_ckpt.errors import StagingRaceError
from tests.helpers import assert_bitwise_equal

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")

#: device cycles the current stream sleeps before a save: its copies (which wait for the current
#: stream) cannot start before the training thread has queued what follows the call
HOLD_CYCLES = 1_000_000_000


class Net(torch.nn.Module):
    """Large enough that its copies take milliseconds; a BatchNorm whose forward updates buffers."""

    def __init__(self, width: int = 4096, depth: int = 8) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])
        self.norm = torch.nn.BatchNorm1d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(x))


def _build(seed: int) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Net().cuda()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model: Net, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(32, 4096, device="cuda")).square().mean().backward()
    opt.step()


def _state_now(model: Net, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the state, copied to the CPU (after the device finished what is queued)."""
    torch.cuda.synchronize()
    out = {f"model/{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    for i, per_param in opt.state_dict()["state"].items():
        out |= {f"optim/{i}/{k}": v.detach().cpu().clone() for k, v in per_param.items() if isinstance(v, torch.Tensor)}
    return out


def _restored(ckpt: moai_ckpt.Checkpointer, step: int) -> dict[str, torch.Tensor]:
    model, opt = _build(seed=7)
    _step(model, opt)  # the optimizer state exists, to be overwritten
    ckpt.restore({"model": model, "optim": opt}, step=step, restore_rng=False)
    return _state_now(model, opt)


def test_the_snapshot_is_the_state_at_the_call_although_a_step_and_a_buffer_update_follow_at_once(
    run_dir: str,
) -> None:
    model, opt = _build(seed=0)
    _step(model, opt)
    ckpt = moai_ckpt.Checkpointer(run_dir, capture_rng=False)
    ckpt.save_async(1, {"model": model, "optim": opt}).result(timeout=120)  # type: ignore[union-attr]
    _step(model, opt)
    expected = _state_now(model, opt)

    torch.cuda._sleep(HOLD_CYCLES)  # the copies start only after what follows is queued
    handle = ckpt.save_async(2, {"model": model, "optim": opt})
    assert handle is not None
    assert ckpt._stager.pending is not None and ckpt._stager.pending.overlapped, "nothing went on the side stream"
    _step(model, opt)  # forward (BatchNorm updates its buffers in place), backward, optimizer step
    with torch.no_grad():
        model.norm.running_var.mul_(3.0)  # an in-place buffer update outside any step
    _step(model, opt)
    handle.result(timeout=120)

    after = _state_now(model, opt)
    assert all(not torch.equal(after[k], expected[k]) for k in ("model/layers.0.weight", "model/norm.running_var"))
    assert_bitwise_equal(_restored(ckpt, 2), expected)
    ckpt.close()


def test_a_write_outside_an_optimizer_step_before_the_copy_fails_the_snapshot(run_dir: str) -> None:
    model, opt = _build(seed=0)
    _step(model, opt)
    ckpt = moai_ckpt.Checkpointer(run_dir, capture_rng=False)
    ckpt.save_async(1, {"model": model, "optim": opt}).result(timeout=120)  # type: ignore[union-attr]

    torch.cuda._sleep(HOLD_CYCLES)
    handle = ckpt.save_async(2, {"model": model, "optim": opt})
    assert handle is not None
    with torch.no_grad():
        model.layers[0].weight.add_(1.0)  # a manual update: no optimizer step guards it
    with pytest.raises(StagingRaceError, match=r"layers\.0\.weight") as caught:
        handle.result(timeout=120)
    assert caught.value.step == 2 and caught.value.url is not None
    assert ckpt.steps() == [1]
    ckpt.close()


def test_wait_staged_makes_a_manual_write_safe(run_dir: str) -> None:
    model, opt = _build(seed=0)
    _step(model, opt)
    ckpt = moai_ckpt.Checkpointer(run_dir, capture_rng=False)
    ckpt.save_async(1, {"model": model, "optim": opt}).result(timeout=120)  # type: ignore[union-attr]
    _step(model, opt)
    expected = _state_now(model, opt)

    torch.cuda._sleep(HOLD_CYCLES)
    handle = ckpt.save_async(2, {"model": model, "optim": opt})
    assert handle is not None
    ckpt.wait_staged()
    with torch.no_grad():
        model.layers[0].weight.add_(1.0)
    handle.result(timeout=120)
    assert_bitwise_equal(_restored(ckpt, 2), expected)
    ckpt.close()


def test_the_first_save_async_clones_on_the_device_instead_of_waiting_for_the_pinned_pool(run_dir: str) -> None:
    model, opt = _build(seed=0)
    _step(model, opt)
    expected = _state_now(model, opt)
    ckpt = moai_ckpt.Checkpointer(run_dir, capture_rng=False)
    torch.cuda._sleep(HOLD_CYCLES)
    handle = ckpt.save_async(1, {"model": model, "optim": opt})
    assert handle is not None
    pending = ckpt._stager.pending
    on_device = sum(t.is_cuda for t in model.state_dict().values())
    on_device += sum(t.is_cuda for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    assert pending is not None and len(pending.deferred) == on_device, "the first call waited for pinned memory"
    _step(model, opt)
    handle.result(timeout=120)
    assert_bitwise_equal(_restored(ckpt, 1), expected)

    second = ckpt.save_async(2, {"model": model, "optim": opt})  # the pool is ready now: pinned, no clones
    assert second is not None and ckpt._stager.pending is not None and not ckpt._stager.pending.deferred
    second.result(timeout=120)
    assert all(b.is_pinned() for b in ckpt._pool._buffers.values() if b.numel() > 1)  # AdamW's steps: CPU
    ckpt.close()


def test_prepare_allocates_the_pool_in_the_background_so_the_first_save_is_pinned(run_dir: str) -> None:
    model, opt = _build(seed=0)
    _step(model, opt)
    ckpt = moai_ckpt.Checkpointer(run_dir, capture_rng=False)
    ckpt.prepare({"model": model, "optim": opt})
    for name in list(ckpt._pool._pending):
        ckpt._pool._pending[name].result(timeout=120)
    handle = ckpt.save_async(1, {"model": model, "optim": opt})
    assert handle is not None and ckpt._stager.pending is not None and not ckpt._stager.pending.deferred
    handle.result(timeout=120)
    ckpt.close()


def test_saves_that_reuse_the_capture_plan_hold_the_state_at_each_call(run_dir: str) -> None:
    """The second and later saves follow the first one's capture plan (names, pieces, pinned
    buffers); a parameter given new storage in between is read from the new storage, and every
    snapshot still holds the state at its call while the next steps run over its copies."""
    model, opt = _build(seed=0)
    _step(model, opt)
    ckpt = moai_ckpt.Checkpointer(run_dir, capture_rng=False)
    ckpt.save_async(1, {"model": model, "optim": opt}).result(timeout=120)  # type: ignore[union-attr]
    expected: dict[int, dict[str, torch.Tensor]] = {}
    for step in (2, 3, 4):
        _step(model, opt)
        if step == 3:
            with torch.no_grad():  # same shape, new storage: the plan holds, the bytes come from here
                model.layers[1].weight.data = model.layers[1].weight.detach() * 0.5
        expected[step] = _state_now(model, opt)
        torch.cuda._sleep(HOLD_CYCLES)
        handle = ckpt.save_async(step, {"model": model, "optim": opt})
        assert handle is not None
        _step(model, opt)
        with torch.no_grad():
            model.norm.running_mean.add_(1.0)
        handle.result(timeout=120)
    assert ckpt._pool.plans.hits == 3, "the saves after the first did not reuse its plan"
    for step, tensors in expected.items():
        assert_bitwise_equal(_restored(ckpt, step), tensors)
    ckpt.close()
