"""Op capture end to end: runs that capture, diff-ops on planted differences, code-free replay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import moai_ckpt
from moai_ckpt.cli import app
from moai_ckpt.storage import open_storage
from replay.log import LogWriter, read_log
from replay.opdiff import diff_streams
from replay.opstore import list_captures, read_capture
from tests.scenarios.ops_scenario import PERTURBATION, PLANT_ENV, build, one_step, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "250"}


def _stream(run_dir: Path | str, step: int, which: int = 0):  # type: ignore[no-untyped-def]
    storage = open_storage(str(run_dir))
    refs = [r for r in list_captures(storage, step) if r.ranks]
    return read_capture(storage, step, refs[which].label, blobs=False)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 steps: snapshots at 0 and 2, steps 1-3 logged, steps 1 and 3 captured (after_snapshot)."""
    run_dir = tmp_path_factory.mktemp("ops") / "run"
    train(run_dir=str(run_dir), total=3)
    return run_dir


def test_a_run_captures_the_first_step_after_each_snapshot(base_run: Path) -> None:
    assert [r.step for r in list_captures(open_storage(str(base_run)))] == [1, 3]


def test_replay_ops_reexecutes_captures_bitwise_on_cpu_without_importing_the_training_code(base_run: Path) -> None:
    # step 2 has no capture: ask for one (the session re-runs the training function up to it)
    captured = subprocess.run(
        [sys.executable, "-m", "moai_ckpt.cli", "capture", str(base_run), "--step", "2", "--trust-run-json"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert captured.returncode == 0, captured.stderr[-3000:]
    assert "captured step 2" in captured.stdout
    script = (
        "import sys, json\n"
        "from moai_ckpt.cli import app\n"
        "try:\n"
        f"    app(['replay', {str(base_run)!r}, '--ops', '--device', 'cpu', '--json'])\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "print('IMPORTED' if any(m.startswith('tests') for m in sys.modules) else 'CLEAN', code, file=sys.stderr)\n"
    )
    replayed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV)
    assert "CLEAN 0" in replayed.stderr, replayed.stderr[-3000:]
    report = json.loads(replayed.stdout)
    assert [s["step"] for s in report["steps"]] == [1, 2, 3]  # step 2 continues from step 1's replayed state
    for s in report["steps"]:
        assert s["strict"] and s["ops_differing"] == 0 and s["check"]["bitwise"], s


def test_replay_ops_fails_when_the_log_disagrees_on_the_same_device_type(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(run_dir=str(run_dir), total=3)
    storage = open_storage(str(run_dir))
    contents = read_log(storage, 2)
    (three,) = contents.records
    storage.delete_prefix("log/000000000002")
    three = three.model_copy(update={"digests": three.digests.model_copy(update={"loss": 0.5})})
    LogWriter(storage, 2).copy([three], contents)
    result = CliRunner().invoke(app, ["replay", str(run_dir), "--ops", "--device", "cpu"], env={"COLUMNS": "250"})
    assert result.exit_code == 1, result.output
    assert "DIVERGED" in result.output and "step 3: first divergent quantity loss" in result.output


def _one_captured_step(run_dir: Path, plant: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if plant is None:
        monkeypatch.delenv(PLANT_ENV, raising=False)
    else:
        monkeypatch.setenv(PLANT_ENV, plant)
    train(run_dir=str(run_dir), total=1)


def test_diff_ops_finds_the_matmul_computed_in_bfloat16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _one_captured_step(tmp_path / "a", None, monkeypatch)
    _one_captured_step(tmp_path / "b", "bf16", monkeypatch)
    result = CliRunner().invoke(app, ["diff-ops", str(tmp_path / "a"), str(tmp_path / "b"), "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    first = report["first"]
    assert first["kind"] == "block" and first["a_ops"] == ["aten.mm.default"]
    assert "aten.mm.default" in first["b_ops"] and "bfloat16" in first["b_input_dtypes"]
    assert first["input_shapes"] and first["outputs"][0]["max_abs"] > 0
    # the same capture against itself: identical
    same = diff_streams(_stream(tmp_path / "a", 1), _stream(tmp_path / "a", 1))
    assert same.identical and same.first is None


def test_diff_ops_names_the_nondeterministic_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _one_captured_step(tmp_path / "a", "ordered", monkeypatch)
    _one_captured_step(tmp_path / "b", "perturbed", monkeypatch)
    report = diff_streams(_stream(tmp_path / "a", 1), _stream(tmp_path / "b", 1))
    assert report.first is not None and report.first.kind == "op"
    assert report.first.op == "moai_test.ordered_sum.default"
    assert report.first.input_shapes == [[8, 16]]
    err = report.first.outputs[0]
    assert err.max_rel == pytest.approx(PERTURBATION, rel=1e-2) and err.sampled == 16  # the planted change
    assert report.later_diverged > 0  # everything downstream moved, and is not reported as a cause
    assert all(d.op != "aten.div.Tensor" for d in report.independent)


def test_a_replay_after_restart_that_diverges_captures_the_step_and_names_the_op(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    monkeypatch.setenv(PLANT_ENV, "ordered")
    train(run_dir=str(run_dir), total=3)  # step 3 logged after the snapshot of step 2, and captured
    monkeypatch.setenv(PLANT_ENV, "perturbed")  # the restarted run's reduction gives another result
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.raises(moai_ckpt.ReplayDivergenceError) as raised:
        train(run_dir=str(run_dir), total=4)
    assert raised.value.check is not None and raised.value.check.step == 3
    refs = list_captures(open_storage(str(run_dir)), 3)
    # the original run's capture, the restarted run's (step 3 is the first after the snapshot it
    # restored, replayed), and the one made for the divergence by `moai-ckpt capture`
    assert [r.label.rsplit("-", 1)[1] for r in refs] == ["live", "replay", "divergence"]
    report = diff_streams(_stream(run_dir, 3, 0), _stream(run_dir, 3, 2))
    assert report.first is not None and report.first.op == "moai_test.ordered_sum.default"


def test_with_capture_off_a_run_holds_no_capture_hooks(tmp_path: Path) -> None:
    @moai_ckpt.fault_tolerant(storage=str(tmp_path / "run"), snapshot_every=2, capture_ops="never")
    def quiet(run: moai_ckpt.Run) -> object:
        model, opt, data, targets = build()
        run.track(model=model, optim=opt)
        for step in run.steps(3):
            loss, _ = one_step(model, opt, data[step : step + 8], targets[step : step + 8])
            run.record(loss=loss)
        return run._ops

    assert quiet() is None
    assert not list_captures(open_storage(str(tmp_path / "run")))
    with pytest.raises(ValueError, match="capture_ops must be one of"):
        moai_ckpt.fault_tolerant(storage=str(tmp_path / "x"), capture_ops="always")(lambda run: None)()
    torch.manual_seed(0)


def test_a_replay_saved_as_a_capture_diffs_identical_with_the_original_on_the_same_device(base_run: Path) -> None:
    result = CliRunner().invoke(
        app, ["replay", str(base_run), "--ops", "--device", "cpu", "--save-capture", "--step", "1"]
    )
    assert result.exit_code == 0, result.output
    refs = list_captures(open_storage(str(base_run)), 1)
    assert refs[-1].label.endswith("-ops-cpu")
    report = diff_streams(_stream(base_run, 1, 0), _stream(base_run, 1, len(refs) - 1))
    assert report.identical and report.aligned == report.ops_a
