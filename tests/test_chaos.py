"""The chaos harness: scenarios are validated and drawn reproducibly; a seeded smoke scenario passes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from moai_ckpt.chaos import BUILTIN, Fault, Scenario
from moai_ckpt.testing.chaos import ChaosHarness


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


def test_a_kill_while_the_log_is_written_strikes_the_rank_that_writes_it() -> None:
    kills = Scenario(ranks=4, faults=[Fault(kind="kill")] * 3)
    drawn = [f for seed in range(60) for f in kills.draw(seed)]
    at_log = [f for f in drawn if f.phase in ("log.write", "log.flush")]
    assert at_log and all(f.rank == 0 for f in at_log)
    assert {f.rank for f in drawn if f not in at_log} == {0, 1, 2, 3}
