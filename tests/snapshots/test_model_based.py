"""Stateful property test: save / failed save / restore / prune against a dict of committed steps."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import moai_ckpt
from moai_ckpt.storage import Buffer, Storage

_runs = itertools.count()


class CrashAfter:
    """Delegates to a storage but dies (like a killed process) on its n-th write."""

    def __init__(self, inner: Storage, n: int) -> None:
        self.inner, self.n = inner, n

    def write(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        self.n -= 1
        if self.n < 0:
            raise KeyboardInterrupt("simulated crash")
        self.inner.write(key, data)

    def create(self, key: str, data: bytes) -> None:  # claims and markers are created exclusively
        self.n -= 1
        if self.n < 0:
            raise KeyboardInterrupt("simulated crash")
        self.inner.create(key, data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


class SnapshotMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ckpt = moai_ckpt.Checkpointer(f"memory://model-based-{next(_runs)}", io_threads=2)
        self.ckpt.acquire()  # the writer lease lives on the real storage, not on a crashing wrapper
        self.model: dict[int, int] = {}

    def state(self, value: int) -> dict[str, object]:
        return {"t": torch.full((3, 2), value, dtype=torch.int64), "extra": {"value": value}}

    @rule(step=st.integers(0, 12), value=st.integers(0, 10**6))
    def save(self, step: int, value: int) -> None:
        if step in self.model:
            with pytest.raises(moai_ckpt.SnapshotExistsError):
                self.ckpt.save(step, self.state(value))
        else:
            self.ckpt.save(step, self.state(value))
            self.model[step] = value

    @rule(step=st.integers(0, 12), value=st.integers(0, 10**6), writes=st.integers(0, 12))
    def crashed_save(self, step: int, value: int, writes: int) -> None:
        real = self.ckpt.storage
        self.ckpt.storage = CrashAfter(real, writes)  # type: ignore[assignment]
        try:
            self.ckpt.save(step, self.state(value), overwrite=True)
        except KeyboardInterrupt:
            self.model.pop(step, None)  # an overwrite un-commits the old snapshot first
        else:
            self.model[step] = value
        finally:
            self.ckpt.storage = real

    @rule(step=st.integers(0, 12))
    def restore(self, step: int) -> None:
        target: dict[str, object] = {"t": torch.zeros(3, 2, dtype=torch.int64), "extra": {}}
        if step not in self.model:
            with pytest.raises(moai_ckpt.SnapshotNotFoundError):
                self.ckpt.restore(target, step=step)
            return
        assert self.ckpt.restore(target, step=step) == step
        assert target["extra"] == {"value": self.model[step]}
        assert torch.equal(target["t"], torch.full((3, 2), self.model[step]))  # type: ignore[arg-type]

    @rule(keep=st.integers(1, 4))
    def prune(self, keep: int) -> None:
        self.ckpt.prune(keep=keep)
        for step in sorted(self.model)[:-keep]:
            del self.model[step]

    @invariant()
    def committed_steps_match_the_model(self) -> None:
        assert self.ckpt.steps() == sorted(self.model)
        assert self.ckpt.latest_step() == (max(self.model) if self.model else None)

    def teardown(self) -> None:
        self.ckpt.close()


SnapshotMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=20, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_snapshot_store_behaves_like_a_dict_of_committed_steps = SnapshotMachine.TestCase
