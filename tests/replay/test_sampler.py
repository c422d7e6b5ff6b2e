"""The data position is global: the same samples per step on any number of ranks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import moai_ckpt
from moai_ckpt.sampler import GlobalSampler


@given(
    num_samples=st.integers(1, 300),
    batch=st.integers(1, 64),
    worlds=st.lists(st.integers(1, 9), min_size=2, max_size=4),
    steps=st.integers(1, 30),
    drop_last=st.booleans(),
)
def test_the_samples_of_each_step_are_the_same_for_any_world_size(
    num_samples: int, batch: int, worlds: list[int], steps: int, drop_last: bool
) -> None:
    if drop_last and batch > num_samples:
        return
    seen = []
    for world in worlds:
        samplers = [GlobalSampler(num_samples, batch, seed=3, drop_last=drop_last) for _ in range(world)]
        per_step = []
        for _ in range(steps):
            parts = [s.next_batch(rank, world) for rank, s in enumerate(samplers)]
            per_step.append([i for p in parts for i in p])
        seen.append(per_step)
        assert len({(s.epoch, s.step_in_epoch, s.samples_consumed) for s in samplers}) == 1
    assert all(run == seen[0] for run in seen)


def test_every_sample_is_used_once_per_epoch() -> None:
    s = GlobalSampler(100, 10, seed=1)
    epoch0 = [i for _ in range(10) for i in s.next_batch()]
    assert sorted(epoch0) == list(range(100)) and s.epoch == 1
    epoch1 = [i for _ in range(10) for i in s.next_batch()]
    assert sorted(epoch1) == list(range(100)) and epoch1 != epoch0
    partial = GlobalSampler(25, 10, drop_last=False, shuffle=False)
    assert [len(partial.next_batch()) for _ in range(3)] == [10, 10, 5]
    assert partial.epoch == 1 and partial.samples_consumed == 25


def test_the_position_round_trips_through_a_snapshot_and_continues(run_dir: str) -> None:
    original = GlobalSampler(1000, 32, seed=7)
    for _ in range(45):
        original.next_batch(0, 4)
    ckpt = moai_ckpt.Checkpointer(run_dir)
    ckpt.save(45, {"data": original})
    step46 = original.global_batch()
    expected = [GlobalSampler.split(step46, r, 4) for r in range(4)]  # four ranks' views of step 46 ...
    resumed = GlobalSampler(1000, 32, seed=7)
    ckpt.restore({"data": resumed})
    # ... on two ranks: rank r of 2 holds ranks 2r and 2r+1 of 4
    halves = [GlobalSampler.split(resumed.global_batch(), r, 2) for r in range(2)]
    assert halves == [expected[0] + expected[1], expected[2] + expected[3]]
    assert resumed.epoch == 1 and resumed.samples_consumed == 45 * 32


def test_a_sampler_with_another_global_batch_size_is_refused(run_dir: str) -> None:
    ckpt = moai_ckpt.Checkpointer(run_dir)
    ckpt.save(1, {"data": GlobalSampler(100, 8)})
    with pytest.raises(moai_ckpt.StateMismatchError, match="global_batch_size"):
        ckpt.restore({"data": GlobalSampler(100, 16)})
