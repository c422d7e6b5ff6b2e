"""`moai-ckpt demo` and its example: a GPT under torchrun, one rank SIGKILLed, recovered bitwise."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import moai_ckpt
from moai_ckpt.tools import gpt
from moai_ckpt.tools.demo import Comparison, DemoOptions, KillPlan, Launch, compare

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpt_demo() -> ModuleType:
    return gpt


def test_the_corpus_is_a_function_of_its_seed(gpt_demo: ModuleType) -> None:
    text = gpt_demo.make_corpus(50_000, seed=4)
    assert len(text) == 50_000
    assert (
        hashlib.sha256(text.encode()).digest() == hashlib.sha256(gpt_demo.make_corpus(50_000, seed=4).encode()).digest()
    )
    assert text != gpt_demo.make_corpus(50_000, seed=5)
    assert set(text) <= set(gpt_demo.VOCAB) and len(set(text)) > 20
    assert text.count(".") > 500 and "\n" in text  # sentences on lines, not noise


def test_sample_i_is_a_fixed_window_of_the_corpus(gpt_demo: ModuleType) -> None:
    tokens = gpt_demo.encode(gpt_demo.make_corpus(5_000))
    inputs, targets = gpt_demo.windows(tokens, [3, 0], context=16, stride=8)
    assert torch.equal(inputs[0], tokens[24:40]) and torch.equal(targets[0], tokens[25:41])
    assert torch.equal(inputs[1], tokens[0:16])
    last = gpt_demo.num_samples(tokens, 16, 8) - 1
    assert gpt_demo.windows(tokens, [last], 16, 8)[1].shape == (1, 16)


def test_the_model_is_causal_tied_and_uses_dropout(gpt_demo: ModuleType) -> None:
    torch.manual_seed(0)
    model = gpt_demo.GPT(gpt_demo.GPTConfig(context=16, dim=32, layers=2, heads=4, dropout=0.1))
    assert model.head.weight is model.tok.weight
    x = torch.randint(0, len(gpt_demo.VOCAB), (2, 16))
    model.eval()
    changed = x.clone()
    changed[:, 10] = (changed[:, 10] + 1) % len(gpt_demo.VOCAB)
    assert torch.equal(model(x)[:, :10], model(changed)[:, :10])  # no position sees the future
    model.train()
    assert not torch.equal(model(x), model(x))  # dropout draws from the RNG


def test_the_fault_tolerant_train_function_trains_and_snapshots(gpt_demo: ModuleType, tmp_path: Path) -> None:
    events = tmp_path / "progress.jsonl"
    train = moai_ckpt.fault_tolerant(storage=str(tmp_path / "run"), snapshot_every=2)(gpt_demo.train.__wrapped__)
    kwargs: dict[str, Any] = {"corpus_chars": 20_000, "dim": 32, "layers": 1, "batch_size": 8, "warmup": 1}
    out = train(steps=3, seed=1, progress=str(events), **kwargs)
    assert sorted(int(s) for s in out["losses"]) == [1, 2, 3] and out["replayed"] == 0 and out["first_live_step"] == 1
    assert all(2.0 < loss < 4.0 for loss in out["losses"].values())  # about ln(32) at the start
    torch.manual_seed(1)
    untrained = gpt_demo.GPT(gpt_demo.GPTConfig(dim=32, layers=1))
    assert len(out["digest"]) == 64 and out["digest"] != gpt_demo.param_digest(untrained)
    assert moai_ckpt.Checkpointer(str(tmp_path / "run")).steps() == [0, 2, 3]  # and the last step, as the loop ends
    kinds = [json.loads(line)["event"] for line in events.read_text().splitlines()]
    assert kinds == ["start", "resume", "live", "step", "step", "step", "done"]
    again = moai_ckpt.fault_tolerant(storage=str(tmp_path / "again"), snapshot_every=2)(gpt_demo.train.__wrapped__)
    assert again(steps=3, seed=1, **kwargs)["digest"] == out["digest"]  # a function of its arguments


def _launch(name: str, events: list[dict[str, Any]], digest: str, restarts: int = 0) -> Launch:
    return Launch(name, Path("/nonexistent"), events=events, result={"digest": digest, "restart_count": restarts})


def _steps(attempt: int, losses: dict[int, float], replayed: bool = False) -> list[dict[str, Any]]:
    return [
        {"event": "step", "attempt": attempt, "step": s, "loss": v, "replayed": replayed} for s, v in losses.items()
    ]


def _comparison(recovered_losses: dict[int, float], fired: bool = True) -> Comparison:
    options = DemoOptions(steps=8, snapshot_every=2)
    ref = {s: 3.0 - s / 10 for s in range(1, 9)}
    reference = _launch("uninterrupted", _steps(0, ref), "d1")
    events = [
        *_steps(0, {s: ref[s] for s in (1, 2, 3, 4)}),
        {"event": "resume", "attempt": 1, "step": 2, "t": 0.0},
        *_steps(1, {s: ref[s] for s in (3, 4)}, replayed=True),
        *_steps(1, {s: recovered_losses.get(s, ref[s]) for s in (5, 6, 7, 8)}),
    ]
    recovered = _launch("recovered", events, "d1", restarts=1)
    kill = KillPlan(step=5, phase="forward", rank=1)
    return compare(options, kill, reference, recovered, {"step": 5, "rank": 1, "at": "forward"} if fired else None)


def test_the_comparison_needs_a_kill_and_every_step_equal() -> None:
    good = _comparison({})
    assert good.bitwise_equal and good.equal_steps == 8 and good.lost == [] and good.restored_step == 2
    assert [r.how for r in good.rows] == ["live"] * 2 + ["replayed"] * 2 + ["restarted"] * 4
    assert not _comparison({}, fired=False).bitwise_equal  # a run that was never killed proves nothing
    off = _comparison({7: 2.3 + 1e-7})
    assert not off.bitwise_equal and [r.step for r in off.rows if not r.equal] == [7]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_demo_kills_a_rank_under_torchrun_and_recovers_bitwise(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "moai_ckpt.cli", "demo", "--dir", str(tmp_path), "--steps", "24", "--seed", "3"],
        capture_output=True,
        text=True,
        timeout=220,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "160", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "bitwise equal" in result.stdout and "runs differ" not in result.stdout
    (demo_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((demo_dir / "comparison.json").read_text())
    kill = KillPlan.draw(DemoOptions(steps=24, seed=3))
    assert summary["bitwise_equal"] and summary["digest_equal"] and summary["equal_steps"] == 24
    assert summary["fired"]["step"] == kill.step and summary["fired"]["at"] == kill.phase  # the planned kill happened
    assert summary["restarts"] == 1 and summary["lost_steps"] == []
    assert summary["restored_step"] + summary["replayed"] == kill.step - 1  # resumed at the last completed step
    assert summary["digests"]["reference"] == summary["digests"]["recovered"] is not None
    workers = (demo_dir / "recovered" / "scratch" / "workers.log").read_text()
    assert "exitcode: -9" in workers  # torchrun saw a worker die of SIGKILL
    (phases,) = summary["restart_phases"]  # the restart's report, shown as a table
    assert phases["restore_tier"] == "persistent" and phases["replayed_steps"] == summary["replayed"]
    assert "restart phases" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_demo_with_a_local_tier_restarts_from_it_and_recovers_bitwise(tmp_path: Path) -> None:
    demo = [sys.executable, "-m", "moai_ckpt.cli", "demo", "--dir", str(tmp_path), "--steps", "24", "--seed", "3"]
    result = subprocess.run(
        [*demo, "--local-every", "2"],
        capture_output=True,
        text=True,
        timeout=220,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "160", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (demo_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((demo_dir / "comparison.json").read_text())
    assert summary["bitwise_equal"] and summary["lost_steps"] == []
    (phases,) = summary["restart_phases"]
    # the newest local snapshot may still have been written in the background when the rank died:
    # then the one before it (at most 2 * local_every - 1 steps to replay)
    assert phases["restore_tier"] == "local" and summary["replayed"] <= 3
    assert summary["restored_step"] % 2 == 0
    assert "restart phases" in result.stdout and "local" in result.stdout
    assert not list(Path("/dev/shm").glob(f"moai-demo-{demo_dir.name}-*"))  # host memory given back
