"""`Run.track` refuses what a snapshot cannot hold whole, instead of letting a resumed run drift."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from moai_ckpt import NotResumableError
from moai_ckpt.run import Run
from moai_ckpt.trackable import varies_between_reads

StatefulDataLoader = pytest.importorskip(
    "torchdata.stateful_dataloader", reason="torchdata is not installed"
).StatefulDataLoader


class Points(Dataset[tuple[torch.Tensor, int]]):
    """16 points; ``noise`` picks where each read's augmentation comes from."""

    def __init__(self, noise: str | None) -> None:
        self.base = torch.arange(64, dtype=torch.float32).reshape(16, 4)
        self.noise = noise
        self.rng = torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.base[i]
        if self.noise == "torch":
            x = x + torch.randn(4)
        elif self.noise == "numpy":
            x = x + torch.from_numpy(np.random.normal(size=4).astype(np.float32))
        elif self.noise == "python":
            x = x * (1 + random.random())
        elif self.noise == "own":
            x = x + torch.randn(4, generator=self.rng)
        return x, i


class StatefulPoints(Points):
    """Draws from its own generator and saves it: resumable in workers."""

    def __init__(self) -> None:
        super().__init__("own")

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])


def _seed_worker(worker_id: int) -> None:
    info = get_worker_info()
    assert info is not None
    info.dataset.rng.manual_seed(info.seed)


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    run = Run(str(tmp_path / "run"))
    yield run
    run.close()


@pytest.mark.parametrize("noise", ["torch", "numpy", "python", "own"])
def test_a_loader_whose_workers_draw_unsaved_random_numbers_is_refused_when_tracked(run: Run, noise: str) -> None:
    loader = StatefulDataLoader(Points(noise), batch_size=4, shuffle=True, num_workers=2)
    with pytest.raises(NotResumableError, match="worker processes read samples that change") as err:
        run.track(model=torch.nn.Linear(4, 1), loader=loader)
    assert err.value.key == "loader"
    assert "worker_init_fn" in str(err.value) and "num_workers=0" in str(err.value)
    assert run.tracked == {}  # nothing tracked


def test_the_probe_leaves_every_global_generator_where_it_was() -> None:
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    expected = (torch.rand(3), np.random.random(3), random.random())
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    assert varies_between_reads(Points("torch")) and varies_between_reads(Points("numpy"))
    assert varies_between_reads(Points("python"))
    got = (torch.rand(3), np.random.random(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


@pytest.mark.parametrize(
    "make",
    [
        lambda: StatefulDataLoader(Points(None), batch_size=4, shuffle=True, num_workers=2),  # same sample every read
        lambda: StatefulDataLoader(Points("torch"), batch_size=4, shuffle=True, num_workers=0),  # read in this process
        lambda: StatefulDataLoader(StatefulPoints(), batch_size=4, num_workers=2, worker_init_fn=_seed_worker),
    ],
    ids=["deterministic-items", "no-workers", "stateful-dataset"],
)
def test_resumable_loaders_are_tracked(run: Run, make: Any) -> None:
    loader = make()
    run.track(loader=loader)
    assert run.tracked["loader"] is loader


def test_a_plain_data_loader_is_refused_with_what_to_use_instead(run: Run) -> None:
    with pytest.raises(NotResumableError, match="StatefulDataLoader") as err:
        run.track(data=DataLoader(Points(None), batch_size=4))
    assert err.value.key == "data"


def _resumed_batches(dataset: Dataset[Any], **options: Any) -> tuple[list[Any], list[Any]]:
    """Batches 4-5 of a loader read through, and of a new loader restored from its state after batch 3."""
    first = StatefulDataLoader(dataset, batch_size=2, shuffle=True, num_workers=2, **options)
    batches = iter(first)
    for _ in range(3):
        next(batches)
    state = first.state_dict()
    expected = [next(batches) for _ in range(2)]
    second = StatefulDataLoader(dataset, batch_size=2, shuffle=True, num_workers=2, **options)
    second.load_state_dict(state)
    batches = iter(second)
    return expected, [next(batches) for _ in range(2)]


@pytest.mark.slow
def test_the_refused_loader_really_resumes_with_other_samples_and_the_stateful_one_does_not() -> None:
    """Why the refusal exists: restored workers are re-seeded, so their global generators start over."""
    expected, resumed = _resumed_batches(Points("torch"), generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(expected, resumed, strict=True))  # the same samples...
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(expected, resumed, strict=True))  # ...other noise
    expected, resumed = _resumed_batches(
        StatefulPoints(), generator=torch.Generator().manual_seed(1), worker_init_fn=_seed_worker
    )
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, resumed, strict=True))
