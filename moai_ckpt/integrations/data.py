"""Data loading that resumes mid-epoch at the step training last completed.

A framework's data loader reads ahead of training (Lightning's prefetcher, Accelerate's
look-ahead, worker queues), so the position a loader has *yielded* is not the position training
has *consumed*. Here the position is a `moai_ckpt.GlobalSampler` that only the training loop moves
(`advance`, called once per completed step by `MoaiFaultTolerance` or `MoaiTrainerCallback`); a
new iteration starts where training stands. Snapshotting the position is snapshotting four
integers, and the global batches it names do not depend on how many ranks read them.

- `ResumableBatchSampler`: a batch sampler (``DataLoader(dataset, batch_sampler=...)``) yielding
  this rank's slice of each global batch: for Lightning.
- `ResumableDataset`: an iterable dataset yielding the samples of each global batch in order, for
  loaders that batch them themselves: for the Hugging Face `Trainer`.

Used without a callback (``driven`` False), the position follows what is yielded, as a plain
sampler's does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, Sampler, get_worker_info

from moai_ckpt.sampler import GlobalSampler

T_co = TypeVar("T_co", covariant=True)

__all__ = ["ResumableBatchSampler", "ResumableDataset"]


class _Position:
    """The consumed data position shared by the two loaders below."""

    def __init__(self, num_samples: int, global_batch_size: int, seed: int, shuffle: bool, drop_last: bool) -> None:
        self.position = GlobalSampler(num_samples, global_batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last)
        #: set by the callback that calls `advance` after each completed step
        self.driven = False

    def _view(self) -> GlobalSampler:
        """A copy of the position to iterate with (the position itself moves only in `advance`)."""
        p = self.position
        view = GlobalSampler(p.num_samples, p.global_batch_size, seed=p.seed, shuffle=p.shuffle, drop_last=p.drop_last)
        view.load_state_dict(p.state_dict())
        return view

    def _epoch_batches(self) -> Iterator[list[int]]:
        """The global batches from the current position (read now) to the end of its epoch."""
        view = self._view()
        epoch = view.epoch

        def batches() -> Iterator[list[int]]:
            while view.epoch == epoch:
                batch = view.global_batch()
                view.advance(len(batch))
                if not self.driven:  # nobody reports consumed steps: what is yielded is consumed
                    self.position.load_state_dict(view.state_dict())
                yield batch

        return batches()

    def global_batch(self) -> list[int]:
        """The sample indices of the step training is about to run (the whole global batch)."""
        return self.position.global_batch()

    def advance(self) -> None:
        """One step consumed: the next iteration starts after it."""
        self.position.advance(len(self.position.global_batch()))

    @property
    def steps_per_epoch(self) -> int:
        return self.position.steps_per_epoch

    def state_dict(self) -> dict[str, Any]:
        return self.position.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position.load_state_dict(state)


class ResumableBatchSampler(_Position, Sampler[list[int]]):
    """Batches of sample indices: this rank's contiguous slice of each global batch.

    Epoch ``e`` shuffles with ``randperm(num_samples, seed + e)``; step ``t`` of it trains on the
    same global batch on any number of ranks. ``len()`` is the number of steps of a whole epoch
    (what a trainer counts against); an iteration yields the steps from the position on.

    Args:
        num_samples: the dataset length.
        global_batch_size: samples per optimizer step, summed over every data-parallel rank.
        seed: shuffling seed.
        shuffle: shuffle each epoch (else the natural order).
        drop_last: drop a last partial global batch of each epoch.
        rank: this rank's index (default: from torch.distributed when an iteration starts).
        world_size: the number of data-parallel ranks (default: from torch.distributed).
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        _Position.__init__(self, num_samples, global_batch_size, seed, shuffle, drop_last)
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = self._placement()
        return (GlobalSampler.split(batch, rank, world) for batch in self._epoch_batches())

    def _placement(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __repr__(self) -> str:
        return f"ResumableBatchSampler({self.position!r})"


class ResumableDataset(_Position, IterableDataset[T_co], Generic[T_co]):
    """The samples of a map-style dataset, global batch after global batch, from the position on.

    A loader that groups ``global_batch_size`` consecutive samples into a step's batch (one
    process, or Accelerate dispatching contiguous slices to several) sees exactly the global
    batches of `ResumableBatchSampler`. ``len()`` counts the samples of a whole epoch.

    Args:
        dataset: any indexable dataset (``dataset[i]``, ``len(dataset)``).
        global_batch_size: samples per optimizer step (per-device batch x accumulation x ranks).
        seed, shuffle, drop_last: as for `ResumableBatchSampler`.

    Raises:
        RuntimeError: when iterated by more than one data-loader worker (each would yield
            everything; use ``num_workers=0``, or ``dataloader_num_workers=0`` in transformers).
    """

    def __init__(
        self,
        dataset: Sequence[T_co] | torch.utils.data.Dataset[T_co],
        global_batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        _Position.__init__(self, len(dataset), global_batch_size, seed, shuffle, drop_last)  # type: ignore[arg-type]
        self.dataset = dataset

    def __len__(self) -> int:
        p = self.position
        return p.steps_per_epoch * p.global_batch_size if p.drop_last else p.num_samples

    def __iter__(self) -> Iterator[T_co]:
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise RuntimeError(
                "ResumableDataset is read by several data-loader workers, which would each yield every "
                "sample: use num_workers=0 (dataloader_num_workers=0 in TrainingArguments)"
            )
        return (self.dataset[i] for batch in self._epoch_batches() for i in batch)

    def __repr__(self) -> str:
        return f"ResumableDataset({type(self.dataset).__name__}, {self.position!r})"
