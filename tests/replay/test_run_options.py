"""`RunOptions`: one model for the decorator, `Run` and the integrations, from arguments, environment or a file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import moai_ckpt
from moai_ckpt.integrations.driver import integration_options
from moai_ckpt.run import RunOptions


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MOAI_CKPT_* option of the caller's shell reaches these tests."""
    for name in list(os.environ):
        if name.startswith("MOAI_CKPT_"):
            monkeypatch.delenv(name)


def test_arguments_win_over_the_environment_which_wins_over_the_file_which_wins_over_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "moai.toml"
    config.write_text(
        'storage = "from-file"\nsnapshot_every = 7\nsnapshot_every_s = 30.0\nlog_lag = 3\nasync_snapshots = false\n'
    )
    monkeypatch.setenv("MOAI_CKPT_CONFIG_FILE", str(config))
    monkeypatch.setenv("MOAI_CKPT_SNAPSHOT_EVERY_S", "60")
    monkeypatch.setenv("MOAI_CKPT_LOG_LAG", "2")
    options = RunOptions(log_lag=4)
    assert options.storage == "from-file" and options.snapshot_every == 7 and not options.async_snapshots  # file
    assert options.snapshot_every_s == 60.0  # the environment over the file
    assert options.log_lag == 4  # the argument over both
    assert options.log_flush_every == 1 and options.capture_ops == "on_divergence"  # defaults


def test_nested_options_merge_across_a_yaml_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "moai.yaml"
    config.write_text(
        "storage: runs/x\ncheckpointer:\n  collective_timeout_s: 60\n  io_threads: 2\n"
        "storage_options:\n  fsync: false\nrecord_args: [run_dir]\n"
    )
    monkeypatch.setenv("MOAI_CKPT_CHECKPOINTER__IO_THREADS", "3")
    monkeypatch.setenv("MOAI_CKPT_SNAPSHOT_EVERY", "null")
    monkeypatch.setenv("MOAI_CKPT_SNAPSHOT_EVERY_S", "5")
    options = RunOptions(config_file=str(config))
    assert options.checkpointer.collective_timeout_s == 60.0 and options.checkpointer.io_threads == 3
    assert options.storage_options == {"fsync": False} and options.record_args == frozenset({"run_dir"})
    assert options.snapshot_every is None and options.snapshot_every_s == 5.0


def test_keyword_options_are_sorted_into_run_checkpointer_and_storage_options() -> None:
    options = RunOptions.of("runs/x", snapshot_every=5, chunk_bytes=1 << 20, endpoint_url="http://localhost:9000")
    assert options.storage == "runs/x" and options.snapshot_every == 5
    assert options.checkpointer.chunk_bytes == 1 << 20
    assert options.storage_options == {"endpoint_url": "http://localhost:9000"}
    assert RunOptions.of("x", log_sync=True).lag == 0 and RunOptions.of("x", log_lag=0).lag == 0
    assert RunOptions.of("x", log_lag=3).lag == 3


def test_bad_options_are_refused_naming_the_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="snapshot_every"):
        RunOptions(storage="x", snapshot_every=0)
    with pytest.raises(ValueError, match="set snapshot_every, snapshot_every_s or both"):
        RunOptions(storage="x", snapshot_every=None)
    with pytest.raises(ValueError, match="capture_ops must be one of"):
        RunOptions(storage="x", capture_ops="always")
    with pytest.raises(TypeError, match="record_args"):
        RunOptions(storage="x", record_args="run_dir")
    with pytest.raises(ValidationError, match="storage"):
        RunOptions()  # nowhere to write
    monkeypatch.setenv("MOAI_CKPT_LOG_LAG", "-1")
    with pytest.raises(ValidationError, match="log_lag"):
        RunOptions(storage="x")
    monkeypatch.delenv("MOAI_CKPT_LOG_LAG")
    typo = tmp_path / "typo.toml"
    typo.write_text('storage = "x"\nsnapshot_evry = 5\n')
    with pytest.raises(ValidationError, match="snapshot_evry"):
        RunOptions(config_file=str(typo))
    with pytest.raises(ValueError, match=r"config_file: .* is not a file"):
        RunOptions(config_file=str(tmp_path / "missing.toml"))
    wrong = tmp_path / "moai.json"
    wrong.write_text("{}")
    with pytest.raises(ValueError, match=r"neither \.toml nor \.yaml"):
        RunOptions(config_file=str(wrong))


def test_options_are_frozen() -> None:
    options = RunOptions(storage="x")
    with pytest.raises(ValidationError):
        options.snapshot_every = 3  # type: ignore[misc]


def _train(run: moai_ckpt.Run, run_dir: str) -> int | None:
    model = torch.nn.Linear(2, 1)
    run.track(model=model)
    for _ in run.steps(7):
        run.record(loss=model(torch.ones(1, 2)).sum())
    return run.options.snapshot_every


def _snapshots(run_dir: Path) -> list[int]:
    return moai_ckpt.Checkpointer(str(run_dir)).steps()


def test_the_environment_sets_the_snapshots_of_a_decorated_function(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOAI_CKPT_SNAPSHOT_EVERY", "3")
    monkeypatch.setenv("MOAI_CKPT_SNAPSHOT_AT_END", "false")
    train = moai_ckpt.fault_tolerant(storage="{run_dir}")(_train)
    assert train(run_dir=str(tmp_path / "env")) == 3
    assert _snapshots(tmp_path / "env") == [0, 3, 6]


def test_the_decorator_takes_keywords_or_one_options_model_with_the_same_effect(tmp_path: Path) -> None:
    by_keywords = moai_ckpt.fault_tolerant(storage="{run_dir}", snapshot_every=2, snapshot_at_end=False)(_train)
    options = RunOptions(storage="{run_dir}", snapshot_every=2, snapshot_at_end=False)
    by_model = moai_ckpt.fault_tolerant(options=options)(_train)
    assert by_keywords(run_dir=str(tmp_path / "a")) == by_model(run_dir=str(tmp_path / "b")) == 2
    assert _snapshots(tmp_path / "a") == _snapshots(tmp_path / "b") == [0, 2, 4, 6]
    with pytest.raises(TypeError, match="not both"):
        moai_ckpt.fault_tolerant(options=options, snapshot_every=3)


def test_the_integrations_leave_out_state_digests_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not integration_options("runs/x", snapshot_every=4).state_digests
    assert integration_options("runs/x", state_digests=True).state_digests
    assert integration_options("runs/y", RunOptions(storage="ignored", state_digests=True)).storage == "runs/y"
    monkeypatch.setenv("MOAI_CKPT_STATE_DIGESTS", "true")
    assert integration_options("runs/x").state_digests
    assert json.loads(integration_options("runs/x").model_dump_json())["storage"] == "runs/x"


def test_the_cli_reads_checkpointer_options_from_the_environment_under_its_own_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from moai_ckpt.cli import app

    run_dir = str(tmp_path / "run")
    model = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(40)))  # a manifest of some 30 KB
    with moai_ckpt.Checkpointer(run_dir) as ckpt:
        ckpt.save(1, {"model": model})
    assert CliRunner().invoke(app, ["inspect", run_dir, "--json"]).exit_code == 0
    monkeypatch.setenv("MOAI_CKPT_CHECKPOINTER__MAX_RECORD_BYTES", "4096")
    refused = CliRunner().invoke(app, ["inspect", run_dir, "--json"])
    assert refused.exit_code == 2 and "manifest.json" in refused.output
    allowed = CliRunner().invoke(app, ["inspect", run_dir, "--json", "-o", "max_record_bytes=1000000"])
    assert allowed.exit_code == 0, allowed.output  # -o over the environment


def test_the_local_tier_comes_from_keywords_the_environment_or_a_file_and_needs_both_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert RunOptions.of("x", local_tier="/dev/shm/r", local_every=5).local_every == 5
    monkeypatch.setenv("MOAI_CKPT_LOCAL_TIER", str(tmp_path / "shm"))
    monkeypatch.setenv("MOAI_CKPT_LOCAL_EVERY", "3")
    from_env = RunOptions(storage="x")
    assert (from_env.local_tier, from_env.local_every) == (str(tmp_path / "shm"), 3)
    monkeypatch.delenv("MOAI_CKPT_LOCAL_TIER")
    monkeypatch.delenv("MOAI_CKPT_LOCAL_EVERY")
    config = tmp_path / "moai.toml"
    config.write_text('storage = "x"\nlocal_tier = "/dev/shm/r"\nlocal_every = 4\n')
    assert RunOptions(config_file=str(config)).local_every == 4
    with pytest.raises(ValueError, match="local_tier and local_every go together"):
        RunOptions(storage="x", local_tier="/dev/shm/r")
    with pytest.raises(ValueError, match="local_tier and local_every go together"):
        RunOptions(storage="x", local_every=2)
    with pytest.raises(ValidationError, match="local_every"):
        RunOptions(storage="x", local_tier="/dev/shm/r", local_every=0)
    with pytest.raises(ValueError, match="local_tier must be a local directory"):
        RunOptions(storage="x", local_tier="s3://bucket/tier", local_every=2)
