"""Refusals at `Run.track`: objects whose state a snapshot cannot hold whole.

A resumed run is bitwise equal to an uninterrupted one only if everything that decides its next
steps is in the snapshot or the log. Some objects keep part of that state where moai-ckpt cannot
reach it; tracking one would not fail, it would drift silently after a restart. Those are refused
here, when they are tracked, with what to do instead:

- a ``torch.utils.data.DataLoader`` without ``state_dict`` (its position is lost on a restart);
- a data loader whose worker processes read samples that change from one read to the next (random
  augmentation drawn in the workers from their global generators, or from a generator of the
  dataset that is not saved): a worker's generators live in the worker process, and a restarted
  loader re-seeds them, so the samples after a restart differ. torchdata's
  ``StatefulDataLoader`` saves each worker's *dataset* state, so a Stateful dataset that owns its
  generator is resumable, and so is any dataset whose items do not vary between reads.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from moai_ckpt.errors import NotResumableError

__all__ = ["NotResumableError", "check_trackable", "varies_between_reads"]

_PROBE_SEEDS = (0, 1, 2, 3)  # reads of one item under different global seeds; all equal => it does not vary


def check_trackable(key: str, obj: Any) -> None:
    """Raise `NotResumableError` if ``obj``, tracked as ``key``, cannot be resumed bitwise."""
    if isinstance(obj, torch.utils.data.DataLoader):
        _check_loader(key, obj)


def _check_loader(key: str, loader: torch.utils.data.DataLoader[Any]) -> None:
    if not callable(getattr(loader, "state_dict", None)):
        raise NotResumableError(
            "a torch DataLoader has no state_dict: a restarted run could not continue where it stopped. "
            "Use torchdata's StatefulDataLoader (tracked), or run.sampler(...) with run.batch() to index "
            "the dataset yourself",
            key=key,
        )
    if loader.num_workers == 0:
        return  # samples are read in this process: its generators are in every snapshot and log record
    dataset = loader.dataset
    if isinstance(dataset, torch.utils.data.IterableDataset) or callable(getattr(dataset, "state_dict", None)):
        return  # a Stateful dataset: StatefulDataLoader saves each worker's copy of its state
    if varies_between_reads(dataset):
        raise NotResumableError(
            f"the data loader's {loader.num_workers} worker processes read samples that change from one read "
            "to the next (dataset[0] differs under different seeds: random augmentation), and the random "
            "generators they draw from live in the workers, where no snapshot reaches them: after a restart "
            "the workers are seeded afresh and the run would silently get other samples. Give the dataset "
            "its own torch.Generator, seeded per worker in worker_init_fn and saved by the dataset's "
            "state_dict / load_state_dict (StatefulDataLoader then saves each worker's), or draw the "
            "augmentation from a generator seeded by the sample index and epoch, or set num_workers=0",
            key=key,
        )


def varies_between_reads(dataset: Any) -> bool:
    """Whether ``dataset[0]`` differs between reads under different global seeds (torch CPU, numpy,
    Python). Every global generator is put back as it was; a dataset that cannot be read (empty,
    or raising) is not judged."""
    try:
        if len(dataset) == 0:
            return False
    except TypeError:
        return False
    numpy_state, python_state = np.random.get_state(), random.getstate()
    reads = []
    with torch.random.fork_rng(devices=[]):
        try:
            for seed in _PROBE_SEEDS:
                torch.default_generator.manual_seed(seed)  # the CPU generator only: fork_rng puts it back
                np.random.seed(seed)
                random.seed(seed)
                reads.append(dataset[0])
        except Exception:  # noqa: BLE001 - the user's dataset may fail in any way here; it is then not judged
            return False
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)
    return any(not _same(reads[0], other) for other in reads[1:])


def _same(a: Any, b: Any) -> bool:
    """Structural equality of two samples, tensors and arrays bit for bit (a NaN equals itself)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        return a.dtype == b.dtype and a.shape == b.shape and _bytes(a) == _bytes(b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        x, y = np.asarray(a), np.asarray(b)
        return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared are not judged
        return True


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
