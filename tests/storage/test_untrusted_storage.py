"""A run directory that others can write: links, FIFOs, crafted markers, stray names and files.

Each test plants, with plain file-system calls, what the issue's attacker or a careless user (or
NFS) leaves in a run directory, then drives the public API: nothing outside the run is touched,
nothing hangs or reads without bound, a malformed marker means "not committed", never a crash,
and prune and save get rid of what is not theirs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import moai_ckpt
from moai_ckpt import cli
from moai_ckpt.errors import UnsafeEntryError
from moai_ckpt.layout import COMMIT, LOG, log_dir, snapshot_dir
from moai_ckpt.pruning import prune_run
from moai_ckpt.storage import LocalStorage
from replay.log import log_bases

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STRAY = "00000000001\u00b2"  # str.isdigit() says yes, int() says no


def saved_run(run_dir: str, steps: tuple[int, ...] = (10, 20, 30)) -> moai_ckpt.Checkpointer:
    ckpt = moai_ckpt.Checkpointer(run_dir)
    for step in steps:
        ckpt.save(step, {"t": {"w": torch.full((64,), float(step))}, "x": {"step": step}})
    return ckpt


def restored_step(ckpt: moai_ckpt.Checkpointer, step: int | None = None) -> int:
    state: dict[str, Any] = {"t": {}, "x": {}}
    got = ckpt.restore(state, step=step)
    assert state["x"] == {"step": got} and torch.equal(state["t"]["w"], torch.full((64,), float(got)))
    return got


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it takes longer."""
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(("ok", fn()))
        except BaseException as exc:  # noqa: BLE001  (re-raised below)
            out.append(("error", exc))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert out, f"blocked for more than {seconds} s"
    kind, value = out[0]
    if kind == "error":
        raise value
    return value


# -- links ----------------------------------------------------------------------------------------


def test_a_linked_step_directory_is_replaced_by_the_save_and_its_target_is_untouched(
    run_dir: str, tmp_path: Path
) -> None:
    ckpt = saved_run(run_dir, (10,))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_bytes(b"keep me")
    os.symlink(victim, Path(run_dir) / snapshot_dir(20))
    assert ckpt.steps() == [10]
    ckpt.save(20, {"t": {"w": torch.full((64,), 20.0)}, "x": {"step": 20}})
    assert sorted(p.name for p in victim.iterdir()) == ["precious"]
    assert (victim / "precious").read_bytes() == b"keep me"
    assert not (Path(run_dir) / snapshot_dir(20)).is_symlink()
    assert ckpt.steps() == [10, 20]
    assert ckpt.verify(20).ok
    assert restored_step(ckpt) == 20


def test_a_chunk_linked_to_another_file_is_refused_without_disclosing_it(run_dir: str, tmp_path: Path) -> None:
    ckpt = saved_run(run_dir, (10,))
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 12345)
    chunks = [p for p in (Path(run_dir) / snapshot_dir(10)).rglob("*") if p.is_file() and p.name.startswith("c.")]
    chunks[0].unlink()
    os.symlink(secret, chunks[0])
    report = ckpt.verify(10)
    assert not report.ok
    assert all("12345" not in f.message for f in report.faults)
    assert any(f.kind == "UnsafeEntryError" for f in report.faults), report.faults
    with pytest.raises(moai_ckpt.CorruptSnapshotError):
        restored_step(ckpt, 10)


# -- markers that are not files -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_marker_that_is_a_fifo_or_a_device_is_invalid_at_once(run_dir: str, kind: str) -> None:
    ckpt = saved_run(run_dir)
    marker = Path(run_dir) / snapshot_dir(30) / COMMIT
    marker.unlink()
    if kind == "fifo":
        os.mkfifo(marker)
    else:
        os.symlink("/dev/zero", marker)
    started = time.monotonic()
    listed = within(30, lambda: CliRunner().invoke(cli.app, ["list", run_dir, "--all", "--json"]))
    assert listed.exit_code == 0, listed.output
    assert {e["step"]: e["status"] for e in json.loads(listed.stdout)} == {
        10: "committed",
        20: "committed",
        30: "invalid",
    }
    entries = within(30, ckpt.scan)
    assert [(e.step, e.status) for e in entries] == [(10, "committed"), (20, "committed"), (30, "invalid")]
    assert "refusing" in entries[2].problem
    assert within(30, ckpt.latest_step) == 20
    assert restored_step(ckpt) == 20
    report = within(30, ckpt.verify)  # the newest committed one is sound; the damaged newer one is named
    assert report.step == 20 and report.snapshot_ok and [e.step for e in report.passed_over] == [30]
    assert time.monotonic() - started < 30
    assert within(60, lambda: ckpt.prune(keep=1)) == [10]  # the newer one may be a save in progress
    impatient = moai_ckpt.Checkpointer(run_dir, leftover_grace_s=0)
    assert within(60, lambda: impatient.prune(keep=1)) == [30]
    assert ckpt.steps() == [20]
    assert not os.path.lexists(marker)


def test_a_huge_marker_is_refused_unread(run_dir: str) -> None:
    ckpt = moai_ckpt.Checkpointer(run_dir, max_record_bytes=1 << 16)
    for step in (10, 20):
        ckpt.save(step, {"x": {"step": step}})
    marker = Path(run_dir) / snapshot_dir(20) / COMMIT
    with open(marker, "r+b") as f:
        f.truncate(1 << 30)  # 1 GiB, sparse
    entries = ckpt.scan()
    assert entries[1].status == "invalid" and "limit" in entries[1].problem
    assert ckpt.latest_step() == 10


# -- malformed markers ----------------------------------------------------------------------------

MALFORMED = {
    "body is a number": b'{"body": 1, "checksum": "x"}',
    "not an object": b"[1, 2, 3]",
    "version is text": b'{"body": {"format_version": "9"}, "checksum": "x"}',
    "deep nesting": b'{"body": ' + b"[" * 100_000 + b"]" * 100_000 + b', "checksum": "x"}',
    "not JSON": b"\xff\xfe\x00garbage",
    "empty": b"",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_marker_means_not_committed_in_list_verify_and_prune(run_dir: str, case: str) -> None:
    ckpt = saved_run(run_dir)
    (Path(run_dir) / snapshot_dir(10) / COMMIT).write_bytes(MALFORMED[case])
    (Path(run_dir) / snapshot_dir(30) / COMMIT).write_bytes(MALFORMED[case])
    assert [(e.step, e.status) for e in ckpt.scan()] == [(10, "invalid"), (20, "committed"), (30, "invalid")]
    assert ckpt.steps() == [20] and ckpt.latest_step() == 20
    report = ckpt.verify()  # the newest committed one is sound; the damaged newer one is named
    assert report.step == 20 and report.snapshot_ok and [e.step for e in report.passed_over] == [30]
    assert not report.ok and not ckpt.verify(30).ok
    assert restored_step(ckpt) == 20
    assert ckpt.prune(keep=1) == [10]  # the newer invalid one may be a save in progress: left alone
    assert [(e.step, e.status) for e in ckpt.scan()] == [(20, "committed"), (30, "invalid")]


# -- names ----------------------------------------------------------------------------------------


def test_names_that_only_look_like_steps_are_ignored_with_a_warning(
    run_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = saved_run(run_dir)
    for folder in (Path(run_dir) / "snapshots" / STRAY, Path(run_dir) / LOG / STRAY, Path(run_dir) / "snapshots" / "0"):
        folder.mkdir(parents=True)
        (folder / COMMIT).write_bytes(b"{}")
    segment_dir = Path(run_dir) / log_dir(10)
    segment_dir.mkdir(parents=True, exist_ok=True)
    (segment_dir / f"00000000001\u00b2-{12:012d}.seg").write_bytes(b"x")
    with caplog.at_level(logging.WARNING):
        assert ckpt.steps() == [10, 20, 30]
        assert [e.step for e in ckpt.scan()] == [10, 20, 30]
        assert ckpt.verify().ok
        assert restored_step(ckpt) == 30
        assert log_bases(ckpt.storage) == [10]
        assert prune_run(ckpt, keep=1).deleted == [10, 20]
    assert any(STRAY in r.getMessage() for r in caplog.records)
    assert (Path(run_dir) / "snapshots" / STRAY).exists()  # not ours: not deleted either


# -- stray files ----------------------------------------------------------------------------------

STRAY_FILES = [".nfs000000000123456700000001", b"caf\xe9-\xff.tmp"]


def plant_stray_files(folder: Path) -> None:
    for name in STRAY_FILES:
        raw = name if isinstance(name, bytes) else name.encode()
        with open(os.fsencode(folder) + b"/" + raw, "wb") as f:
            f.write(b"left by someone else")


def test_prune_deletes_an_old_snapshot_holding_stray_files_whole(run_dir: str) -> None:
    ckpt = saved_run(run_dir)
    plant_stray_files(Path(run_dir) / snapshot_dir(10))
    plant_stray_files(next(p for p in (Path(run_dir) / snapshot_dir(10)).rglob("*") if p.is_dir()))
    assert ckpt.prune(keep=2) == [10]
    assert not (Path(run_dir) / snapshot_dir(10)).exists()
    assert ckpt.steps() == [20, 30]
    assert ckpt.prune(keep=1) == [20]  # and every later prune works too
    assert ckpt.steps() == [30]


def test_a_save_over_a_leftover_directory_holding_stray_files_works(run_dir: str) -> None:
    ckpt = saved_run(run_dir, (10,))
    leftover = Path(run_dir) / snapshot_dir(20)
    (leftover / "t" / "w").mkdir(parents=True)
    (leftover / "t" / "w" / "zarr.json").write_bytes(b"{half")
    plant_stray_files(leftover)
    plant_stray_files(leftover / "t")
    os.mkfifo(leftover / "t" / "pipe")
    os.symlink("/etc", leftover / "link")
    ckpt.save(20, {"t": {"w": torch.full((64,), 20.0)}, "x": {"step": 20}})
    assert ckpt.steps() == [10, 20] and ckpt.verify(20).ok
    assert restored_step(ckpt) == 20
    leftovers = {p.name for p in leftover.rglob("*")}
    assert not leftovers & {".nfs000000000123456700000001", "pipe", "link", "claim.json"}


def as_unprivileged(fn: Callable[[], None]) -> int:
    """Run ``fn`` in a forked child as user ``nobody`` when we are root (root may delete anything);
    returns the child's exit code: 0 done, 3 refused with an OSError, 4 anything else."""
    if os.geteuid() != 0:
        try:
            fn()
        except OSError:
            return 3
        return 0
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's outcome is its exit code
        code = 4
        try:
            os.setgid(65534)
            os.setuid(65534)
            fn()
            code = 0
        except OSError as exc:
            print(f"refused: {exc!r}", file=sys.stderr, flush=True)
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_prune_removes_no_marker_when_the_snapshot_cannot_be_deleted() -> None:
    # not below pytest's tmp_path: its parents are closed to the unprivileged user
    base = Path(tempfile.mkdtemp(prefix="moai-prune-"))
    try:
        run_dir = str(base / "run")
        saved_run(run_dir).close()
        for folder in [base, *(p for p in base.rglob("*") if p.is_dir())]:
            folder.chmod(0o777)  # the pruning user may delete everything...
        arrays = (p.parent for p in (Path(run_dir) / snapshot_dir(10)).rglob("c.*"))
        locked = next(arrays)
        locked.chmod(0o555)  # ...but the entries of one array directory (its chunks) inside the oldest snapshot
        code = as_unprivileged(lambda: moai_ckpt.Checkpointer(run_dir).prune(keep=2) and None)
        assert code == 3  # refused with an OSError (a StorageError naming the directory)
        locked.chmod(0o777)
        ckpt = moai_ckpt.Checkpointer(run_dir)
        assert ckpt.steps() == [10, 20, 30]  # the marker went nowhere: still committed, whole
        assert ckpt.verify(10).ok
        assert ckpt.prune(keep=2) == [10]
    finally:
        shutil.rmtree(base)


def test_prune_un_commits_before_it_deletes_and_a_half_done_prune_is_finished_later(
    tmp_path: Path,
) -> None:
    ckpt = moai_ckpt.Checkpointer(f"memory://{tmp_path.name}-prune")
    for step in (10, 20):
        ckpt.save(step, {"t": {"w": torch.full((64,), float(step))}, "x": {"step": step}})
    storage = ckpt.storage
    deleted: list[list[str]] = []
    real_rm = storage._rm  # type: ignore[attr-defined]

    def rm_then_fail(paths: list[str]) -> None:
        deleted.append([p.rsplit("/", 1)[-1] for p in paths])
        real_rm(paths)
        raise PermissionError("the store refused the next delete")

    storage._rm = rm_then_fail  # type: ignore[attr-defined]
    storage.retry = moai_ckpt.RetryPolicy(attempts=1)
    with pytest.raises(moai_ckpt.StorageError):
        ckpt.prune(keep=1)
    del storage._rm  # type: ignore[attr-defined]
    assert deleted == [[COMMIT]]  # the marker went first, alone
    assert ckpt.steps() == [20]  # step 10 is no longer a snapshot, though its data is still there
    assert [(e.step, e.status) for e in ckpt.scan()] == [(10, "uncommitted"), (20, "committed")]
    assert ckpt.prune(keep=1) == [10]
    assert [e.step for e in ckpt.scan()] == [20]


# -- the training relaunch ------------------------------------------------------------------------


def run_training(run_dir: Path, total: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MOAI_CKPT_FAULTS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.scenarios.ft_scenario", str(run_dir), str(total)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_a_relaunch_resumes_bitwise_past_malformed_markers_and_stray_names(tmp_path: Path) -> None:
    reference = run_training(tmp_path / "reference", 14)
    run = tmp_path / "run"
    run_training(run, 10)  # snapshots at 0, 4 and 8; the log runs to 10
    (run / snapshot_dir(4) / COMMIT).write_bytes(MALFORMED["body is a number"])
    (run / snapshot_dir(0) / COMMIT).write_bytes(MALFORMED["deep nesting"])
    for folder in (run / "snapshots" / STRAY, run / LOG / STRAY):
        folder.mkdir()
        (folder / COMMIT).write_bytes(b"{}")
    plant_stray_files(run / snapshot_dir(8))
    resumed = run_training(run, 14)
    assert resumed["digest"] == reference["digest"]
    assert resumed["first_step"] == 9 and resumed["replayed"] == 2


def test_directories_made_for_a_save_never_follow_a_planted_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    storage = LocalStorage(str(run))
    (run / snapshot_dir(1)).mkdir(parents=True)
    os.symlink(outside, run / snapshot_dir(1) / "model")  # where a group directory goes
    (run / snapshot_dir(2) / "model").mkdir(parents=True)
    os.symlink(outside, run / snapshot_dir(2) / "model" / "w")  # where an array directory goes
    for step in (1, 2):
        with pytest.raises(UnsafeEntryError, match="symbolic link"):
            storage.make_dirs([f"{snapshot_dir(step)}/model/w", f"{snapshot_dir(step)}/model/v"])
    (run / "plain").write_bytes(b"x")
    with pytest.raises(moai_ckpt.StorageError):
        storage.make_dirs(["plain/below"])
    assert list(outside.iterdir()) == []  # nothing was made through a link
    wanted = [f"{snapshot_dir(3)}/model/a", f"{snapshot_dir(3)}/model/b", f"{snapshot_dir(3)}/ranks"]
    storage.make_dirs(wanted)
    storage.make_dirs(wanted)  # made already: fine
    assert all((run / d).is_dir() and not (run / d).is_symlink() for d in wanted)
