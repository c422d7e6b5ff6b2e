"""Device digests on CUDA compute exactly the integers the same algorithm gives on the CPU.

`moai_ckpt.digest.device_sums` reduces tensors on their own device (large tensors alone, small
ones batched by word type); the log's full-state digests and the save's replicated-state check
depend on it. The log's state digests come from a plan on a side stream (`replay.stateplan`,
`moai_ckpt.run.logstream`): equal to the reference sums bitwise, with no host-device
synchronisation at the step boundaries of a logged run, and replayed bitwise. These tests run
where CUDA is (the GPU machine) and are skipped elsewhere, with the reason printed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import moai_ckpt
from moai_ckpt import Run
from moai_ckpt.digest import SMALL_WORDS, device_sums, digest_tensors, mix_digest, reference_sums
from moai_ckpt.run.logstream import LogStream
from replay.statedigest import capture_state
from replay.stateplan import StateDigests
from tests.scenarios.state_scenario import Net, entry_tensor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, generator=g),  # small, int32 words
        torch.randn(1000, 7, generator=g).bfloat16(),  # small, 2-byte words
        torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8),  # odd bytes: byte words
        torch.randn(SMALL_WORDS + 12345, generator=g),  # large: reduced alone
        torch.randn(4096 * 3, generator=g).double(),  # large, 8-byte elements
        torch.tensor(7, dtype=torch.int64),  # 0-d
        torch.empty(0),
        torch.randn(64, 64, generator=g).t(),  # not contiguous
    ]


def test_cuda_sums_equal_the_cpu_reference_for_every_layout() -> None:
    cpu = _tensors()
    on_gpu = [t.cuda() for t in cpu]
    assert torch.equal(device_sums(on_gpu).cpu(), device_sums(cpu))


def test_a_flipped_bit_on_the_gpu_changes_exactly_its_tensors_digest() -> None:
    tensors = [t.cuda() for t in _tensors()]
    named = [(f"t{i}", t) for i, t in enumerate(tensors)]
    before = digest_tensors(named).wait()
    for i, t in enumerate(tensors):
        if t.numel() == 0:
            continue
        words = t.view(-1).view(torch.uint8) if t.is_contiguous() else None
        if words is None:
            continue
        words[words.numel() // 2] ^= 0x10
        after = digest_tensors(named).wait()
        assert {k for k in before if before[k] != after[k]} == {f"t{i}"}
        words[words.numel() // 2] ^= 0x10
    assert digest_tensors(named).wait() == before


def test_digests_see_writes_queued_on_the_stream_before_them() -> None:
    x = torch.zeros(1 << 20, device="cuda")
    first = digest_tensors([("x", x)]).wait()["x"]
    x.add_(1.0)  # queued, not waited for
    second = digest_tensors([("x", x)]).wait()["x"]
    assert first != second


def test_the_fused_kernel_runs_here_and_matches_the_reference_over_many_blocks() -> None:
    from moai_ckpt import digest_cuda
    from moai_ckpt.digest import reference_sums

    assert digest_cuda.available(), "Triton is missing: the fused kernel would not be tested"
    g = torch.Generator().manual_seed(1)
    sizes = [1, 7, 4096, 4097, 3 * 4096 + 5, 1 << 20, 12_345_679]
    cpu = [torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int32) for n in sizes]
    words = [t.cuda() for t in cpu]
    fused = digest_cuda.word_sums(words).cpu()
    assert torch.equal(fused, reference_sums(cpu))
    assert torch.equal(digest_cuda.word_sums(words).cpu(), fused)  # the cached block table, again


# -- the log's state digests: a plan, on a side stream ------------------------------------------------


def _cuda_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = Net().cuda()  # BatchNorm: buffers written in the forward
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(torch.randn(8, 8, device="cuda")).square().mean().backward()
    opt.step()
    return {"model": model, "optim": opt, "_data": moai_ckpt.GlobalSampler(32, 8)}


def test_side_stream_digests_from_the_plan_equal_the_reference_sums_bitwise() -> None:
    tracked = _cuda_state()
    stream, digests = LogStream(), StateDigests()
    for _ in range(2):  # the plan built, then kept
        with stream.side(torch.device("cuda")):
            pending = digests.capture(tracked, between=stream.mark_early)
            stream.mark_late()
        planned = dict(zip(pending.names, pending.wait(), strict=True))
        assert planned == dict(zip(*_walked(tracked), strict=True))
        tensors = [n for n, d in planned.items() if d.startswith("mix64:")]
        assert len(tensors) >= 10
        for name in tensors:
            local = entry_tensor(tracked, name)
            plain, weighted = reference_sums([local])[0].tolist()
            assert planned[name] == mix_digest(local.numel() * local.element_size(), plain, weighted), name
    assert digests.rebuilds == 1


def _walked(tracked: dict[str, Any]) -> tuple[list[str], list[str]]:
    pending = capture_state(tracked)
    return pending.names, pending.wait()


def _driven_run(run_dir: Path) -> tuple[Run, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Net("layer").cuda()  # no BatchNorm: its backward need not be deterministic
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    run = Run(str(run_dir), snapshot_every=10**9, async_snapshots=False, snapshot_at_end=False)
    run.track(model=model, optim=opt)
    return run, model, opt


def test_a_logged_cuda_step_never_waits_for_the_device_and_its_replay_is_bitwise(tmp_path: Path) -> None:
    run, model, opt = _driven_run(tmp_path / "run")
    data = torch.randn(6, 8, 8, device="cuda")
    try:
        run.start()
        for step in range(1, 7):
            synced = step > 2  # the base snapshot and the plan's first build are behind
            with _no_sync(synced):
                run.begin_step(step)
            loss = model(data[step - 1]).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            with _no_sync(synced):
                run.end_step(step, loss.detach())
        run.finish()
    finally:
        run.close()
    again, model, opt = _driven_run(tmp_path / "run")
    try:
        assert again.start() == 0
        for step in range(1, 7):
            again.begin_step(step)
            loss = model(data[step - 1]).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            again.end_step(step, loss.detach())
        again.finish()
        assert again.report is not None and again.report.replayed == 6
        assert again.report.bitwise  # exact state digests included: the log records them
    finally:
        again.close()


@contextmanager
def _no_sync(active: bool) -> Iterator[None]:
    """Any host-device synchronisation inside raises (torch's sync debug mode)."""
    if not active:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
