"""Hugging Face: a Trainer run killed with SIGKILL resumes bitwise; Accelerate state through moai-ckpt.

The Trainer test runs `tests.hf_scenario` as real processes (a causal LM built from a config, a
small in-memory dataset) and SIGKILLs the run from here in the middle of a drawn step. The
Accelerate tests run in this process.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
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
from tests.hf_scenario import TOTAL_STEPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- Trainer.train() in real processes ------------------------------------------------------------


def _env(pause_at: int | None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("MOAI_TEST_PAUSE_AT", None)
    if pause_at is not None:
        env["MOAI_TEST_PAUSE_AT"] = str(pause_at)
    return env


def train(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tests.hf_scenario", str(out_dir / "run"), str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env=_env(None))
    assert proc.returncode == 0, proc.stderr[-4000:]


def train_killed_at(out_dir: Path, step: int) -> None:
    """A run SIGKILLed while it is in the forward pass of ``step``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tests.hf_scenario", str(out_dir / "run"), str(out_dir)]
    with open(out_dir / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(step), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not (out_dir / "paused").exists():
            assert proc.poll() is None, (out_dir / "killed.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the run never reached the step to kill"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL


def read(out_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    result = json.loads((out_dir / "result.json").read_text())
    losses = [json.loads(line) for line in (out_dir / "losses.jsonl").read_text().splitlines()]
    return result, losses


@pytest.mark.slow
def test_a_trainer_run_killed_mid_epoch_resumes_at_its_last_completed_step_bitwise(tmp_path: Path) -> None:
    train(tmp_path / "reference")
    reference, reference_losses = read(tmp_path / "reference")
    killed_at = random.Random(41).randint(2, TOTAL_STEPS - 1)
    print(f"SIGKILL in the forward pass of step {killed_at} of {TOTAL_STEPS}")
    out = tmp_path / "killed"
    train_killed_at(out, killed_at)
    killed_lines = len((out / "losses.jsonl").read_text().splitlines())
    assert killed_lines == killed_at - 1
    train(out)
    final, seen = read(out)
    assert final["tensors"] == reference["tensors"]  # per-tensor sha256 of the model and optimizer state
    assert final["scheduler"] == reference["scheduler"] and final["rng"] == reference["rng"]
    assert final["global_step"] == TOTAL_STEPS and final["epoch"] == reference["epoch"]
    expected = {line["step"]: line["loss"] for line in reference_losses}
    assert all(line["loss"] == expected[line["step"]] for line in seen)
    resumed = seen[killed_lines:]
    assert [line["step"] for line in resumed] == list(range(final["resumed_from"] + 1, TOTAL_STEPS + 1))
    resumed_at = next(line["step"] for line in resumed if not line["replayed"])
    assert killed_at - 1 <= resumed_at <= killed_at  # the record of killed_at - 1 may not be durable yet
    report = final["report"]
    assert report["strict"] and all(s["bitwise"] for s in report["steps"])
    assert [s["step"] for s in report["steps"]] == list(range(final["resumed_from"] + 1, resumed_at))


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
        losses.append(float(loss))
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
