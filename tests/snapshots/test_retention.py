"""Retention policies: which snapshots a prune keeps, on real run directories and real runs.

Each policy alone and combined on a run of many committed snapshots; the newest committed
snapshot and the one a live run's log continues from always survive; `KeepBest` reads the
metric the run logged; a `fault_tolerant` run prunes after each commit, is killed from outside
and still resumes bitwise; ``moai-ckpt prune`` takes the same policies as flags.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from moai_ckpt import Checkpointer, cli
from moai_ckpt.errors import InvalidArgumentError
from moai_ckpt.format import CommitMarker
from moai_ckpt.layout import commit_key
from moai_ckpt.pruning import RunRetention, prune_run, record_metrics
from moai_ckpt.retention import KeepBest, KeepEvery, KeepInterval, KeepLast, parse_duration, policies_of
from moai_ckpt.run.options import RunOptions
from replay.log import history, log_bases

ROOT = Path(__file__).resolve().parents[2]
STEPS = list(range(0, 201, 10))  # 21 committed snapshots
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def loss_at(step: int) -> float:
    """A loss that goes up and down, different at every snapshot step."""
    return ((step * 37) % 101) / 10 + 0.5


def set_commit_time(run_dir: Path, step: int, when: datetime) -> None:
    """Rewrite the commit marker of ``step`` as if it had been committed at ``when`` (sealed again)."""
    path = run_dir / commit_key(step)
    marker = CommitMarker.model_validate_json(path.read_bytes())
    body = marker.body.model_copy(update={"created": when.isoformat(timespec="milliseconds")})
    path.write_bytes(CommitMarker.seal(body).to_bytes())


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of 21 snapshots, each with its loss in the manifest info, committed a minute per step apart."""
    run_dir = tmp_path_factory.mktemp("many") / "run"
    with Checkpointer(str(run_dir)) as ckpt:
        for step in STEPS:
            ckpt.save(step, {"w": torch.full((4,), float(step)), "extra": {"step": step}}, info={"loss": loss_at(step)})
    for step in STEPS:
        set_commit_time(run_dir, step, T0 + timedelta(minutes=step))
    return run_dir


def copy_of(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def best(k: int, mode: str) -> set[int]:
    ranked = sorted(STEPS, key=loss_at, reverse=mode == "max")
    return set(ranked[:k])


CASES = {
    "last 3": ([KeepLast(n=3)], {180, 190, 200}),
    "every 50": ([KeepEvery(steps=50)], {0, 50, 100, 150, 200}),
    "best 3 min": ([KeepBest(metric="loss", k=3)], best(3, "min") | {200}),
    "best 2 max": ([KeepBest(metric="loss", mode="max", k=2)], best(2, "max") | {200}),
    # commit times are `step` minutes after T0: one per 25 minutes is 0, 30, 60, ...
    "interval 25m": ([KeepInterval(every="25m")], {0, 30, 60, 90, 120, 150, 180, 200}),
    "combined": (
        [KeepLast(n=2), KeepEvery(steps=100), KeepBest(metric="loss", k=1), KeepInterval(every="1h30m")],
        {190, 200} | {0, 100, 200} | best(1, "min") | {0, 90, 180},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_policy_alone_and_combined_keeps_what_it_says(many: Path, tmp_path: Path, case: str) -> None:
    policies, expected = CASES[case]
    with Checkpointer(str(copy_of(many, tmp_path / "run"))) as ckpt:
        deleted = ckpt.prune(policies)
        assert ckpt.steps() == sorted(expected)
        assert deleted == sorted(set(STEPS) - expected)
        assert ckpt.prune(policies) == []  # what a policy keeps, it keeps again
    for step in set(STEPS) - expected:
        assert not (tmp_path / "run" / commit_key(step)).parent.exists()


def test_the_newest_committed_snapshot_survives_every_policy(many: Path, tmp_path: Path) -> None:
    with Checkpointer(str(copy_of(many, tmp_path / "run"))) as ckpt:
        worst = max(STEPS, key=loss_at)
        assert worst != 200
        ckpt.prune([KeepEvery(steps=1000), KeepBest(metric="loss", mode="max", k=1)])
        assert ckpt.steps() == [0, worst, 200]  # step 0 is a multiple of 1000; 200 is the newest


def test_keep_best_with_a_metric_nobody_logged_is_an_error_and_deletes_nothing(many: Path, tmp_path: Path) -> None:
    with Checkpointer(str(copy_of(many, tmp_path / "run"))) as ckpt:
        with pytest.raises(InvalidArgumentError, match=r"keep best by 'accuracy'.*logged: loss.*nothing deleted"):
            ckpt.prune([KeepLast(n=1), KeepBest(metric="accuracy", mode="max")])
        assert ckpt.steps() == STEPS


def test_an_int_keep_is_the_last_n_and_bad_policies_say_what_is_wrong() -> None:
    assert policies_of(3) == (KeepLast(n=3),)
    assert policies_of([2, {"kind": "every", "steps": 8}]) == (KeepLast(n=2), KeepEvery(steps=8))
    assert parse_duration("1d12h") == 36 * 3600 and parse_duration(90) == 90
    for bad, message in [
        (0, r"policy 0 \(kind 'last'\), n: .*greater than or equal to 1"),
        ([{"kind": "newest", "n": 2}], "kind must be one of last, every, best, interval"),
        ([{"kind": "best", "metric": "loss", "mode": "lowest"}], r"kind 'best'\), mode"),
        ([{"kind": "interval", "every": "6 parsecs"}], "a duration is a number of seconds or a string such as '6h'"),
        ([], "an empty list"),
        (True, "keep must be an int"),
    ]:
        with pytest.raises(InvalidArgumentError, match=message):
            policies_of(bad)


def test_policies_load_from_toml_yaml_and_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text(
        'storage = "runs/a"\n'
        'keep = [{kind="last", n=3}, {kind="every", steps=1000}, {kind="best", metric="loss", k=2}, '
        '{kind="interval", every="6h"}]\n'
    )
    assert RunOptions(config_file=str(toml)).keep == (
        KeepLast(n=3),
        KeepEvery(steps=1000),
        KeepBest(metric="loss", k=2),
        KeepInterval(every=6 * 3600),
    )
    yaml = tmp_path / "run.yaml"
    yaml.write_text("storage: runs/a\nkeep:\n  - {kind: best, metric: grad_norm, mode: max}\n")
    assert RunOptions(config_file=str(yaml)).keep == (KeepBest(metric="grad_norm", mode="max"),)
    monkeypatch.setenv("MOAI_CKPT_KEEP", "4")
    assert RunOptions(storage="runs/a").keep == (KeepLast(n=4),)
    monkeypatch.setenv("MOAI_CKPT_KEEP", '[{"kind": "every", "steps": 8}]')
    assert RunOptions(storage="runs/a").keep == (KeepEvery(steps=8),)
    assert RunOptions.of("runs/a", keep=2).keep == (KeepLast(n=2),)  # an argument wins over the environment


def test_a_bad_policy_in_a_config_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "run.toml"
    bad.write_text('storage = "runs/a"\nkeep = [{kind="last", n=2}, {kind="every", steps=0}]\n')
    with pytest.raises(ValidationError, match=r"keep: policy 1 \(kind 'every'\), steps: .*greater than or equal to 1"):
        RunOptions(config_file=str(bad))
    with pytest.raises(ValidationError, match="a run's retention is the option keep"):
        RunOptions.of("runs/a", checkpointer={"keep": 2})
    with pytest.raises(InvalidArgumentError, match=r"keep: policy 0: kind must be one of.*\[url="):
        Checkpointer(str(tmp_path / "run")).prune([{"kind": "oldest"}])


def test_a_checkpointer_with_keep_prunes_after_each_commit(tmp_path: Path) -> None:
    with Checkpointer(str(tmp_path / "run"), keep=[KeepLast(n=2), KeepEvery(steps=4)]) as ckpt:
        for step in range(1, 10):
            if step % 2:
                ckpt.save(step, {"w": torch.full((3,), float(step))})
            else:
                handle = ckpt.save_async(step, {"w": torch.full((3,), float(step))})
                assert handle is not None
                handle.result()  # the prune after the commit runs before the handle is done
            last_two = set(range(1, step + 1)[-2:])
            assert ckpt.steps() == sorted(last_two | {s for s in range(1, step + 1) if s % 4 == 0})
    assert ckpt.steps() == [4, 8, 9]


def test_a_run_keeps_the_snapshot_its_log_continues_from_when_newer_ones_failed_their_checks(tmp_path: Path) -> None:
    with Checkpointer(str(tmp_path / "run")) as ckpt:
        for step in (0, 4, 8, 12, 14):
            ckpt.save(step, {"w": torch.full((3,), float(step))})
        retention = RunRetention(ckpt, [KeepLast(n=1)])
        # the run restored 8 (12 and 14 failed their checks), replayed, and committed 12 again
        retention.committed(12, unusable={14})
        retention.close()
        assert ckpt.steps() == [12, 14]  # 14 is the newest committed; 12 is what the log continues
        plain = Checkpointer(str(tmp_path / "run"))
        assert plain.prune(1) == [12]  # without the run's knowledge only the newest is kept
        plain.close()


# -- real runs ---------------------------------------------------------------------------------

TOTAL = 30  # tests.scenarios.ft_scenario snapshots every 4 steps: 0, 4, ..., 28


def scenario(run_dir: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.scenarios.ft_scenario", str(run_dir), str(TOTAL)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=full,
    )


def finished(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """An uninterrupted fault_tolerant run of 30 steps, nothing pruned: its directory and result."""
    run_dir = tmp_path_factory.mktemp("logged") / "run"
    env = {"MOAI_TEST_LOG_SYNC": "1"}
    return run_dir, finished(scenario(run_dir, env))


def logged_losses(run_dir: Path, steps: list[int]) -> dict[int, float]:
    with Checkpointer(str(run_dir)) as ckpt:
        records = history(ckpt.storage)
    return {s: records[s].digests.loss for s in steps if s in records and records[s].digests.loss is not None}


def test_keep_best_reads_the_loss_the_run_logged(logged: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    run_dir = copy_of(logged[0], tmp_path / "run")
    with Checkpointer(str(run_dir)) as ckpt:
        steps = ckpt.steps()
        assert steps == list(range(0, TOTAL, 4))
        losses = logged_losses(run_dir, steps)
        assert sorted(losses) == steps[1:]  # step 0 is the state the function built: no step logged it
        lowest = sorted(losses, key=losses.__getitem__)[:2]
        assert set(lowest) != {steps[-1]}
        plan = prune_run(ckpt, [KeepBest(metric="loss", k=2)])
        assert plan.kept == sorted(set(lowest) | {steps[-1]})
        assert ckpt.steps() == plan.kept
        # the log that holds the metric of the oldest kept snapshot stays: a later prune agrees
        assert prune_run(ckpt, [KeepBest(metric="loss", k=2)]).deleted == []
        assert any(b < plan.kept[0] for b in log_bases(ckpt.storage))


def test_record_metrics_names_the_loss_the_grad_norm_and_the_hyperparameters(
    logged: tuple[Path, dict[str, Any]],
) -> None:
    with Checkpointer(str(logged[0])) as ckpt:
        record = history(ckpt.storage)[8]
    metrics = record_metrics(record)
    assert metrics["loss"] == record.digests.loss and metrics["grad_norm"] == record.digests.grad_norm
    assert any(name.endswith(".lr") for name in metrics)


@pytest.mark.slow
def test_a_run_prunes_after_each_commit_and_resumes_bitwise_after_a_kill_from_outside(
    logged: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    reference = logged[1]
    run_dir = tmp_path / "run"
    stopped = tmp_path / "stopped"
    keep = json.dumps([{"kind": "last", "n": 2}, {"kind": "every", "steps": 12}])
    faults = json.dumps([{"at": "step.begin", "step": 23, "action": "stop", "once": str(stopped)}])
    env = {"MOAI_TEST_LOG_SYNC": "1", "MOAI_CKPT_KEEP": keep}
    proc = scenario(run_dir, {**env, "MOAI_CKPT_FAULTS": faults})
    deadline = time.monotonic() + 240
    while not stopped.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stopped.exists(), proc.communicate(timeout=5)[1][-3000:] if proc.poll() is not None else "no stop in 240 s"
    os.kill(proc.pid, signal.SIGKILL)  # from outside, while it hangs at the start of step 23
    proc.wait(timeout=60)
    with Checkpointer(str(run_dir)) as ckpt:
        before = ckpt.steps()
    assert 0 in before and before[-1] <= 20
    resumed = finished(scenario(run_dir, env))
    assert resumed["digest"] == reference["digest"]  # bitwise what the uninterrupted run ended with
    assert resumed["first_step"] <= 21 and resumed["replayed"] >= 1
    with Checkpointer(str(run_dir)) as ckpt:
        assert ckpt.steps() == [0, 12, 24, 28]  # last 2, and every 12th step
        assert [e.status for e in ckpt.scan()] == ["committed"] * 4  # no leftovers


# -- the command line ----------------------------------------------------------------------------


def invoke(*args: str, expect: int = 0, columns: int = 200) -> Any:
    result = CliRunner().invoke(cli.app, list(args), env={"COLUMNS": str(columns)})
    assert result.exit_code == expect, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result


def kept_by(url: str, *flags: str) -> list[int]:
    report = json.loads(invoke("prune", url, *flags, "--json").stdout)
    with Checkpointer(url) as ckpt:
        assert ckpt.steps() == report["kept"]
    return report["kept"]  # type: ignore[no-any-return]


def test_cli_prune_takes_each_policy_as_a_flag(logged: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    def fresh(name: str) -> str:
        return str(copy_of(logged[0], tmp_path / name))

    assert kept_by(fresh("last"), "--keep-last", "2") == [24, 28]
    assert kept_by(fresh("every"), "--keep-every", "12") == [0, 12, 24, 28]
    losses = logged_losses(logged[0], list(range(4, TOTAL, 4)))
    highest = max(losses, key=losses.__getitem__)
    assert kept_by(fresh("best"), "--keep-best", "loss:max:1") == sorted({highest, 28})
    interval = Path(fresh("interval"))
    for step in range(0, TOTAL, 4):
        set_commit_time(interval, step, T0 + timedelta(minutes=step))
    assert kept_by(str(interval), "--keep-interval", "10m") == [0, 12, 24, 28]
    assert kept_by(fresh("both"), "--keep-last", "1", "--keep-every", "16") == [0, 16, 28]


def test_cli_prune_dry_run_shows_an_80_column_table_and_deletes_nothing(
    logged: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    url = str(copy_of(logged[0], tmp_path / "run"))
    out = invoke("prune", url, "--keep-last", "1", "--keep-every", "12", "--dry-run", columns=80).stdout
    lines = out.splitlines()
    assert lines and max(len(line) for line in lines) <= 80 and "…" not in out
    rows = {int(line.split()[0]): line.split() for line in lines if line.split() and line.split()[0].isdigit()}
    assert sorted(rows) == list(range(0, TOTAL, 4))
    assert {s for s, cells in rows.items() if "delete" in cells} == {4, 8, 16, 20}
    words = " ".join(out.split())  # the title folds where the path is long
    assert "would delete 4" in words and "would keep 4 committed snapshots: 0, 12, 24, 28" in words
    report = json.loads(invoke("prune", url, "--keep-last", "1", "--keep-every", "12", "--dry-run", "--json").stdout)
    assert report["dry_run"] is True and report["deleted"] == [4, 8, 16, 20] and report["kept"] == [0, 12, 24, 28]
    assert report["policies"] == [{"kind": "last", "n": 1}, {"kind": "every", "steps": 12}]
    reasons = {r["step"]: r["reason"] for r in report["snapshots"]}
    assert reasons[28] == "last 1, the newest committed" and reasons[4] == "no policy keeps it"
    with Checkpointer(url) as ckpt:
        assert ckpt.steps() == list(range(0, TOTAL, 4))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ((), "give at least one of --keep-last"),
        (("--keep-interval", "6x"), "a duration is a number of seconds"),
        (("--keep-best", "loss:min:0"), "K >= 1"),
        (("--keep-best", "loss:lowest"), "expected METRIC[:min|max][:K]"),
        (("--keep-last", "0"), "--keep-last"),
    ],
)
def test_cli_prune_refuses_bad_policies(
    logged: tuple[Path, dict[str, Any]], flags: tuple[str, ...], message: str
) -> None:
    result = invoke("prune", str(logged[0]), *flags, expect=2)
    assert message in " ".join(result.stderr.replace("│", " ").split())


def test_cli_prune_by_a_metric_nobody_logged_is_one_line_and_deletes_nothing(
    logged: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    url = str(copy_of(logged[0], tmp_path / "run"))
    result = invoke("prune", url, "--keep-best", "accuracy:max", expect=2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: keep best by 'accuracy'") and "loss" in lines[0]
    with Checkpointer(url) as ckpt:
        assert ckpt.steps() == list(range(0, TOTAL, 4))
