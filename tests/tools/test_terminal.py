"""The terminal: at 80 columns no table cuts a figure (columns are left out instead, and said so),
``--json`` holds the same figures as the table, and long operations show a progress bar with a
rate and an ETA on stderr when asked, never in ``--json`` stdout."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from moai_ckpt import Checkpointer, cli
from moai_ckpt.cli.terminal import CUT, fit_table
from moai_ckpt.layout import chunk_key

ROOT = Path(__file__).resolve().parents[2]
LONG = "transformer_blocks_0_attention_query_key_value_projection"


def invoke(*args: str, columns: int = 80, expect: int = 0, env: dict[str, str] | None = None) -> Any:
    result = CliRunner().invoke(cli.app, list(args), env={"COLUMNS": str(columns), **(env or {})})
    assert result.exit_code == expect, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result


def binary(n: int) -> str:
    """Bytes as the tables show them, computed here independently: 1 decimal, binary units."""
    if n < 1024:
        return f"{n} B"
    units = ["KiB", "MiB", "GiB", "TiB"]
    value, unit = n / 1024, 0
    while value >= 1024 and unit < len(units) - 1:
        value, unit = value / 1024, unit + 1
    return f"{value:.1f} {units[unit]}"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("terminal") / "a-run-directory-with-a-rather-long-name")
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({LONG: torch.nn.Linear(300, 1000), "head": torch.nn.Linear(1000, 3)})
    with Checkpointer(url) as ckpt:
        for step in (10, 20, 12345678):
            ckpt.save(step, {"model": model, "extra": {"note": "x" * 200}})
        ckpt.save_async(12345679, {"model": model}).result()
        ckpt.restore({"model": model}, step=20)
    return url


def test_list_at_80_columns_cuts_no_figure_and_json_has_the_same_figures(run: str) -> None:
    table = invoke("list", run).stdout
    assert CUT not in table
    rows = {line.split()[0]: line for line in table.splitlines() if line.split() and line.split()[0].isdigit()}
    for entry in json.loads(invoke("list", run, "--json").stdout):
        row = rows[str(entry["step"])]
        assert binary(entry["total_bytes"]) in row
        assert f" {entry['array_count']} " in f"{row} " and f" {entry['world_size']} " in f"{row} "


def test_inspect_at_80_columns_folds_long_keys_and_keeps_every_figure(run: str) -> None:
    text = invoke("inspect", run, "--step", "20").stdout
    assert CUT not in text
    data = json.loads(invoke("inspect", run, "--step", "20", "--json").stdout)
    lines = text.split("\narrays")[1].split("\n")[3:]  # the arrays table's body
    paths: list[str] = []
    for line in lines:
        if set(line.strip()) <= {"─"}:
            break
        parts = line.split()
        if len(parts) == 1:  # a folded path goes on in the next line
            paths[-1] += parts[0]
        else:
            paths.append(parts[0])
    assert sorted(paths) == sorted(a["path"] for a in data["arrays"])
    for array in data["arrays"]:
        assert binary(array["bytes"]) in text
        assert ", ".join(map(str, array["shape"])) in text


def test_verify_faults_table_at_80_columns_keeps_keys_and_figures(run: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    with Checkpointer(run, local=True) as source, Checkpointer(str(broken)) as target:
        target.copy_snapshot(source, 20)
    chunk = broken / chunk_key(20, f"model/{LONG}.weight", (0, 0), ".")
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0xFF
    chunk.write_bytes(bytes(data))
    text = invoke("verify", str(broken), expect=1).stdout
    assert CUT not in text
    reports = json.loads(invoke("verify", str(broken), "--json", expect=1).stdout)
    fault = reports[0]["faults"][0]
    lines = text.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["step", "key"])
    start, end = header.index("key"), header.index("kind")
    body = lines[lines.index(header) + 2 :]
    key = "".join(line[start:end].strip() for line in body if not line.startswith("step "))
    assert key == fault["key"].split("/", 2)[2]  # whole, below the snapshot's folder
    assert fault["kind"] in text


def test_stats_at_80_columns_and_its_json(run: str) -> None:
    text = invoke("stats", run).stdout
    assert CUT not in text
    summary = json.loads(invoke("stats", run, "--json").stdout)
    snapshots = summary["snapshots"]
    assert snapshots["count"] == 4 and snapshots["async"] == 1
    for field in ("blocking_mean_s", "blocking_max_s", "persist_mean_s", "persist_max_s"):
        assert f"{snapshots[field]:.3f} s" in text
    assert binary(snapshots["bytes"]) in text
    assert f"{snapshots['gb_per_s']:.3g} GB/s" in text  # three significant figures, however slow the disk
    (restore,) = summary["restores"]
    assert restore["step"] == 20 and binary(restore["bytes"]) in text and f"{restore['duration_s']:.3f} s" in text


def test_plan_at_80_columns_leaves_columns_out_rather_than_cutting_figures(tmp_path: Path) -> None:
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    args = (
        "plan",
        "--devices",
        "2xH100,1xA100",
        "-b",
        "64",
        "--model",
        "tests.scenarios.parallel_scenarios:model_and_sample",
    )
    narrow = invoke(*args, "--analytic", env=cache)
    wide = invoke(*args, "--analytic", columns=240, env=cache)
    assert CUT not in narrow.stdout and CUT not in wide.stdout
    assert "left out at 80 columns" in narrow.stderr
    # every candidate row keeps its figures: the first two (#, step time) equal the wide table's
    rows = {}
    for line in wide.stdout.split("\nchosen:")[0].splitlines():  # the candidates table
        parts = line.split()
        if parts and parts[0].isdigit():
            rows[parts[0]] = parts[:2]
    assert rows
    candidates = narrow.stdout.split("\nchosen:")[0].splitlines()
    narrow_rows = [line.split()[:2] for line in candidates if line.split()[:1] in ([k] for k in rows)]
    assert {r[0]: r for r in narrow_rows} == rows


def test_chaos_list_at_80_columns_and_its_json() -> None:
    text = invoke("chaos", "list").stdout
    assert CUT not in text
    listed = json.loads(invoke("chaos", "list", "--json").stdout)
    for scenario in listed["scenarios"]:
        assert scenario["name"] in text and f" {scenario['steps']} " in text


def test_fit_table_leaves_out_the_named_columns_first_and_never_the_first() -> None:
    table = Table()
    for name in ("key", "a", "b", "c"):
        table.add_column(name, justify="left" if name == "key" else "right")
    table.add_row("k", "1234567890.123", "2234567890.123", "3234567890.123")
    assert fit_table(table, 35, drop=["b"]) == ["b", "c"]
    assert [str(c.header) for c in table.columns] == ["key", "a"]
    one = Table()
    one.add_column("only", justify="right")
    one.add_row("12345678901234567890")
    assert fit_table(one, 5) == []  # the first column stays, whatever the width


def test_a_value_holding_a_path_longer_than_half_the_width_folds_and_keeps_its_column() -> None:
    path = "/tmp/pytest-of-someone/pytest-1234/test_restore_on_another_world_size0/run"
    table = Table(show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("committed", f"to {path} at step 12")
    table.add_row("placement", "changed: plan: dp1 x pp1")
    assert fit_table(table, 80) == []
    rendered = _render_plain(table, 80)
    assert "plan: dp1 x pp1" in rendered and "step 12" in rendered
    value_lines = [line.split("│")[2].strip() for line in rendered.splitlines() if line.count("│") == 3]
    assert path in "".join(value_lines)  # folded over several lines, whole


def _render_plain(table: Table, width: int) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "moai_ckpt.cli", *args], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT
    )


def test_progress_goes_to_stderr_when_asked_never_into_json_stdout(run: str, tmp_path: Path) -> None:
    verified = _cli("verify", run, "--all", "--progress", "--json")
    assert verified.returncode == 0, verified.stderr
    assert [r["step"] for r in json.loads(verified.stdout)] == [10, 20, 12345678, 12345679]
    assert "verify step 12345679" in verified.stderr and "/s" in verified.stderr  # a rate
    assert "0:00:0" in verified.stderr  # elapsed and remaining time
    exported = _cli("export", run, "--to", str(tmp_path / "hf"), "--progress", "--json")
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["tensors"] == 4
    assert "export" in exported.stderr and "/s" in exported.stderr
    copied = _cli("restore", run, "--step", "20", "--to", str(tmp_path / "copy"), "--progress", "--json")
    assert copied.returncode == 0, copied.stderr
    assert json.loads(copied.stdout)["report"]["last_step"] == 20
    assert "copy step 20" in copied.stderr and "/s" in copied.stderr
    quiet = _cli("verify", run, "--json")  # not a terminal, not asked: no bar
    assert quiet.returncode == 0 and "verify step" not in quiet.stderr
