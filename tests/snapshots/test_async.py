"""save_async: a short stall, writes in the background, no leaks of later changes, bounded memory."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

import moai_ckpt
from moai_ckpt.testing.faulty import FaultPlan
from tests.helpers import Trainer, assert_bitwise_equal, full_state_tensors


def slow_checkpointer(run_dir: str, latency_s: float = 0.01, **plan: object) -> moai_ckpt.Checkpointer:
    """A run directory whose every write takes ``latency_s`` (the background stays busy)."""
    return moai_ckpt.Checkpointer(
        f"faulty://{run_dir}", target_protocol="file", plan=FaultPlan(latency_s=latency_s, ops={"write"}, **plan)
    )


def test_changes_made_after_save_async_returns_do_not_reach_the_snapshot(run_dir: str) -> None:
    trainer = Trainer.build(seed=0)
    trainer.step()
    ckpt = slow_checkpointer(run_dir)
    expected = {k: v.clone() for k, v in full_state_tensors(trainer).items()}
    handle = ckpt.save_async(1, trainer.state({"n": 1}))
    assert handle is not None and not handle.done()  # still writing while training goes on
    for _ in range(3):
        trainer.step()
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    marker = handle.result(timeout=60)
    assert marker.body.step == 1 and ckpt.steps() == [1]
    fresh = Trainer.build(seed=3)
    ckpt.restore(fresh.state())
    assert_bitwise_equal(full_state_tensors(fresh), expected)
    assert handle.stall_s > 0
    ckpt.close()


def test_the_next_save_waits_for_the_one_in_flight_or_is_skipped_by_policy(run_dir: str) -> None:
    ckpt = slow_checkpointer(run_dir)
    state = {"t": {f"w{i}": torch.full((64,), float(i)) for i in range(10)}}
    first = ckpt.save_async(1, state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        skipped = ckpt.save_async(2, state, if_busy="skip")
    assert skipped is None and any("skipped" in str(w.message) for w in caught)
    second = ckpt.save_async(3, state)  # waits for the first before staging
    assert first is not None and first.done()
    assert second is not None
    second.result(timeout=60)
    assert ckpt.steps() == [1, 3]
    with pytest.raises(ValueError, match="if_busy"):
        ckpt.save_async(4, state, if_busy="later")
    ckpt.close()


def test_a_background_error_surfaces_in_result_and_at_the_next_save(run_dir: str) -> None:
    failing = moai_ckpt.Checkpointer(
        f"faulty://{run_dir}",
        target_protocol="file",
        plan=FaultPlan(permanent_nth=[3], ops={"write"}),
        retry=moai_ckpt.RetryPolicy(attempts=2, initial_backoff_s=0.001),
    )
    handle = failing.save_async(1, {"t": torch.ones(8), "x": {"a": 1}})
    assert handle is not None
    with pytest.raises(moai_ckpt.StorageError):
        handle.result(timeout=60)
    assert failing.steps() == []

    unseen = failing.save_async(2, {"t": torch.ones(8)})  # permanent_nth counts on: this one is fine
    assert unseen is not None
    unseen.result(timeout=60)

    again = moai_ckpt.Checkpointer(
        f"faulty://{run_dir}-2",
        target_protocol="file",
        plan=FaultPlan(permanent_nth=[2], ops={"write"}),
        retry=moai_ckpt.RetryPolicy(attempts=2, initial_backoff_s=0.001),
    )
    assert again.save_async(1, {"t": torch.ones(8)}) is not None
    with pytest.raises(moai_ckpt.StorageError):  # nobody called result(): the next save raises it
        again.save_async(2, {"t": torch.ones(8)})
    again.save_async(3, {"t": torch.ones(8)}).result(timeout=60)  # type: ignore[union-attr]
    assert again.steps() == [3]


def test_the_host_pool_allocates_in_the_background_one_buffer_per_name() -> None:
    from moai_ckpt.staging import HostPool

    pool = HostPool(pin=False)
    t = torch.arange(1000, dtype=torch.float32)
    assert pool.ready("a", t) is None  # not allocated yet: started in the background, no wait
    buf = pool.buffer("a", t)  # waits for that allocation
    assert buf.shape == t.shape and buf.dtype == t.dtype
    assert pool.ready("a", t) is buf and pool.buffer("a", t) is buf  # reused
    assert pool.ready("a", t.double()) is None and pool.buffer("a", t.double()).dtype == torch.float64
    pool.buffer("b", t)
    pool.release_unused()  # a round used a and b: both stay
    pool.buffer("b", t)
    pool.release_unused()  # this round used b only: a goes
    assert set(pool._buffers) == {"b"} and pool.nbytes == t.numel() * 4
    pool.clear()
    assert pool.nbytes == 0


def test_pack_copies_tensors_of_any_dtype_and_shape_into_one_allocation() -> None:
    from moai_ckpt.overlap import pack

    tensors = [
        torch.arange(7, dtype=torch.float32),
        torch.tensor(3, dtype=torch.int64),  # 0-d
        torch.zeros(0, 4),  # empty
        torch.arange(12, dtype=torch.bfloat16).reshape(3, 4).t(),  # not contiguous
        torch.tensor([True, False, True]),
        torch.randn(5, dtype=torch.complex64),
    ]
    clones = pack(tensors)
    assert_bitwise_equal(dict(enumerate(clones)), dict(enumerate(tensors)))  # type: ignore[arg-type]
    assert all(c.is_contiguous() for c in clones)
    assert len({c.untyped_storage().data_ptr() for c in clones}) == 1  # one allocation
    tensors[0].add_(1.0)
    assert clones[0][0].item() == 0.0  # copies, not views


def test_copy_all_copies_every_pair() -> None:
    from moai_ckpt.overlap import copy_all

    sources = [torch.arange(5, dtype=torch.float32), torch.arange(6).reshape(2, 3).t(), torch.tensor(2.5)]
    buffers = [torch.empty(s.shape, dtype=s.dtype) for s in sources]
    copy_all(list(zip(buffers, sources, strict=True)))
    assert_bitwise_equal(dict(zip("abc", buffers, strict=True)), dict(zip("abc", sources, strict=True)))


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc to read the resident set size")
def test_host_memory_stays_bounded_over_100_saves(tmp_path: Path) -> None:
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])  # ~2 MB of parameters
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 256)).sum().backward()
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for t in full_state_tensors_of(model, opt))
    ckpt = moai_ckpt.Checkpointer(str(tmp_path / "run"), fsync=False)
    samples = []
    for step in range(100):
        handle = ckpt.save_async(step, {"model": model, "optim": opt})
        assert handle is not None
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.999)
        if step % 10 == 9:
            handle.result(timeout=60)
            ckpt.prune(keep=2)
        if step >= 10:
            samples.append(rss_bytes())
    ckpt.wait()
    assert ckpt._pool.nbytes <= state_bytes + (64 << 10)  # one copy of the state, plus RNG states
    growth = max(samples) - samples[0]
    assert growth < 4 * state_bytes, f"resident memory grew by {growth / 1e6:.1f} MB over 90 saves"
    ckpt.close()


def full_state_tensors_of(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = list(model.state_dict().values())
    for s in opt.state_dict()["state"].values():
        out += [v for v in s.values() if isinstance(v, torch.Tensor)]
    return out
