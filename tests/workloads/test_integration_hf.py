"""Hugging Face: a Trainer run killed with SIGKILL resumes bitwise; Accelerate state through moai-ckpt.

The Trainer tests run `tests.scenarios.hf_scenario` as real processes (a causal LM built from a config, a
small in-memory dataset), SIGKILL the run from here in the middle of a drawn step, and resume it on
one process (bitwise) and on two (torchrun; the same global batches, drift reported). The
Accelerate tests run in this process.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face integration needs transformers (the dev extra)")
pytest.importorskip("accelerate", reason="the Hugging Face integration needs accelerate (the dev extra)")

from accelerate import Accelerator
from torch import nn

import moai_ckpt
from moai_ckpt.integrations.hf import load_state, register_state_hooks
from replay.log import history
from tests.scenarios import hf_scenario
from tests.scenarios import integration_runs as runs
from tests.scenarios.hf_scenario import TOTAL_STEPS

# -- Trainer.train() in real processes ------------------------------------------------------------


SCENARIO = "tests.scenarios.hf_scenario"


def train(out_dir: Path, processes: int = 1) -> None:
    if processes == 1:
        runs.run(SCENARIO, out_dir, str(out_dir / "run"), str(out_dir))
    else:  # torchrun's standalone mode: the processes join over a free local port
        launcher = ["--standalone", f"--nproc_per_node={processes}", "-m", SCENARIO]
        runs.run("torch.distributed.run", out_dir, *launcher, str(out_dir / "run"), str(out_dir))


def read(out_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    result = json.loads((out_dir / "result-0.json").read_text())
    losses = [json.loads(line) for line in (out_dir / "losses-0.jsonl").read_text().splitlines()]
    return result, losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[runs.Background]:
    """An uninterrupted run, started now (tests wait for it when they need it)."""
    out = tmp_path_factory.mktemp("reference")
    with runs.Background(SCENARIO, out, str(out / "run"), str(out)) as started:
        yield started


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory, reference: runs.Background) -> tuple[Path, int]:
    """A run SIGKILLed in the forward pass of a drawn step (while the reference runs): its directory, the step.

    The step is drawn among those that leave at least one logged step after the snapshot the
    run resumes from (snapshots every 4 steps; the record of step k - 2 is durable once k starts).
    """
    out = tmp_path_factory.mktemp("killed")
    killed_at = random.Random(41).choice([k for k in range(3, TOTAL_STEPS) if k % 4 in (0, 3)])
    print(f"SIGKILL in the forward pass of step {killed_at} of {TOTAL_STEPS}")
    runs.run_killed_at(SCENARIO, out, killed_at, 1, str(out / "run"), str(out))
    return out, killed_at


@pytest.mark.slow
def test_a_trainer_run_killed_mid_epoch_resumes_at_its_last_completed_step_bitwise(
    tmp_path: Path, reference: runs.Background, killed: tuple[Path, int]
) -> None:
    shutil.copytree(killed[0], tmp_path, dirs_exist_ok=True)
    killed_at = killed[1]
    killed_lines = len(read_losses(tmp_path))
    assert killed_lines == killed_at - 1
    train(tmp_path)
    final, seen = read(tmp_path)
    expected_result, reference_losses = read(reference.wait())
    assert final["tensors"] == expected_result["tensors"]  # per-tensor sha256 of the model and optimizer state
    assert final["scheduler"] == expected_result["scheduler"] and final["rng"] == expected_result["rng"]
    assert final["global_step"] == TOTAL_STEPS and final["epoch"] == expected_result["epoch"]
    expected = {line["step"]: line["loss"] for line in reference_losses}
    assert all(line["loss"] == expected[line["step"]] for line in seen)
    resumed = seen[killed_lines:]
    assert [line["step"] for line in resumed] == list(range(final["resumed_from"] + 1, TOTAL_STEPS + 1))
    resumed_at = next(line["step"] for line in resumed if not line["replayed"])
    assert killed_at - 1 <= resumed_at <= killed_at  # the record of killed_at - 1 may not be durable yet
    report = final["report"]
    assert report["steps"] and report["strict"] and all(s["bitwise"] for s in report["steps"])
    assert [s["step"] for s in report["steps"]] == list(range(final["resumed_from"] + 1, resumed_at))


@pytest.mark.slow
def test_a_trainer_run_resumed_on_two_processes_keeps_the_global_batches_and_reports_drift(
    tmp_path: Path, reference: runs.Background, killed: tuple[Path, int]
) -> None:
    shutil.copytree(killed[0], tmp_path, dirs_exist_ok=True)
    train(tmp_path, processes=2)
    final, _ = read(tmp_path)
    report = final["report"]
    assert final["global_step"] == TOTAL_STEPS
    assert not report["strict"] and report["placement_changes"] == ["world_size: 1 -> 2"]
    assert report["steps"] and all("samples" not in s["mismatches"] for s in report["steps"])
    # the loss each record holds is the Trainer's loss of the whole global batch on any number of
    # processes (dropout draws differ, so it moves a little; a mis-scaled loss would move by 1/2)
    assert all(s["loss_rel"] < 0.1 for s in report["steps"])
    resumed = history(moai_ckpt.Checkpointer(str(tmp_path / "run")).storage)
    original = history(moai_ckpt.Checkpointer(str(reference.wait() / "run")).storage)
    assert sorted(resumed) == sorted(original) == list(range(1, TOTAL_STEPS + 1))
    assert all(resumed[s].samples == original[s].samples for s in original)


def read_losses(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out_dir / "losses-0.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_finished_run_started_again_is_refused_with_the_reason(tmp_path: Path, reference: runs.Background) -> None:
    shutil.copytree(reference.wait() / "run", tmp_path / "run")
    with pytest.raises(ValueError, match=f"already finished: its snapshot is at step {TOTAL_STEPS}"):
        hf_scenario.train(str(tmp_path / "run"), str(tmp_path))  # in this process


# -- Accelerate, in this process ------------------------------------------------------------------


class Counter:
    """An object registered for checkpointing: the samples seen so far."""

    def __init__(self) -> None:
        self.seen = 0

    def state_dict(self) -> dict[str, int]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seen = state["seen"]


def build(seed: int) -> tuple[Accelerator, nn.Module, Any, Any, Counter]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    return accelerator, model, optimizer, scheduler, counter


def steps(accelerator: Accelerator, model: nn.Module, optimizer: Any, scheduler: Any, counter: Counter) -> list[float]:
    """Three training steps (dropout draws from the RNG, which the state must carry too)."""
    losses = []
    for _ in range(3):
        x = torch.randn(8, 5)
        loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        counter.seen += 8
        losses.append(float(loss.detach()))
    return losses


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("loader", ["accelerator.load_state", "moai_ckpt load_state"])
def test_accelerate_state_saved_through_the_hooks_restores_and_training_continues_bitwise(
    tmp_path: Path, loader: str
) -> None:
    accelerator, model, optimizer, scheduler, counter = build(seed=0)
    register_state_hooks(accelerator)
    steps(accelerator, model, optimizer, scheduler, counter)
    accelerator.save_state(str(tmp_path / "ckpt"))
    assert moai_ckpt.Checkpointer(str(tmp_path / "ckpt" / "moai_ckpt")).verify().ok
    assert not list((tmp_path / "ckpt").glob("model*"))  # the weights are in the snapshot only
    after = steps(accelerator, model, optimizer, scheduler, counter)
    expected = weights(model)

    accelerator, model, optimizer, scheduler, counter = build(seed=1)  # other weights, other RNG states
    if loader == "accelerator.load_state":
        register_state_hooks(accelerator)
        accelerator.load_state(str(tmp_path / "ckpt"))
    else:  # nothing unpickled: Accelerate's own files are not read
        load_state(accelerator, str(tmp_path / "ckpt" / "moai_ckpt"))
    assert counter.seen == 24
    assert steps(accelerator, model, optimizer, scheduler, counter) == after
    for name, value in weights(model).items():
        assert torch.equal(value, expected[name]), name


def test_loading_a_directory_saved_without_the_hooks_names_what_is_missing(tmp_path: Path) -> None:
    accelerator = build(seed=0)[0]
    accelerator.save_state(str(tmp_path / "plain"))
    register_state_hooks(accelerator)
    with pytest.raises(moai_ckpt.MoaiCkptError, match="holds no moai-ckpt snapshot"):
        accelerator.load_state(str(tmp_path / "plain"))
