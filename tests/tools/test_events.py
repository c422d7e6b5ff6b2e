"""Events: each save, save_async, restore, replay and log flush reaches logging, hooks, TensorBoard
and the run's history, which ``moai-ckpt stats`` summarises; a failing hook never breaks training."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from moai_ckpt import Checkpointer, cli, events
from moai_ckpt.eventlog import EventHistory, read_events
from moai_ckpt.events import Event, EventSink
from moai_ckpt.integrations.tensorboard import MetricsEvents, TensorBoardEvents
from moai_ckpt.layout import EVENTS

ROOT = Path(__file__).resolve().parents[2]


def state(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    return {"model": torch.nn.Linear(128, 64), "extra": {"epoch": 1}}


def stats(url: str, *extra: str, columns: int = 80) -> Any:
    result = CliRunner().invoke(cli.app, ["stats", url, *extra], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def test_save_save_async_and_restore_emit_events_to_logging_hooks_and_the_history(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = str(tmp_path / "run")
    everywhere: list[Event] = []
    mine: list[Event] = []
    remove = events.add_hook(everywhere.append)
    try:
        with caplog.at_level(logging.INFO, logger="moai_ckpt.events"), Checkpointer(url, on_event=mine.append) as ckpt:
            ckpt.save(1, state())
            ckpt.save_async(2, state()).result()
            ckpt.restore(state(1), step=1)
    finally:
        remove()
    tensor_bytes = 128 * 64 * 4 + 64 * 4
    assert [e.kind for e in mine] == ["save", "save_async", "restore"] == [e.kind for e in everywhere]
    save, save_async, restore = mine
    assert (save.step, save_async.step, restore.step) == (1, 2, 1)
    assert all(e.ok and e.error is None and e.tier == "storage" and e.url == url for e in mine)
    assert save.bytes >= tensor_bytes and save.stall_s == save.duration_s > 0
    assert save_async.persist_s is not None and 0 < save_async.persist_s <= save_async.duration_s
    assert save_async.stall_s <= save_async.duration_s
    assert restore.bytes >= tensor_bytes and restore.duration_s > 0
    records = [r for r in caplog.records if r.name == "moai_ckpt.events"]
    assert [r.moai_kind for r in records] == ["save", "save_async", "restore"]  # type: ignore[attr-defined]
    assert records[0].moai_event == save and records[0].moai_bytes == save.bytes  # type: ignore[attr-defined]
    assert "save step 1" in records[0].getMessage()
    with Checkpointer(url, local=True) as reader:
        kept = read_events(reader.storage)
    assert [(e.kind, e.step, e.bytes) for e in kept] == [(e.kind, e.step, e.bytes) for e in mine]


def test_a_failed_save_emits_an_event_naming_the_error_class(tmp_path: Path) -> None:
    got: list[Event] = []
    with Checkpointer(str(tmp_path / "run"), on_event=got.append) as ckpt:
        ckpt.save(1, state())
        with pytest.raises(Exception) as raised:
            ckpt.save(1, state())  # a committed snapshot is there
    assert got[-1].kind == "save" and not got[-1].ok and got[-1].error == type(raised.value).__name__


def test_a_hook_that_raises_never_breaks_a_save_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    def broken(event: Event) -> None:
        calls.append(event.step)
        raise RuntimeError("the dashboard is down")

    with (
        caplog.at_level(logging.INFO, logger="moai_ckpt.events"),
        Checkpointer(str(tmp_path / "run"), on_event=broken) as ckpt,
    ):
        for step in (1, 2, 3):
            ckpt.save(step, state())
        ckpt.save_async(4, state()).result()  # on the background thread too
        assert ckpt.steps() == [1, 2, 3, 4]
    assert calls == [1, 2, 3, 4]
    failures = [r for r in caplog.records if "event hook" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None
    assert "the dashboard is down" in str(failures[0].exc_info[1])


def test_the_url_of_an_event_has_no_password() -> None:
    got: list[Event] = []
    sink = EventSink("s3://AKIAKEY:very-secret@bucket/run", on_event=got.append)
    sink.emit("save", 3, 0.5)
    assert got[0].url == "s3://***@bucket/run" and "very-secret" not in got[0].model_dump_json()


def test_tensorboard_hook_writes_scalars_that_event_accumulator_reads_back(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    logdir = tmp_path / "tb"
    writer = SummaryWriter(str(logdir))
    got: list[Event] = []
    with Checkpointer(str(tmp_path / "run"), on_event=[TensorBoardEvents(writer), got.append]) as ckpt:
        ckpt.save(5, state())
        ckpt.save_async(10, state()).result()
        ckpt.restore(state(1))
    writer.close()
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"moai_ckpt/save/duration_s", "moai_ckpt/save/bytes", "moai_ckpt/save/stall_s"} <= tags
    assert {"moai_ckpt/save_async/persist_s", "moai_ckpt/restore/duration_s"} <= tags
    by_kind = {e.kind: e for e in got}
    save_bytes = acc.Scalars("moai_ckpt/save/bytes")
    assert [(s.step, s.value) for s in save_bytes] == [(5, pytest.approx(by_kind["save"].bytes))]
    persist = acc.Scalars("moai_ckpt/save_async/persist_s")
    assert persist[0].step == 10 and persist[0].value == pytest.approx(by_kind["save_async"].persist_s, rel=1e-6)


def test_metrics_hook_logs_a_dict_at_the_events_step() -> None:
    class Logger:
        def __init__(self) -> None:
            self.logged: list[tuple[dict[str, Any], int | None]] = []

        def log(self, data: dict[str, Any], step: int | None = None) -> None:
            self.logged.append((data, step))

    logger = Logger()
    EventSink("runs/r", on_event=MetricsEvents(logger)).emit("replay", 40, 2.0, steps=8, stall_s=2.0)
    data, step = logger.logged[0]
    assert step == 40
    assert data["moai_ckpt/replay/steps"] == 8 and data["moai_ckpt/replay/duration_s"] == 2.0


def test_the_history_is_bounded_and_a_damaged_event_is_skipped(tmp_path: Path) -> None:
    with Checkpointer(str(tmp_path / "run")) as ckpt:
        history = EventHistory(ckpt.storage)
        sink = EventSink(ckpt.url, store=history.append)
        for step in range(10):
            sink.emit("save", step, 0.1, bytes=100)
        sink.emit("log_flush", 9, 0.01, bytes=10)  # flushes go to logging and hooks, not the history
        history.trim(keep=6)
        keys = ckpt.storage.list(EVENTS)
        assert len(keys) == 6
        ckpt.storage.write(keys[0], b"{not json")
        ckpt.storage.write(keys[1], b'{"kind": "save", "step": 1, "duration_s": 0.1, "pad": "' + b"x" * 8000 + b'"}')
        kept = read_events(ckpt.storage)
    assert [e.step for e in kept] == [6, 7, 8, 9]


def test_stats_on_a_run_without_events_says_so(tmp_path: Path) -> None:
    url = str(tmp_path / "empty")
    os.makedirs(url)
    assert "no events" in stats(url).stdout
    assert json.loads(stats(url, "--json").stdout)["events"] == 0


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def _scenario(run_dir: Path, total: int, faults: str | None) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOAI_TEST_LOG_SYNC": "1"}
    env.pop("MOAI_CKPT_FAULTS", None)
    if faults:
        env["MOAI_CKPT_FAULTS"] = faults
    return subprocess.Popen(
        [sys.executable, "-m", "tests.scenarios.ft_scenario", str(run_dir), str(total)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )


@pytest.mark.slow
def test_stats_shows_the_restore_and_the_replay_of_a_run_killed_from_outside(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    fired = tmp_path / "stopped"
    # the run stops itself mid-step 10 (SIGSTOP); the test kills it from outside
    fault = [{"at": "forward", "step": 10, "action": "stop", "once": str(fired)}]
    proc = _scenario(run_dir, 14, json.dumps(fault))
    deadline = time.monotonic() + 180
    while not (fired.exists() and _stopped(proc.pid)):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never reached step 10"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = _scenario(run_dir, 14, None)
    stdout, stderr = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    restored = result["first_step"] - 1  # the resumed loop began after the snapshot it restored
    replayed_to = restored + result["replayed"]
    assert result["replayed"] >= 1 and replayed_to == 9  # the logged steps up to the one killed

    summary = json.loads(stats(str(run_dir), "--json").stdout)
    assert [(r["step"], r["tier"], r["ok"]) for r in summary["restores"]] == [(restored, "storage", True)]
    assert [(r["step"], r["steps"]) for r in summary["replays"]] == [(replayed_to, result["replayed"])]
    with Checkpointer(str(run_dir), local=True) as reader:
        assert summary["snapshots"]["count"] >= len(reader.steps()) >= 3
    table = stats(str(run_dir)).stdout
    assert "…" not in table
    restore_row = next(line for line in table.splitlines() if line.split()[:2] == [str(restored), "storage"])
    assert f"{summary['restores'][0]['duration_s']:.3f} s" in restore_row
    replay_row = next(line for line in table.splitlines() if line.split()[:2] == ["9", str(result["replayed"])])
    assert f"{summary['replays'][0]['duration_s']:.3f} s" in replay_row


def test_a_run_emits_its_snapshots_and_each_log_flush(tmp_path: Path) -> None:
    from moai_ckpt.run import Run

    got: list[Event] = []
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = Run(str(tmp_path / "run"), snapshot_every=4, log_sync=True, on_event=got.append)
    try:
        run.track(model=model, optim=opt)
        for _ in run.steps(6):
            opt.zero_grad()
            loss = model(torch.ones(2, 8)).square().mean()
            loss.backward()
            opt.step()
            run.record(loss=loss)
    finally:
        run.close()
    flushes = [e for e in got if e.kind == "log_flush"]
    assert {e.step for e in flushes} == {1, 2, 3, 4, 5, 6}  # log_sync: a segment per step
    assert all(e.bytes > 0 and e.stall_s == 0 and e.ok for e in flushes)
    saves = [e.step for e in got if e.kind in ("save", "save_async")]
    assert 0 in saves and 4 in saves  # the base of the log, then every 4 steps


def test_a_local_tier_reports_its_saves_and_restores_as_the_memory_tier(tmp_path: Path) -> None:
    from moai_ckpt.format import RunInfo
    from moai_ckpt.options import CheckpointerOptions
    from moai_ckpt.run.tiers import LocalTier

    seen: list[Event] = []
    remove = events.add_hook(seen.append)
    try:
        with Checkpointer(str(tmp_path / "run")) as persistent:
            persistent.save(0, {"t": {"a": torch.ones(4)}})
        run_info = RunInfo(run_id="run-1", created="2026-11-30T00:00:00Z").model_dump_json().encode()
        tier = LocalTier(
            str(tmp_path / "shm"), 2, run_info, rank=0, world_size=1, options=CheckpointerOptions(), background=False
        )
        tier.ckpt.save(2, {"t": {"a": torch.arange(4.0)}})
        restored = {"t": {"a": torch.zeros(4)}}
        tier.restore(restored, 2)
        tier.ckpt.close()
    finally:
        remove()
    assert torch.equal(restored["t"]["a"], torch.arange(4.0))
    assert [(e.kind, e.tier) for e in seen if e.step == 2] == [("save", "memory"), ("restore", "memory")]
    assert [(e.kind, e.tier) for e in seen if e.step == 0] == [("save", "storage")]
