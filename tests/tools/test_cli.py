"""The ``moai-ckpt`` command line, run against real snapshots on disk (and one on a loopback S3)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from moai_ckpt import Checkpointer, __version__, cli
from moai_ckpt.cli import base as cli_base
from moai_ckpt.cli import snapshots as cli_snapshots
from moai_ckpt.cli import terminal as cli_terminal
from moai_ckpt.layout import COMMIT, snapshot_dir

STEPS = (10, 20, 30)
SCRIPT = Path(sys.executable).with_name("moai-ckpt")


@dataclass
class Run:
    """A run directory with committed snapshots at `STEPS` and the live objects they hold."""

    url: str
    model: torch.nn.Module
    optim: torch.optim.Optimizer
    extras: dict[str, Any]

    def copy(self, dest: Path) -> str:
        """A private copy of the run directory, for tests that change it."""
        shutil.copytree(self.url, dest)
        return str(dest)


def _train_and_save(url: str) -> Run:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    extras: dict[str, Any] = {}
    with Checkpointer(url) as ckpt:
        for step in STEPS:
            model(torch.randn(4, 8)).square().mean().backward()
            optim.step()
            optim.zero_grad()
            extras = {"tokens_seen": step * 512, "lr": 1e-3, "phase": "warmup", "losses": [1.5, 0.75]}
            ckpt.save(step, {"model": model, "optim": optim, "extra": extras})
    return Run(url, model, optim, extras)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Built once per module: tests that change the run work on `Run.copy`."""
    return _train_and_save(str(tmp_path_factory.mktemp("cli") / "run"))


def invoke(*args: str, expect: int = 0) -> Any:
    result = CliRunner().invoke(cli.app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == expect, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result


def invoke_json(*args: str, expect: int = 0) -> Any:
    return json.loads(invoke(*args, "--json", expect=expect).stdout)


def table_steps(output: str) -> list[int]:
    """The steps in the first column of a rich table's body rows."""
    return [int(line.split()[0]) for line in output.splitlines() if line.split() and line.split()[0].isdigit()]


def prune_rows(output: str) -> dict[int, tuple[str, str]]:
    """Step -> (action, why) from the table ``moai-ckpt prune`` prints (a wide terminal: one line a row)."""
    rows = {}
    for line in output.splitlines():
        cells = line.split()
        if cells and cells[0].isdigit():
            action = next(c for c in cells if c in ("keep", "delete", "deleted"))
            rows[int(cells[0])] = (action, " ".join(cells[cells.index(action) + 1 :]))
    return rows


def chunk_files(run_url: str, step: int) -> list[Path]:
    """Every chunk object of a snapshot (zarr v3 default keys: ``<array>/c``, ``<array>/c.0...``)."""
    root = Path(run_url) / snapshot_dir(step)
    return [p for p in root.rglob("*") if p.is_file() and (p.name == "c" or p.name.startswith("c."))]


def flip_byte(path: Path, offset: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def assert_clean_error(result: Any, *fragments: str) -> None:
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


# -- list --------------------------------------------------------------------------------------


def test_list_shows_every_committed_step_in_a_table(run: Run) -> None:
    out = invoke("list", run.url).stdout
    assert table_steps(out) == list(STEPS)
    assert "KiB" in out and "cpu" in out


def test_list_hides_a_snapshot_whose_commit_marker_was_deleted(run: Run, tmp_path: Path) -> None:
    url = run.copy(tmp_path / "run")
    (Path(url) / snapshot_dir(20) / COMMIT).unlink()
    out = invoke("list", url).stdout
    assert table_steps(out) == [10, 30]
    assert "not shown: 1 directory without a valid commit (see --all)" in out
    assert [e["step"] for e in invoke_json("list", url)] == [10, 30]


def test_list_all_shows_the_uncommitted_directory_with_its_problem(run: Run, tmp_path: Path) -> None:
    url = run.copy(tmp_path / "run")
    (Path(url) / snapshot_dir(20) / COMMIT).unlink()
    out = invoke("list", url, "--all").stdout
    assert table_steps(out) == list(STEPS)
    assert "step 20 uncommitted: no commit marker" in out
    entries = {e["step"]: e for e in invoke_json("list", url, "--all")}
    assert entries[20]["status"] == "uncommitted" and entries[20]["total_bytes"] is None
    assert entries[10]["status"] == entries[30]["status"] == "committed"


def test_list_all_shows_a_corrupt_commit_marker_as_invalid(run: Run, tmp_path: Path) -> None:
    url = run.copy(tmp_path / "run")
    (Path(url) / snapshot_dir(10) / COMMIT).write_text('{"body": ')
    entries = {e["step"]: e for e in invoke_json("list", url, "--all")}
    assert entries[10]["status"] == "invalid"
    assert "commit marker does not parse" in entries[10]["problem"]


def test_list_json_sizes_match_the_chunk_files_on_disk(run: Run) -> None:
    listed = invoke_json("list", run.url)
    assert [e["step"] for e in listed] == list(STEPS)
    with Checkpointer(run.url) as ckpt:
        for entry in listed:
            step = entry["step"]
            assert entry["total_bytes"] == sum(p.stat().st_size for p in chunk_files(run.url, step))
            assert entry["array_count"] == len(ckpt.manifest(step).arrays)
            assert entry["created"] == ckpt.marker(step).body.created
            assert entry["world_size"] == 1 and entry["device_types"] == ["cpu"]


def test_list_of_a_missing_run_directory_is_a_clean_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere")
    assert_clean_error(invoke("list", missing, expect=2), "no snapshot directories", missing)


# -- inspect -----------------------------------------------------------------------------------


def test_inspect_lists_every_array_with_the_shape_and_dtype_of_the_live_state(run: Run) -> None:
    data = invoke_json("inspect", run.url)
    arrays = {a["path"]: a for a in data["arrays"]}
    expected = {f"model/{name}": t for name, t in run.model.state_dict().items()}
    for index, slots in run.optim.state_dict()["state"].items():
        expected |= {f"optim/state.{index}.{slot}": t for slot, t in slots.items()}
    for path, tensor in expected.items():
        assert arrays[path]["shape"] == list(tensor.shape), path
        assert arrays[path]["dtype"] == str(tensor.dtype).removeprefix("torch."), path
        assert arrays[path]["bytes"] == tensor.numel() * tensor.element_size(), path


def test_inspect_table_names_every_array_and_the_total(run: Run) -> None:
    out = invoke("inspect", run.url).stdout
    with Checkpointer(run.url) as ckpt:
        manifest = ckpt.manifest(STEPS[-1])
    for path, record in manifest.arrays.items():
        row = next(line for line in out.splitlines() if line.split()[:1] == [path])
        assert record.dtype in row and cli_snapshots._shape(record.shape) in row
    total = sum(cli_snapshots._array_bytes(r) or 0 for r in manifest.arrays.values())
    assert f"{len(manifest.arrays)} arrays" in out and cli_base.human_bytes(total) in out


def test_inspect_shows_the_entries_and_the_json_extras(run: Run) -> None:
    data = invoke_json("inspect", run.url)
    kinds = {e["key"]: (e["kind"], e["type"]) for e in data["entries"]}
    assert kinds["model"] == ("module", "torch.nn.modules.container.Sequential")
    assert kinds["optim"] == ("optimizer", "torch.optim.adamw.AdamW")
    assert kinds["extra"][0] == "json"
    assert data["extras"] == {"extra": run.extras}
    out = invoke("inspect", run.url).stdout
    assert '"tokens_seen": 15360' in out and '"phase": "warmup"' in out


def test_inspect_defaults_to_the_latest_step_and_takes_another(run: Run) -> None:
    assert invoke_json("inspect", run.url)["step"] == STEPS[-1]
    data = invoke_json("inspect", run.url, "--step", "10")
    assert data["step"] == 10 and data["extras"]["extra"]["tokens_seen"] == 10 * 512


def test_inspect_of_a_step_that_does_not_exist_is_a_clean_error(run: Run) -> None:
    result = invoke("inspect", run.url, "--step", "99", expect=2)
    assert_clean_error(result, "no committed snapshot", "step=99", run.url)
    assert result.stdout == ""


def test_debug_shows_the_traceback_of_an_error(run: Run) -> None:
    result = invoke("--debug", "inspect", run.url, "--step", "99", expect=2)
    assert "SnapshotNotFoundError" in result.stderr and "Traceback" in result.stderr


# -- verify ------------------------------------------------------------------------------------


def test_verify_passes_a_sound_snapshot_with_exit_code_0(run: Run) -> None:
    out = invoke("verify", run.url).stdout
    with Checkpointer(run.url) as ckpt:
        report = ckpt.verify(STEPS[-1])
    assert f"step {STEPS[-1]}: OK, {report.arrays} arrays, {cli_base.human_bytes(report.bytes_checked)} checked" in out
    assert len(out.strip().splitlines()) == 1


def test_verify_exits_1_and_names_the_chunk_whose_byte_flipped(run: Run, tmp_path: Path) -> None:
    url = run.copy(tmp_path / "run")
    chunk = Path(url) / snapshot_dir(30) / "model" / "0.weight" / "c.0.0"
    flip_byte(chunk)
    out = invoke("verify", url, expect=1).stdout
    assert "model/0.weight/c.0.0" in out and "ChecksumError" in out
    assert "step 30: 1 fault" in out
    (report,) = invoke_json("verify", url, expect=1)
    assert not report["ok"]
    assert [f["key"] for f in report["faults"]] == [f"{snapshot_dir(30)}/model/0.weight/c.0.0"]


def test_verify_all_checks_every_committed_snapshot_and_finds_the_bad_one(run: Run, tmp_path: Path) -> None:
    url = run.copy(tmp_path / "run")
    flip_byte(next(p for p in chunk_files(url, 20) if "optim" in p.parts))
    reports = invoke_json("verify", url, "--all", expect=1)
    assert [(r["step"], r["ok"]) for r in reports] == [(10, True), (20, False), (30, True)]
    assert invoke_json("verify", url, "--step", "30")[0]["ok"]


def test_verify_reports_a_corrupt_commit_marker_as_a_fault(run: Run, tmp_path: Path) -> None:
    url = run.copy(tmp_path / "run")
    (Path(url) / snapshot_dir(30) / COMMIT).write_text("{}")
    (report,) = invoke_json("verify", url, "--step", "30", expect=1)
    assert report["faults"][0]["key"] == f"{snapshot_dir(30)}/{COMMIT}"


def test_verify_reports_a_missing_chunk_by_its_key(run: Run, tmp_path: Path) -> None:
    url = run.copy(tmp_path / "run")
    (Path(url) / snapshot_dir(30) / "model" / "2.weight" / "c.0.0").unlink()
    (report,) = invoke_json("verify", url, expect=1)
    assert [(f["key"], f["kind"]) for f in report["faults"]] == [
        (f"{snapshot_dir(30)}/model/2.weight/c.0.0", "MissingDataError")
    ]


def test_a_snapshot_of_a_newer_format_is_listed_as_unsupported_and_not_verified(run: Run, tmp_path: Path) -> None:
    url = run.copy(tmp_path / "run")
    marker = Path(url) / snapshot_dir(30) / COMMIT
    data = json.loads(marker.read_text())
    data["body"]["format_version"] = 99
    marker.write_text(json.dumps(data))
    entries = {e["step"]: e for e in invoke_json("list", url, "--all")}
    assert entries[30]["status"] == "unsupported" and "upgrade moai-ckpt" in entries[30]["problem"]
    assert_clean_error(invoke("verify", url, expect=2), "format version 99", "step=30")
    reports = invoke_json("verify", url, "--all")
    assert [r["step"] for r in reports] == [10, 20]


def test_verify_of_a_missing_step_or_run_is_a_clean_error(run: Run, tmp_path: Path) -> None:
    assert_clean_error(invoke("verify", run.url, "--step", "99", expect=2), "step=99")
    assert_clean_error(invoke("verify", str(tmp_path / "nowhere"), expect=2), "no committed snapshot")


def test_verify_refuses_a_step_and_all_together(run: Run) -> None:
    result = invoke("verify", run.url, "--step", "10", "--all", expect=2)
    assert "either --step or --all" in result.output


def test_verify_progress_bar_counts_every_byte(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(cli_terminal, "err", Console(file=screen, force_terminal=True, width=120))
    invoke("verify", run.url)
    with Checkpointer(run.url) as ckpt:
        total = ckpt.verify().bytes_checked
    done = cli_base.human_bytes(total).split()[0]
    assert f"{done}/{done} KiB" in screen.getvalue()


# -- prune -------------------------------------------------------------------------------------


def test_prune_removes_older_steps_and_says_which(run: Run, tmp_path: Path) -> None:
    url = run.copy(tmp_path / "run")
    out = invoke("prune", url, "--keep", "1").stdout
    assert prune_rows(out) == {
        10: ("deleted", "no policy keeps it"),
        20: ("deleted", "no policy keeps it"),
        30: ("keep", "last 1, the newest committed"),
    }
    assert "kept 1 committed snapshot: 30" in out
    with Checkpointer(url) as ckpt:
        assert ckpt.steps() == [30]
    assert sorted(p.name for p in (Path(url) / "snapshots").iterdir()) == [Path(snapshot_dir(30)).name]


def test_prune_dry_run_deletes_nothing(run: Run, tmp_path: Path) -> None:
    url = run.copy(tmp_path / "run")
    report = invoke_json("prune", url, "--keep", "2", "--dry-run")
    assert (report["dry_run"], report["deleted"], report["kept"]) == (True, [10], [20, 30])
    assert [(r["step"], r["delete"]) for r in report["snapshots"]] == [(10, True), (20, False), (30, False)]
    with Checkpointer(url) as ckpt:
        assert ckpt.steps() == list(STEPS)


def test_prune_removes_leftovers_older_than_the_latest_commit(run: Run, tmp_path: Path) -> None:
    url = run.copy(tmp_path / "run")
    (Path(url) / snapshot_dir(20) / COMMIT).unlink()
    out = invoke("prune", url, "--keep", "2").stdout
    assert prune_rows(out)[20] == ("deleted", "leftover of a failed save")
    assert not (Path(url) / snapshot_dir(20)).exists()


def test_prune_needs_keep_of_at_least_one(run: Run) -> None:
    invoke("prune", run.url, "--keep", "0", expect=2)


# -- options, entry point ----------------------------------------------------------------------


def test_storage_options_are_parsed_as_json_when_they_can_be() -> None:
    pairs = ["endpoint_url=http://127.0.0.1:5000", "anon=true", "retries=3", 'kw={"a": 1}', "empty="]
    assert cli_base.parse_pairs(pairs) == {
        "endpoint_url": "http://127.0.0.1:5000",
        "anon": True,
        "retries": 3,
        "kw": {"a": 1},
        "empty": "",
    }


def test_a_storage_option_without_equals_sign_is_a_usage_error(run: Run) -> None:
    result = invoke("list", run.url, "-o", "anon", expect=2)
    assert "KEY=VALUE" in result.output


def test_human_bytes_uses_binary_units() -> None:
    assert [cli_base.human_bytes(n) for n in (0, 1023, 1024, 10184, 3 << 30)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "9.9 KiB",
        "3.0 GiB",
    ]


def test_version_prints_the_package_version() -> None:
    assert invoke("--version").stdout.strip() == f"moai-ckpt {__version__}"


@pytest.mark.skipif(not SCRIPT.exists(), reason="the moai-ckpt console script is not installed next to python")
def test_the_installed_script_lists_verifies_and_fails_cleanly(run: Run, tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "200"}

    def script(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)

    listed = script("list", run.url, "--json")
    assert listed.returncode == 0 and [e["step"] for e in json.loads(listed.stdout)] == list(STEPS)
    assert script("verify", run.url, "--all").returncode == 0
    url = run.copy(tmp_path / "run")
    flip_byte(Path(url) / snapshot_dir(30) / "model" / "2.bias" / "c.0")
    corrupt = script("verify", url)
    assert corrupt.returncode == 1 and "model/2.bias/c.0" in corrupt.stdout
    missing = script("inspect", url, "--step", "7")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.startswith("error: no committed snapshot") and "Traceback" not in missing.stderr


# -- fsspec storage with options ---------------------------------------------------------------


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.mark.s3
def test_storage_options_reach_s3_through_dash_o(s3_endpoint: str) -> None:
    import s3fs

    creds = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    s3fs.S3FileSystem(**creds, skip_instance_cache=True).mkdir("bucket")
    with Checkpointer("s3://bucket/run", **creds) as ckpt:
        ckpt.save(5, {"w": torch.arange(6.0), "extra": {"note": "on s3"}})
    options = [arg for k, v in creds.items() for arg in ("-o", f"{k}={v}")]
    assert [e["step"] for e in invoke_json("list", "s3://bucket/run", *options)] == [5]
    assert invoke_json("inspect", "s3://bucket/run", *options)["extras"] == {"extra": {"note": "on s3"}}
    assert "step 5: OK" in invoke("verify", "s3://bucket/run", *options).stdout
