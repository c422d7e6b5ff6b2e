"""A data position that does not depend on the placement.

`GlobalSampler` decides which samples make up each *global* batch from (seed, epoch, step, global
batch size) alone; a rank takes its slice of that batch. So step ``t`` trains on the same samples
whether the job runs on 1, 3 or 64 data-parallel ranks, and a snapshot's data position reshards
with no conversion: it is four integers.
"""

from __future__ import annotations

from typing import Any

import torch

from moai_ckpt.errors import StateMismatchError


class GlobalSampler:
    """Global batches of sample indices, with a position that snapshots as JSON.

    Args:
        num_samples: the dataset length.
        global_batch_size: samples per optimizer step, summed over all data-parallel ranks.
        seed: shuffling seed; epoch ``e`` uses permutation ``randperm(num_samples, seed + e)``.
        shuffle: shuffle each epoch (else the natural order).
        drop_last: drop a last partial batch of an epoch (else it is a smaller batch).

    Example::

        sampler = GlobalSampler(len(dataset), global_batch_size=256, seed=0)
        while training:
            indices = sampler.next_batch(rank, world_size)   # this rank's part of the step
            ...
            ckpt.save(step, {"model": model, "data": sampler})
    """

    def __init__(
        self, num_samples: int, global_batch_size: int, *, seed: int = 0, shuffle: bool = True, drop_last: bool = True
    ) -> None:
        if num_samples <= 0 or global_batch_size <= 0:
            raise ValueError("num_samples and global_batch_size must be positive")
        if drop_last and global_batch_size > num_samples:
            raise ValueError(f"global_batch_size {global_batch_size} exceeds the {num_samples} samples with drop_last")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.step_in_epoch = 0
        self.samples_consumed = 0
        self._perm: tuple[int, torch.Tensor] | None = None

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.global_batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed + epoch)
                perm = torch.randperm(self.num_samples, generator=gen)
            else:
                perm = torch.arange(self.num_samples)
            self._perm = (epoch, perm)
        return self._perm[1]

    def global_batch(self) -> list[int]:
        """The sample indices of the current global step (does not advance)."""
        start = self.step_in_epoch * self.global_batch_size
        return self._permutation(self.epoch)[start : start + self.global_batch_size].tolist()

    @staticmethod
    def split(batch: list[int], rank: int, world_size: int) -> list[int]:
        """A rank's contiguous slice of a global batch; the first ``len % world`` ranks get one more."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        base, extra = divmod(len(batch), world_size)
        start = rank * base + min(rank, extra)
        return batch[start : start + base + (1 if rank < extra else 0)]

    def next_batch(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """This rank's indices for the current global step, then advance to the next step."""
        batch = self.global_batch()
        self.advance(len(batch))
        return self.split(batch, rank, world_size)

    def advance(self, consumed: int | None = None) -> None:
        self.samples_consumed += self.global_batch_size if consumed is None else consumed
        self.step_in_epoch += 1
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "samples_consumed": self.samples_consumed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field in ("num_samples", "global_batch_size", "seed", "shuffle", "drop_last"):
            if state[field] != getattr(self, field):
                raise StateMismatchError(
                    f"sampler {field} is {state[field]!r} in the snapshot but {getattr(self, field)!r} here; "
                    "the data order would change. Build the sampler with the snapshot's settings",
                    key=field,
                )
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.samples_consumed = int(state["samples_consumed"])

    def __repr__(self) -> str:
        return (
            f"GlobalSampler(num_samples={self.num_samples}, global_batch_size={self.global_batch_size}, "
            f"epoch={self.epoch}, step_in_epoch={self.step_in_epoch})"
        )
