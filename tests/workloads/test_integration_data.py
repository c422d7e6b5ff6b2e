"""The resumable data position the integrations share: iteration starts where training stands."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from moai_ckpt import GlobalSampler, StateMismatchError
from moai_ckpt.integrations.data import ResumableBatchSampler, ResumableDataset


def global_batches(num_samples: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [perm[i : i + batch] for i in range(0, num_samples - batch + 1, batch)]


def test_without_a_callback_the_sampler_goes_through_the_data_epoch_by_epoch() -> None:
    sampler = ResumableBatchSampler(20, 6, seed=4, rank=0, world_size=1)
    assert len(sampler) == 3
    assert list(sampler) == global_batches(20, 6, 4, 0)
    assert list(sampler) == global_batches(20, 6, 4, 1)
    assert sampler.state_dict()["epoch"] == 2


def test_ranks_take_contiguous_slices_of_the_same_global_batches() -> None:
    parts = [list(ResumableBatchSampler(20, 6, seed=4, rank=r, world_size=3)) for r in range(3)]
    joined = [[i for rank in parts for i in rank[step]] for step in range(3)]
    assert joined == global_batches(20, 6, 4, 0)


def test_a_driven_sampler_restarts_at_the_consumed_step_however_far_a_loader_read_ahead() -> None:
    sampler = ResumableBatchSampler(20, 4, seed=1, rank=0, world_size=1)
    sampler.driven = True
    expected = global_batches(20, 4, 1, 0) + global_batches(20, 4, 1, 1)
    ahead = iter(sampler)
    read = [next(ahead) for _ in range(4)]  # a prefetching loader is 4 batches ahead...
    sampler.advance()  # ...of the one step training completed
    assert read == expected[:4]
    assert sampler.global_batch() == expected[1]
    restored = ResumableBatchSampler(20, 4, seed=1, rank=0, world_size=1)
    restored.load_state_dict(sampler.state_dict())  # what a snapshot carries: four integers
    assert list(restored) == expected[1:5]  # the rest of the epoch, from the next step on
    for _ in range(4):
        sampler.advance()
    assert list(sampler) == expected[5:10]  # the epoch ended: the next one starts at its first step


def test_a_position_saved_with_other_settings_is_refused() -> None:
    state = ResumableBatchSampler(20, 4, seed=1).state_dict()
    with pytest.raises(StateMismatchError, match="seed"):
        ResumableBatchSampler(20, 4, seed=2).load_state_dict(state)


def test_the_dataset_yields_the_samples_of_each_global_batch_from_the_consumed_position() -> None:
    data = [{"x": torch.tensor([i])} for i in range(12)]
    dataset = ResumableDataset(data, 4, seed=7)
    dataset.driven = True
    dataset.advance()
    assert len(dataset) == 12
    batches = [b["x"].reshape(-1).tolist() for b in DataLoader(dataset, batch_size=4)]
    sampler = GlobalSampler(12, 4, seed=7)
    sampler.advance()
    assert batches == [sampler.next_batch() for _ in range(2)]


def test_the_dataset_refuses_several_loader_workers() -> None:
    dataset = ResumableDataset([torch.tensor([i]) for i in range(8)], 4)
    with pytest.raises(RuntimeError, match="num_workers=0"):
        list(DataLoader(dataset, batch_size=4, num_workers=2))
