"""The chaos harness: scenarios are validated and drawn reproducibly; a seeded smoke scenario passes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from moai_ckpt.testing.chaos import ChaosHarness
from moai_ckpt.tools.chaos import BUILTIN, Fault, Scenario


def test_a_scenario_refuses_faults_it_cannot_place() -> None:
    with pytest.raises(ValidationError, match="at or after the last step"):
        Scenario(steps=10, kwargs={"steps": 10}, faults=[Fault(kind="kill", step=10)])
    with pytest.raises(ValidationError, match="names rank 3 of 2"):
        Scenario(ranks=2, faults=[Fault(kind="kill", rank=3)])
    with pytest.raises(ValidationError):
        Fault(kind="meteor")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no scenario"):
        Scenario.load("no-such-scenario")


def test_faults_are_drawn_from_the_seed_alone() -> None:
    smoke = BUILTIN["smoke"]
    assert smoke.draw(5) == smoke.draw(5)
    assert any(smoke.draw(5) != smoke.draw(s) for s in range(6, 12))
    for fault in smoke.draw(7):
        assert fault.step is not None and 2 <= fault.step <= smoke.steps - 2
        if fault.kind == "kill":
            assert fault.rank is not None and fault.phase is not None
    assert [f.step for f in smoke.draw(7)] == sorted(f.step or 0 for f in smoke.draw(7))


def test_a_scenario_file_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"name": "mine", "ranks": 2, "faults": [{"kind": "kill_all", "step": 5}]}))
    loaded = Scenario.load(str(path))
    assert loaded.name == "mine" and loaded.faults[0].kind == "kill_all"
    path.write_text(json.dumps({"name": "mine", "faults": [{"kind": "kill", "when": 5}]}))
    with pytest.raises(ValidationError, match="when"):
        Scenario.load(str(path))


@pytest.mark.slow
def test_the_smoke_scenario_survives_its_faults_bitwise(chaos: ChaosHarness) -> None:
    """CI's chaos run: 2 ranks; a kill, all ranks killed, a flipped chunk, flaky storage."""
    smoke = BUILTIN["smoke"]
    report = chaos.run(faults=[f.model_dump(exclude_none=True) for f in smoke.faults], steps=30, seed=3)
    report.assert_ok()
    assert len(report.faulty.attempts) >= 3  # two kills and a stop for the bit flip: three restarts
    kinds = {r.fault.kind: r for r in report.faulty.faults}
    assert "restore refused" in (kinds["corrupt_chunk"].detected or "")
    assert kinds["storage_transient"].count > 0
    assert report.timeline and Path(report.timeline).stat().st_size > 10_000


def test_a_kill_where_only_the_coordinator_works_strikes_the_coordinator() -> None:
    """Rank 0 alone writes the log and the commit marker: a kill drawn there must strike it."""
    kills = Scenario(ranks=4, faults=[Fault(kind="kill")] * 3)
    drawn = [f for seed in range(60) for f in kills.draw(seed)]
    at_log = [f for f in drawn if f.phase in ("log.write", "log.flush", "snapshot.commit")]
    assert at_log and all(f.rank == 0 for f in at_log)
    assert {f.rank for f in drawn if f not in at_log} == {0, 1, 2, 3}


@pytest.mark.slow
def test_a_lost_node_is_recovered_bitwise(chaos: ChaosHarness) -> None:
    """Two torchrun agents on one c10d rendezvous; one dies with its rank, as a node would."""
    report = chaos.run(faults=[{"kind": "node_loss", "phase": "backward"}], steps=16, nodes=2, seed=1)
    report.assert_ok()
    lost = report.faulty.faults[0]
    first = report.faulty.attempts[0]
    assert len(first.node_codes) == 2 and -9 in first.node_codes  # one agent SIGKILLed, the other failed
    assert (lost.detected or "").startswith("node lost") and lost.recovery_s is not None


@pytest.mark.slow
def test_a_run_handed_off_midway_is_continued_by_the_same_command(tmp_path: Path) -> None:
    """A ``handoff`` stops the run; the same command continues it (on another machine, in real use)."""
    from moai_ckpt.tools.chaos import run_trials

    scenario = Scenario(name="handoff", kwargs={"steps": 16, "batch_size": 16}, faults=[Fault(kind="handoff", step=7)])
    first = run_trials(scenario, tmp_path, trials=1)
    assert first.trials[0].faulty.handed_off and not first.trials[0].ok
    assert (tmp_path / "seed-0" / "faulty" / "handoff.json").exists()
    reference_marker = (tmp_path / "reference" / "finished.json").stat().st_mtime
    second = run_trials(scenario, tmp_path, trials=1)
    report = second.trials[0]
    report.assert_ok()
    assert (tmp_path / "reference" / "finished.json").stat().st_mtime == reference_marker  # not run again
    assert (report.faulty.faults[0].detected or "").startswith("continued on")
    assert report.verdict.max_rel_diff == 0.0  # same device type here: nothing drifted
    assert [a.number for a in report.faulty.attempts] == [0, 1]


def test_node_loss_and_device_change_need_what_they_act_on() -> None:
    with pytest.raises(ValidationError, match="nodes >= 2"):
        Scenario(faults=[Fault(kind="node_loss")])
    with pytest.raises(ValidationError, match="names its device"):
        Scenario(faults=[Fault(kind="device_change")])
    with pytest.raises(ValidationError, match="split evenly"):
        Scenario(ranks=3, nodes=2)
    assert all(f.rank is not None for f in BUILTIN["node-loss"].draw(4))


ZOO = Path(__file__).resolve().parents[1] / "workloads"


@pytest.mark.slow
@pytest.mark.parametrize(("script", "ranks", "seed"), [("fsdp2.py", 2, 11), ("hf_causal_lm.py", 1, 12)])
def test_zoo_workloads_survive_seeded_random_faults_bitwise(script: str, ranks: int, seed: int, tmp_path: Path) -> None:
    """Users' scripts of the workload zoo (tests/workloads/) under 3 faults of random kinds, drawn from the seed."""
    from moai_ckpt.tools.chaos import run_trial

    job = Scenario(
        name=f"zoo-{script.removesuffix('.py')}",
        entrypoint=f"{ZOO / script}:train",
        kwargs={"steps": 24},
        storage_kwarg="run_dir",
        ranks=ranks,
    )
    scenario = job.with_random_faults(3, seed)
    report = run_trial(scenario, tmp_path, seed, quiet=True)
    report.assert_ok()
    assert len(report.faulty.faults) == 3 and all(r.fired_at is not None for r in report.faulty.faults)
    assert report.verdict.differing == [] and report.verdict.max_rel_diff == 0.0


def test_the_cli_refuses_kwargs_that_are_not_a_json_object(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from moai_ckpt import cli

    result = CliRunner().invoke(
        cli.app, ["chaos", "run", "smoke", "--entrypoint", "x.py:train", "--kwargs", "[1]", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "JSON object" in result.output
    assert not any(tmp_path.iterdir())  # nothing ran


@pytest.mark.slow
def test_the_cli_runs_a_scenario_on_a_job_named_by_entrypoint(tmp_path: Path) -> None:
    """``moai-ckpt chaos run FILE --entrypoint ... --storage-kwarg ...``: the scenario's faults, another job."""
    from typer.testing import CliRunner

    from moai_ckpt import cli

    scenario = tmp_path / "one-kill.json"
    scenario.write_text(json.dumps({"name": "one-kill", "ranks": 1, "faults": [{"kind": "kill", "step": 5}]}))
    args = ["chaos", "run", str(scenario), "--entrypoint", f"{ZOO / 'lstm_tbptt.py'}:train"]
    args += ["--storage-kwarg", "run_dir", "--steps", "10", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(cli.app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    trial = report["results"][0]
    assert trial["ok"] and trial["faults"][0]["fired_step"] == 5 and len(trial["attempts"]) == 2
    assert (tmp_path / "out" / "reference" / "run" / "snapshots").is_dir()
