"""The commit protocol: a snapshot exists iff its marker validates; kills never expose half a save."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import moai_ckpt
from moai_ckpt.layout import snapshot_dir

SAVER = r"""
import sys, torch, moai_ckpt
run_dir, start = sys.argv[1], int(sys.argv[2])
ckpt = moai_ckpt.Checkpointer(run_dir, chunk_bytes=1 << 20)
step = start
while True:
    state = {f"t{i}": torch.full((1 << 20,), float(step * 10 + i)) for i in range(6)}
    ckpt.save(step, {"weights": state, "extra": {"step": step}})
    print(step, flush=True)
    step += 1
"""


def expected_state(step: int) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((1 << 20,), float(step * 10 + i)) for i in range(6)}


@pytest.mark.slow
def test_killing_a_saving_process_at_random_moments_never_exposes_a_partial_snapshot(run_dir: str) -> None:
    rng = random.Random(1234)
    next_step = 0
    kills = 0
    while kills < 6:
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVER, run_dir, str(next_step)],
            stdout=subprocess.PIPE,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one save completed in this life
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        ckpt = moai_ckpt.Checkpointer(run_dir)
        steps = ckpt.steps()
        assert steps, "every life committed at least one snapshot"
        for step in steps[-2:]:
            assert ckpt.verify(step).ok
            weights: dict[str, torch.Tensor] = {}
            extra: dict[str, int] = {}
            ckpt.restore({"weights": weights, "extra": extra}, step=step)
            assert extra == {"step": step}
            assert all(torch.equal(weights[k], v) for k, v in expected_state(step).items())
        next_step = steps[-1] + 1
        ckpt.close()
    ckpt = moai_ckpt.Checkpointer(run_dir)
    leftovers = [e.step for e in ckpt.scan() if e.status != "committed"]
    print("uncommitted leftovers after kills:", leftovers)
    ckpt.prune(keep=2)
    remaining = ckpt.scan()
    assert [e.step for e in remaining if e.status == "committed"] == ckpt.steps()[-2:]
    assert all(e.status == "committed" or e.step > ckpt.latest_step() for e in remaining), leftovers


def test_only_committed_snapshots_are_listed(run_dir: str) -> None:
    ckpt = moai_ckpt.Checkpointer(run_dir)
    assert ckpt.steps() == [] and ckpt.latest_step() is None
    for step in (10, 20, 30):
        ckpt.save(step, {"x": {"step": step}})
    os.unlink(os.path.join(run_dir, snapshot_dir(30), "commit.json"))
    os.makedirs(os.path.join(run_dir, "snapshots", "not-a-step"))
    assert ckpt.steps() == [10, 20]
    assert ckpt.latest_step() == 20
    assert {e.step: e.status for e in ckpt.scan()} == {10: "committed", 20: "committed", 30: "uncommitted"}
    target: dict[str, dict] = {"x": {}}
    assert ckpt.restore(target) == 20 and target["x"] == {"step": 20}
    with pytest.raises(moai_ckpt.SnapshotNotFoundError):
        ckpt.restore(target, step=30)


def test_saving_over_a_committed_step_needs_overwrite(run_dir: str) -> None:
    ckpt = moai_ckpt.Checkpointer(run_dir)
    ckpt.save(5, {"x": {"v": 1}})
    with pytest.raises(moai_ckpt.SnapshotExistsError):
        ckpt.save(5, {"x": {"v": 2}})
    ckpt.save(5, {"x": {"v": 3}, "t": torch.ones(2)}, overwrite=True)
    target: dict = {"x": {}}
    ckpt.restore(target)
    assert target["x"] == {"v": 3}


def test_a_leftover_of_an_interrupted_save_is_replaced_cleanly(run_dir: str) -> None:
    ckpt = moai_ckpt.Checkpointer(run_dir)
    ckpt.save(7, {"old": torch.arange(10), "x": {"v": 1}})
    os.unlink(os.path.join(run_dir, snapshot_dir(7), "commit.json"))  # as if killed before commit
    ckpt.save(7, {"x": {"v": 2}})
    assert ckpt.steps() == [7]
    assert not os.path.exists(os.path.join(run_dir, snapshot_dir(7), "old"))
    assert ckpt.verify(7).ok


def test_prune_keeps_the_newest_and_removes_older_snapshots_and_leftovers(run_dir: str) -> None:
    ckpt = moai_ckpt.Checkpointer(run_dir)
    for step in (1, 2, 3, 4):
        ckpt.save(step, {"x": {"step": step}, "t": torch.full((3,), step)})
    os.unlink(os.path.join(run_dir, snapshot_dir(2), "commit.json"))  # leftover below the latest commit
    ckpt.save(5, {"x": {}})
    os.unlink(os.path.join(run_dir, snapshot_dir(5), "commit.json"))  # maybe a save in progress elsewhere
    assert ckpt.prune(keep=2) == [1, 2]
    assert [(e.step, e.status) for e in ckpt.scan()] == [(3, "committed"), (4, "committed"), (5, "uncommitted")]
    assert not os.path.exists(os.path.join(run_dir, snapshot_dir(1)))
    with pytest.raises(ValueError):
        ckpt.prune(keep=0)
    assert ckpt.prune(keep=1, dry_run=True) == [3]
    assert ckpt.steps() == [3, 4]
    old = moai_ckpt.Checkpointer(run_dir, options=moai_ckpt.CheckpointerOptions(leftover_grace_s=0))
    assert old.prune(keep=1) == [3, 5]
    assert old.steps() == [4]


class HoldCommit:
    """Delegates to a storage, but holds the commit-marker write until released."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.reached = threading.Event()
        self.release = threading.Event()

    def create(self, key: str, data: bytes) -> None:
        if key.endswith("/commit.json"):  # the marker is created exclusively, never overwritten
            self.reached.set()
            assert self.release.wait(30), "commit never released"
        self.inner.create(key, data)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_prune_never_touches_a_save_in_progress(run_dir: str) -> None:
    ckpt = moai_ckpt.Checkpointer(run_dir, options=moai_ckpt.CheckpointerOptions(leftover_grace_s=0))
    ckpt.save(1, {"x": {"v": 1}})
    ckpt.save(2, {"x": {"v": 2}})
    held = HoldCommit(ckpt.storage)
    ckpt.storage = held  # type: ignore[assignment]
    saver = threading.Thread(target=ckpt.save, args=(3, {"t": torch.ones(4)}))
    saver.start()
    assert held.reached.wait(30)
    pruned = ckpt.prune(keep=1)  # step 3 is uncommitted and idle-looking, but being written
    held.release.set()
    saver.join()
    assert pruned == [1]
    assert ckpt.steps() == [2, 3]
    assert ckpt.verify(3).ok


def test_option_fields_passed_as_keywords_set_options_and_the_rest_reach_storage(run_dir: str) -> None:
    ckpt = moai_ckpt.Checkpointer(run_dir, collective_timeout_s=7, leftover_grace_s=1, fsync=False)
    assert ckpt.options.collective_timeout_s == 7 and ckpt.options.leftover_grace_s == 1
    assert isinstance(ckpt.storage, moai_ckpt.storage.LocalStorage) and not ckpt.storage.durable
    with pytest.raises(ValueError, match="chunk_bytes"):
        moai_ckpt.Checkpointer(run_dir, chunk_bytes=0)


def test_every_object_is_made_durable_by_one_barrier_before_the_marker(run_dir: str) -> None:
    from tests.helpers import TinyNet

    ckpt = moai_ckpt.Checkpointer(run_dir, chunk_bytes=256)
    events: list[tuple[str, list[str]]] = []
    storage = ckpt.storage
    lock = threading.Lock()
    for op in ("write", "create", "barrier"):
        original = getattr(storage, op)

        def spy(first: object, *rest: object, _op: str = op, _original: object = original) -> object:
            with lock:
                events.append((_op, list(first) if _op == "barrier" else [str(first)]))  # type: ignore[call-overload]
            return _original(first, *rest)  # type: ignore[operator]

        setattr(storage, op, spy)
    model = TinyNet()
    ckpt.save(1, {"model": model, "optim": torch.optim.AdamW(model.parameters())})
    marker = f"{snapshot_dir(1)}/commit.json"
    at = next(i for i, (op, keys) in enumerate(events) if op == "create" and keys == [marker])
    before = events[:at]
    written = {k for op, keys in before if op in ("write", "create") for k in keys if k.startswith(snapshot_dir(1))}
    barriers = [(i, keys) for i, (op, keys) in enumerate(before) if op == "barrier"]
    assert len(barriers) == 1, barriers  # one pass makes chunks, indexes and metadata durable
    index, covered = barriers[0]
    last_write = max(i for i, (op, keys) in enumerate(before) if op == "write" and keys[0].startswith(snapshot_dir(1)))
    assert last_write < index  # nothing of the snapshot is written after the barrier
    # what is not listed was fsync'ed as it was created (the claim)
    assert written - set(covered) <= {f"{snapshot_dir(1)}/claim.json"}
    assert any(k.endswith("/zarr.json") for k in covered) and any("/c." in k for k in covered)
    assert ("barrier", [marker]) in events[at:]  # and the marker itself, before the save returns
