"""`Run` driven from outside (`start`, `begin_step`, `end_step`, `finish`, `close`), as the integrations drive it."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

import moai_ckpt
from moai_ckpt import MoaiCkptError
from moai_ckpt.run import Run


class Counter:
    """State the caller changes between steps (as a framework's loop progress or epoch counter)."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.value = state["value"]


def _run(run_dir: Path) -> tuple[Run, torch.nn.Module, Counter]:
    """A run tracking a small model, its optimizer and a counter (not started)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    counter = Counter()
    run = Run(str(run_dir), snapshot_every=2, async_snapshots=False, snapshot_at_end=False)
    run.track(model=model, optim=torch.optim.SGD(model.parameters(), lr=0.1), counter=counter)
    return run, model, counter


def _step(run: Run, model: torch.nn.Module, step: int) -> None:
    """One training step between begin_step and end_step, with a little noise from the global RNG."""
    run.begin_step(step)
    optim = run.tracked["optim"]
    loss = (model(torch.ones(1, 2) + torch.randn(1, 2)) ** 2).sum()
    loss.backward()
    optim.step()
    optim.zero_grad()
    run.end_step(step, loss.detach())


def _snapshot_counter(run_dir: Path, step: int) -> int:
    counter = Counter()
    moai_ckpt.Checkpointer(str(run_dir)).restore({"counter": counter}, step=step, restore_rng=False)
    return counter.value


def test_a_new_driven_run_takes_its_base_snapshot_when_its_first_step_begins(tmp_path: Path) -> None:
    run, model, counter = _run(tmp_path / "run")
    try:
        assert run.start() is None  # a new run
        assert moai_ckpt.Checkpointer(str(tmp_path / "run")).steps() == []
        counter.value = 10  # the framework sets things up between the start and the first step
        _step(run, model, 1)
        assert moai_ckpt.Checkpointer(str(tmp_path / "run")).steps() == [0]
        assert _snapshot_counter(tmp_path / "run", 0) == 10
    finally:
        run.close()


def test_a_snapshot_decided_at_a_step_end_is_taken_when_the_next_step_begins(tmp_path: Path) -> None:
    run, model, counter = _run(tmp_path / "run")
    try:
        run.start()
        for step in (1, 2):
            _step(run, model, step)
        assert moai_ckpt.Checkpointer(str(tmp_path / "run")).steps() == [0]  # step 2's is due, not taken yet
        counter.value = 2  # what the caller does between steps 2 and 3 belongs to step 2's state
        run.begin_step(3)
        assert moai_ckpt.Checkpointer(str(tmp_path / "run")).steps() == [0, 2]
        assert _snapshot_counter(tmp_path / "run", 2) == 2
        run.end_step(3, 0.5)
        _step(run, model, 4)
        run.finish()  # the loop ends: the one decided at step 4 has no next step to wait for
        assert moai_ckpt.Checkpointer(str(tmp_path / "run")).steps() == [0, 2, 4]
    finally:
        run.close()


def test_a_restored_driven_run_sets_the_snapshot_rng_again_when_its_first_step_begins(tmp_path: Path) -> None:
    first, model, _ = _run(tmp_path / "run")
    first.start()
    for step in range(1, 5):
        _step(first, model, step)
    first.finish()
    first.close()

    again, model, _ = _run(tmp_path / "run")
    try:
        assert again.start() == 4
        restored = torch.get_rng_state()
        torch.rand(100)  # a framework drawing from the generator before the first step (a new data iterator)
        again.begin_step(5)
        assert torch.equal(torch.get_rng_state(), restored)
        again.end_step(5, 0.5)
        assert not again.replaying  # step 5 is live: the first run finished at step 4
    finally:
        again.close()


def test_the_driven_path_installs_no_signal_handler_and_refuses_steps_out_of_order(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    run, model, _ = _run(tmp_path / "run")
    try:
        with pytest.raises(RuntimeError, match="start"):
            run.begin_step(1)
        run.start()
        _step(run, model, 1)
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
        with pytest.raises(MoaiCkptError, match="step 3 begins after step 1"):
            run.begin_step(3)
        run.begin_step(2)
        with pytest.raises(MoaiCkptError, match="step 5 ends, but step 2 began"):
            run.end_step(5, 0.5)
        with pytest.raises(RuntimeError, match=r"ended without run\.record"):
            run.end_step(2)
    finally:
        run.close(failing=True)
        run.close()  # twice does nothing


def test_a_driven_run_replays_its_logged_steps_and_checks_them(tmp_path: Path) -> None:
    first, model, _ = _run(tmp_path / "run")
    first.start()
    for step in range(1, 6):
        _step(first, model, step)
    first.close()  # killed after step 5: the snapshot of step 4 is the newest, step 5 is in its log
    final = model.weight.detach().clone()

    again, model, _ = _run(tmp_path / "run")
    try:
        assert again.start() == 4
        _step(again, model, 5)
        report = again.finish()
        assert report is not None and report.replayed == 1 and report.bitwise
        assert torch.equal(model.weight, final)
    finally:
        again.close()
