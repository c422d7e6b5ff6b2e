"""Nothing runs that storage names, no secret is written, and every CLI failure is one line.

Storage is untrusted: these tests tamper with ``run.json`` and the log as an attacker with write
access to the run directory would (re-sealing checksums), then run the real ``moai-ckpt`` CLI
and the real training job in processes of their own, and check what ran, what was written and
what was printed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import crc32c
import pytest
from typer.testing import CliRunner

import moai_ckpt
from moai_ckpt import cli
from moai_ckpt.entry import (
    NOT_RECORDED,
    EntrypointError,
    check_entrypoint,
    load_function,
    looks_secret,
    record_call,
)
from moai_ckpt.errors import StorageError, redact_url
from moai_ckpt.storage import RetryPolicy, Storage, open_storage
from moai_ckpt.testing import s3 as s3_kit
from replay.log import FRAME, RECORD_FRAME, segments
from replay.opstore import list_captures
from tests.scenarios.entry_scenario import marked, train_with_token

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
s3_server = s3_kit.s3_server  # the loopback S3 server fixture


def env(**extra: str) -> dict[str, str]:
    base = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
    for name in ("MOAI_CKPT_FAULTS", "MOAI_CKPT_SESSION", "MOAI_CKPT_DEBUG"):
        base.pop(name, None)
    return {**base, **extra}


def moai(*args: str | Path, timeout: float = 240, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a process of its own, with no terminal on stdin."""
    return subprocess.run(
        [sys.executable, "-m", "moai_ckpt.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env(**extra_env),
        stdin=subprocess.DEVNULL,
    )


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The process failed with exit code 2 and printed exactly one ``error:`` line, no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests.scenarios.ft_scenario, 7 steps: snapshots of steps 0 and 4, steps 5..7 in the log after 4."""
    run_dir = tmp_path_factory.mktemp("entry") / "run"
    done = subprocess.run(
        [sys.executable, "-m", "tests.scenarios.ft_scenario", str(run_dir), "7"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=env(MOAI_TEST_LOG_SYNC="1"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert moai_ckpt.Checkpointer(str(run_dir)).steps() == [0, 4]
    return run_dir


def copy_of(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def tamper_run_json(run: Path, function: str, args: list[Any]) -> None:
    """What an attacker with write access does: name any function, with any arguments."""
    info = json.loads((run / "run.json").read_text())
    info["entry"] = {"function": function, "args": args, "kwargs": {}}
    info["entrypoint"] = function
    (run / "run.json").write_text(json.dumps(info))


# -- nothing runs that storage names ----------------------------------------------------------------


FORMS = {
    "restore": ["restore", "{run}"],
    "restore --step --to": ["restore", "{run}", "--step", "6", "--to", "{tmp}/copy"],
    "restore --world-size": ["restore", "{run}", "--world-size", "2"],
    "replay --verify": ["replay", "{run}", "--verify"],
    "capture --step": ["capture", "{run}", "--step", "6"],
}


@pytest.mark.parametrize("form", FORMS)
def test_a_run_json_that_names_os_system_runs_in_no_cli_command(base_run: Path, tmp_path: Path, form: str) -> None:
    run = copy_of(base_run, tmp_path)
    pwned = tmp_path / "pwned"
    tamper_run_json(run, "os:system", [f"touch {pwned}"])
    args = [a.format(run=run, tmp=tmp_path) for a in FORMS[form]]
    line = one_error_line(moai(*args))
    assert not pwned.exists()
    assert '"os:system"' in line and "refused" in line and "--entrypoint" in line
    assert moai_ckpt.Checkpointer(str(run)).steps() == [0, 4]  # nothing was committed either


@pytest.mark.parametrize("form", ["restore", "capture --step"])
def test_a_training_function_run_json_names_runs_only_when_the_user_allows_it(
    base_run: Path, tmp_path: Path, form: str
) -> None:
    run = copy_of(base_run, tmp_path)
    pwned = tmp_path / "pwned"
    info = json.loads((run / "run.json").read_text())
    info["entry"] = {
        "function": "tests.scenarios.entry_scenario:marked",
        "kwargs": {"run_dir": str(run), "total": 7, "mark": str(pwned)},
    }
    (run / "run.json").write_text(json.dumps(info))
    line = one_error_line(moai(*[a.format(run=run, tmp=tmp_path) for a in FORMS[form]]))
    assert not pwned.exists()
    # what run.json names, and the ways on
    assert '"tests.scenarios.entry_scenario:marked"' in line and '"mark":' in line
    assert (
        "--entrypoint tests.scenarios.entry_scenario:marked" in line
        and "--trust-run-json" in line
        and "terminal" in line
    )


@pytest.mark.parametrize(
    "function", ["os:system", "subprocess:run", "builtins:eval", "shutil:rmtree", "moai_ckpt.run.worker:os.system"]
)
def test_the_standard_library_is_refused_even_when_run_json_is_trusted(
    base_run: Path, tmp_path: Path, function: str
) -> None:
    run = copy_of(base_run, tmp_path)
    pwned = tmp_path / "pwned"
    tamper_run_json(run, function, [f"touch {pwned}"] if "eval" not in function else [f"open('{pwned}', 'w')"])
    line = one_error_line(moai("replay", run, "--verify", "--trust-run-json"))
    assert not pwned.exists()
    assert "refused" in line


def test_trusting_run_json_still_runs_only_fault_tolerant_functions(base_run: Path, tmp_path: Path) -> None:
    run = copy_of(base_run, tmp_path)
    tamper_run_json(run, "tests.scenarios.entry_scenario:fails", [])  # importable, but no training function
    line = one_error_line(moai("restore", run, "--trust-run-json"))
    assert "not a moai_ckpt.fault_tolerant function" in line


@pytest.mark.parametrize("function", ["os:system", "subprocess:run", "builtins:eval", "shutil:rmtree"])
def test_the_standard_library_is_refused_as_an_entrypoint(base_run: Path, function: str) -> None:
    for command in (["restore", str(base_run)], ["replay", str(base_run), "--verify"]):
        result = CliRunner().invoke(cli.app, [*command, "--entrypoint", function, "--trust-run-json"])
        assert result.exit_code == 2, result.output
        assert "refused" in result.output and "standard library" in result.output


def test_entrypoints_in_the_standard_library_are_refused_before_anything_is_imported() -> None:
    for spec in ("antigravity:fly", "os.path:join", "_posixsubprocess:fork_exec", "posix:system", "__main__:main"):
        with pytest.raises(EntrypointError, match="refused"):
            check_entrypoint(spec)
    assert "antigravity" not in sys.modules  # importing it would open a web browser
    with pytest.raises(EntrypointError, match="refused"):
        check_entrypoint(f"{os.__file__}:system")  # the standard library's own file
    for spec in (
        "moai_ckpt.run.worker:os.system",
        "moai_ckpt.entry:importlib.import_module",
        "moai_ckpt.cli.sessions:subprocess.run",
    ):
        with pytest.raises(EntrypointError, match="refused"):
            load_function(spec)  # reached through another module's attributes
    with pytest.raises(EntrypointError, match="not a function name"):
        load_function("moai_ckpt.run.worker:__builtins__")
    with pytest.raises(EntrypointError, match=r"not a moai_ckpt\.fault_tolerant function"):
        load_function("tests.helpers:TinyNet", recorded=True)
    assert load_function("tests.scenarios.entry_scenario:marked", recorded=True) is marked


def test_with_nothing_to_replay_a_restore_needs_no_code_and_copies_the_verified_snapshot(
    base_run: Path, tmp_path: Path
) -> None:
    run = copy_of(base_run, tmp_path)
    pwned = tmp_path / "pwned"
    tamper_run_json(run, "os:system", [f"touch {pwned}"])
    copy = tmp_path / "copy"
    done = moai("restore", run, "--step", "4", "--to", copy)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no training code ran" in done.stdout
    assert not pwned.exists()
    target = moai_ckpt.Checkpointer(str(copy))
    assert target.steps() == [4] and target.verify(4).ok
    source_files = {
        p.relative_to(run): p.read_bytes() for p in (run / "snapshots/000000000004").rglob("*") if p.is_file()
    }
    copied_files = {
        p.relative_to(copy): p.read_bytes() for p in (copy / "snapshots/000000000004").rglob("*") if p.is_file()
    }
    assert copied_files == source_files
    verified = moai("replay", run, "--verify", "--step", "4")
    assert verified.returncode == 0 and "nothing to verify" in verified.stdout, verified.stderr
    assert not pwned.exists()


def test_a_copy_of_a_corrupt_snapshot_is_never_committed(base_run: Path, tmp_path: Path) -> None:
    run = copy_of(base_run, tmp_path)
    chunk = next(p for p in sorted((run / "snapshots/000000000004").rglob("c.*")) if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0x40
    chunk.write_bytes(bytes(data))
    line = one_error_line(moai("restore", run, "--step", "4", "--to", tmp_path / "copy"))
    assert "fails verification" in line
    assert moai_ckpt.Checkpointer(str(tmp_path / "copy")).steps() == []


def test_a_data_only_s3_directory_with_a_tampered_run_json_runs_nothing(
    base_run: Path, tmp_path: Path, s3_server: s3_kit.S3Server
) -> None:
    url = s3_server.url()
    local, remote = open_storage(str(base_run)), open_storage(url, **s3_server.storage_options)
    for key in local.list():
        remote.write(key, local.read(key))
    pwned = tmp_path / "pwned"
    info = json.loads(local.read("run.json"))
    info["entry"] = {"function": "os:system", "args": [f"touch {pwned}"], "kwargs": {}}
    remote.write("run.json", json.dumps(info).encode())
    options = [f"-o{k}={v}" for k, v in s3_server.storage_options.items() if isinstance(v, str)]
    for command in (["restore", url, *options], ["restore", url, "--step", "6", "--to", tmp_path / "c", *options]):
        one_error_line(moai(*command))
        assert not pwned.exists()


def _reseal_with_another_loss(run: Path, step: int) -> None:
    """Change the loss logged for ``step`` and recompute the frame's crc32c, as an attacker can."""
    storage = open_storage(str(run))
    for _, _, key in segments(storage, 4):
        data, out, at = storage.read(key), bytearray(), 0
        while at < len(data):
            kind, length, crc = FRAME.unpack_from(data, at)
            payload = data[at + FRAME.size : at + FRAME.size + length]
            if kind == RECORD_FRAME and json.loads(payload)["step"] == step:
                record = json.loads(payload)
                record["digests"]["loss"] *= 1.5
                payload = json.dumps(record).encode()
                crc = crc32c.crc32c(payload)
            out += FRAME.pack(kind, len(payload), crc) + payload
            at += FRAME.size + length
        storage.write(key, bytes(out))


def test_a_divergence_after_a_restart_captures_the_live_function_never_the_one_run_json_names(
    base_run: Path, tmp_path: Path
) -> None:
    run = copy_of(base_run, tmp_path)
    pwned = tmp_path / "pwned"
    tamper_run_json(run, "os:system", [f"touch {pwned}"])
    _reseal_with_another_loss(run, 5)
    relaunch = subprocess.run(
        [sys.executable, "-m", "tests.scenarios.ft_scenario", str(run), "9"],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
        env=env(MOAI_TEST_LOG_SYNC="1"),
    )
    assert relaunch.returncode != 0 and "ReplayDivergenceError" in relaunch.stderr, relaunch.stderr[-3000:]
    assert not pwned.exists()
    assert "re-running it under op capture" in relaunch.stderr and "ft_scenario.py:train" in relaunch.stderr
    labels = [r.label for r in list_captures(open_storage(str(run)), 5) if r.ranks]
    assert any(label.endswith("divergence") for label in labels), relaunch.stderr[-3000:]


# -- the user decides: --trust-run-json, --entrypoint, a confirmation on a terminal --------------------


def test_trust_run_json_runs_the_recorded_function_with_its_recorded_arguments(base_run: Path, tmp_path: Path) -> None:
    run = copy_of(base_run, tmp_path)
    done = moai("restore", run, "--trust-run-json", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)["report"]
    assert [s["step"] for s in report["steps"]] == [5, 6, 7] and all(s["bitwise"] for s in report["steps"])
    assert moai_ckpt.Checkpointer(str(run)).latest_step() == 7


def test_an_entrypoint_runs_with_the_arguments_the_user_gives(base_run: Path, tmp_path: Path) -> None:
    run = copy_of(base_run, tmp_path)
    tamper_run_json(run, "os:system", ["exit 3"])  # what run.json says no longer matters
    verify = ["replay", run, "--verify", "--json", "--entrypoint", "tests.scenarios.ft_scenario:train"]
    done = moai(*verify, "--kwarg", f"run_dir={run}", "--kwarg", "total=7")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [s["step"] for s in json.loads(done.stdout)["steps"]] == [5, 6, 7]
    # called without its arguments, the training function fails: one line, exit 2, a hint
    line = one_error_line(moai(*verify))
    assert "unexpected TypeError" in line and "--debug" in line and "run_dir" in line


def _on_a_terminal(args: list[str], answer: str | None, timeout: float = 240) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as stdin/stdout/stderr; answer its prompt (None: end of input)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on the terminal
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, "-m", "moai_ckpt.cli", *args], env(COLUMNS="200"))
    seen, answered, deadline = b"", False, time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError as exc:  # the child closed the terminal
                if exc.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            seen += chunk
        if not answered and b"[y/N]" in seen:
            os.write(fd, (answer + "\r").encode() if answer is not None else b"\x04")
            answered = True
    else:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), seen.decode(errors="replace")


def test_the_recorded_function_runs_after_a_yes_on_a_terminal_and_not_after_a_no(tmp_path: Path) -> None:
    run_dir, mark = tmp_path / "run", tmp_path / "calls"
    assert marked(run_dir=str(run_dir), total=5, mark=str(mark)) == 5  # snapshot of 4, step 5 in the log
    assert mark.read_text().count("called") == 1
    for answer in ("n", "", None):  # no, the default (Enter), end of input
        code, screen = _on_a_terminal(["restore", str(run_dir)], answer)
        assert code == 2, screen
        assert '"tests.scenarios.entry_scenario:marked"' in screen and '"total": 5' in screen and '"mark":' in screen
        assert "not confirmed" in screen
        assert mark.read_text().count("called") == 1  # it never ran
    code, screen = _on_a_terminal(["restore", str(run_dir)], "y")
    assert code == 0, screen
    assert mark.read_text().count("called") == 2
    assert moai_ckpt.Checkpointer(str(run_dir)).latest_step() == 5


# -- secrets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("api_token", True),
        ("token", True),
        ("hfToken", True),
        ("aws_secret_access_key", True),
        ("api_key", True),
        ("key", True),
        ("password", True),
        ("db_passwd", True),
        ("credentials", True),
        ("auth", True),
        ("authtoken", True),
        ("lr", False),
        ("total", False),
        ("monkey", False),
        ("keyboard_layout", False),
        ("max_tokens", False),
        ("run_dir", False),
    ],
)
def test_argument_names_that_look_secret(name: str, secret: bool) -> None:
    assert looks_secret(name) is secret


def _job(run: object, run_dir: str, api_key: str, *rest: int, config: dict[str, Any], lr: float = 0.1) -> None:
    """A training function's signature, for recording (never called)."""


def test_a_recorded_call_keeps_json_arguments_and_leaves_secrets_out() -> None:
    secret_config = {"wandb": {"api_key": "k-9"}, "url": "s3://AKIA:pw@bucket/x", "layers": 4}
    entry = record_call(_job, ("runs/1", "k-1", 7), {"config": secret_config, "lr": 0.5, "extra": object()})
    assert entry["function"] == f"{__name__}:_job"
    assert entry["args"][0] == "runs/1" and entry["args"][2] == 7
    assert entry["args"][1] == {NOT_RECORDED: "api_key", "reason": "secret-looking name"}
    config = entry["kwargs"]["config"]
    assert config["layers"] == 4 and config["wandb"]["api_key"][NOT_RECORDED] == "config.wandb.api_key"
    assert config["url"] == {NOT_RECORDED: "config.url", "reason": "a URL with credentials"}
    assert entry["kwargs"]["lr"] == 0.5 and entry["kwargs"]["extra"]["reason"].startswith("not JSON-able")
    text = json.dumps(entry)
    assert "k-1" not in text and "k-9" not in text and ":pw@" not in text
    # an allow-list: only the names it lists, as given (a listed secret-looking name included)
    allowed = record_call(_job, ("runs/1", "k-1"), {"config": {}, "lr": 0.5}, record_args={"run_dir", "api_key"})
    assert allowed["args"] == ["runs/1", "k-1"]
    assert allowed["kwargs"]["lr"] == {NOT_RECORDED: "lr", "reason": "not in record_args"}


def test_run_json_records_no_secret_and_no_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py", "--aws-secret=AKIA-SECRET-1", "--api-token", "tok-3141"])
    run_dir = tmp_path / "run"
    assert train_with_token(run_dir=str(run_dir), total=3, api_token="tok-3141") == 3
    text = (run_dir / "run.json").read_text()
    assert "tok-3141" not in text and "AKIA-SECRET-1" not in text and "argv" not in text and "train.py" not in text
    info = json.loads(text)
    assert info["entrypoint"] == info["entry"]["function"] == "tests.scenarios.entry_scenario:train_with_token"
    assert info["entry"]["kwargs"]["api_token"] == {NOT_RECORDED: "api_token", "reason": "secret-looking name"}
    assert info["entry"]["kwargs"]["total"] == 3


def test_a_restore_asks_for_the_arguments_run_json_does_not_record(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_with_token(run_dir=str(run_dir), total=3, api_token="tok-3141")  # snapshot of 2, step 3 logged
    line = one_error_line(moai("restore", run_dir, "--trust-run-json"))
    assert "api_token" in line and "--kwarg" in line
    wrong = moai("restore", run_dir, "--trust-run-json", "--kwarg", "api_token=tok-0000")
    assert "unexpected PermissionError: wrong api_token" in one_error_line(wrong)  # it reaches the function
    # the token from the environment, off the command line
    done = moai("restore", run_dir, "--trust-run-json", "--kwarg-env", "api_token=MY_TOKEN", MY_TOKEN="tok-3141")
    assert done.returncode == 0, done.stderr[-3000:]  # the function checks it got the real token
    assert "tok-3141" not in done.stdout + done.stderr
    assert moai_ckpt.Checkpointer(str(run_dir)).latest_step() == 3
    unset = CliRunner().invoke(cli.app, ["restore", str(run_dir), "--kwarg-env", "api_token=NO_SUCH_VARIABLE_SET"])
    assert unset.exit_code == 2 and "NO_SUCH_VARIABLE_SET" in unset.output


def test_fault_tolerant_records_only_the_allowed_arguments(tmp_path: Path) -> None:
    @moai_ckpt.fault_tolerant(storage="{run_dir}", snapshot_every=2, record_args=["run_dir"])
    def job(run: moai_ckpt.Run, run_dir: str, name: str) -> None:
        run.track(extra={"x": 1})
        for _ in run.steps(1):
            run.record(loss=0.0)

    job(run_dir=str(tmp_path / "run"), name="private-run-name")
    entry = json.loads((tmp_path / "run" / "run.json").read_text())["entry"]
    assert entry["kwargs"] == {
        "run_dir": str(tmp_path / "run"),
        "name": {NOT_RECORDED: "name", "reason": "not in record_args"},
    }
    with pytest.raises(TypeError, match="record_args"):
        moai_ckpt.fault_tolerant(storage="x", record_args="run_dir")


def test_storage_options_and_the_command_line_are_never_recorded(
    base_run: Path, tmp_path: Path, s3_server: s3_kit.S3Server
) -> None:
    source = copy_of(base_run, tmp_path)
    (source / "run.json").unlink()  # a source without run.json: the target writes its own
    secret = "hunter2-do-not-store"
    for step, target in ((6, s3_server.url()), (4, s3_server.url())):  # replayed, and copied from the data
        command = ["restore", source, "--step", str(step), "--to", target, "-o", f"secret={secret}"]
        done = moai(
            *command,
            "--entrypoint",
            "tests.scenarios.ft_scenario:train",
            "--kwarg",
            f"run_dir={source}",
            "--kwarg",
            "total=7",
        )
        assert done.returncode == 0, done.stderr[-3000:]
        stored = open_storage(target, **s3_server.storage_options)
        assert stored.list("snapshots") and moai_ckpt.Checkpointer(target, **s3_server.storage_options).steps() == [
            step
        ]
        for key in stored.list():
            data = stored.read(key)
            assert secret.encode() not in data and b"restore" not in data and b"--kwarg" not in data, key


# -- passwords in URLs -----------------------------------------------------------------------------------


def test_errors_never_show_a_password_in_a_url() -> None:
    error = StorageError("failed: http://user:pw-77@host/run/x", url="s3://AKIA:pw-88@bucket/run", key="k")
    assert "pw-77" not in str(error) and "pw-88" not in str(error) and "pw-88" not in (error.url or "")
    assert "s3://***@bucket/run" in str(error)
    assert redact_url("gs://bucket/a@b and memory://x") == "gs://bucket/a@b and memory://x"


class _Flaky(Storage):
    """Storage whose reads time out twice, then succeed."""

    def __init__(self, url: str) -> None:
        super().__init__(url, RetryPolicy(attempts=4, initial_backoff_s=0.001, max_backoff_s=0.002, jitter_s=0.0))
        self.failures = 2

    def _read(self, key: str) -> bytes:
        if self.failures:
            self.failures -= 1
            raise TimeoutError(f"timed out talking to {self.url}")
        return b"ok"

    def _size(self, key: str) -> int:
        return 2


def test_storage_retry_warnings_never_show_a_password(caplog: pytest.LogCaptureFixture) -> None:
    storage = _Flaky("https://user:pw-99@example.invalid/run")
    with caplog.at_level(logging.WARNING, logger="moai_ckpt.storage"):
        assert storage.read("x") == b"ok"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("https://***@example.invalid/run" in m for m in warnings)
    assert not any("pw-99" in m for m in warnings)


def test_the_cli_never_prints_a_password_in_a_url() -> None:
    retry = '-oretry={"attempts": 2, "initial_backoff_s": 0.01, "deadline_s": 5}'
    done = moai("list", "http://user:pw-42@127.0.0.1:9/run", retry, timeout=60)
    line = one_error_line(done)
    assert "pw-42" not in done.stdout + done.stderr
    assert "http://***@127.0.0.1:9/run" in line
    assert "retrying" in done.stderr  # the retry warning was printed, without the password


# -- every CLI failure is one line -------------------------------------------------------------------------


def test_a_step_out_of_range_is_a_usage_error(base_run: Path) -> None:
    for step in ("1e20", "100000000000000000000"):
        result = CliRunner().invoke(cli.app, ["inspect", str(base_run), "--step", step])
        assert result.exit_code == 2, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert "Traceback" not in result.output and "--step" in result.output


def test_an_unexpected_exception_is_one_line_exit_2_and_a_traceback_only_with_debug(
    base_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: object) -> None:
        raise RuntimeError("something broke\ninside")

    monkeypatch.setattr(moai_ckpt.Checkpointer, "scan", broken)
    result = CliRunner().invoke(cli.app, ["list", str(base_run)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert (
        result.output.strip()
        == "error: unexpected RuntimeError: something broke; inside; re-run with --debug for the traceback"
    )
    debug = CliRunner().invoke(cli.app, ["--debug", "list", str(base_run)])
    assert debug.exit_code == 2 and "Traceback" in debug.output and "something broke" in debug.output


def test_a_failure_of_the_training_code_in_a_restore_is_one_line(base_run: Path, tmp_path: Path) -> None:
    run = copy_of(base_run, tmp_path)
    line = one_error_line(moai("restore", run, "--entrypoint", "tests.scenarios.entry_scenario:fails"))
    assert "unexpected ArithmeticError: planted failure in the training code" in line


def test_moai_ckpt_errors_keep_their_own_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.app, ["inspect", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("error: no committed snapshot")
