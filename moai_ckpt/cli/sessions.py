"""Running an offline session of a training function: what it will do, and running it.

``moai-ckpt restore``, ``replay --verify`` and ``capture`` re-run the run's training function in a
session (`moai_ckpt.run.session.Session`): it restores the newest snapshot at or before the target,
replays the logged steps with their digests checked, and stops at the target step. `ReplayPlan`
reads what that will take from the run directory before anything runs; `run_session` runs the
chosen `Code` in this process, or on several ranks started with torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.markup import escape

from moai_ckpt.cli.base import MAX_STEP, err, open_run, shown_url
from moai_ckpt.cli.terminal import progress
from moai_ckpt.entry import CALL_ENV, RecordedCall, describe, parse_recorded
from moai_ckpt.errors import CorruptSnapshotError, MoaiCkptError, SnapshotNotFoundError
from moai_ckpt.format import RunInfo
from moai_ckpt.layout import RUN_INFO
from moai_ckpt.run.session import DEVICE_ENV, Session, on_progress
from moai_ckpt.run.worker import call
from replay.check import ReplayReport
from replay.log import records_after

__all__ = [
    "Code",
    "DeviceOpt",
    "ReplayPlan",
    "TargetOpt",
    "WorldOpt",
    "announce",
    "run_session",
]

WorldOpt = Annotated[
    int, typer.Option("--world-size", "-w", min=1, help="Ranks to replay on (several: started with torchrun).")
]
DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", "-d", help="cpu or cuda: where run.device puts the model (default: cuda if present)."),
]
TargetOpt = Annotated[
    int | None,
    typer.Option("--step", "-s", min=0, max=MAX_STEP, help="The step to reach (default: the last logged step)."),
]


class ReplayPlan:
    """What a session will do, read from the run directory before anything runs."""

    def __init__(self, url: str, storage_option: list[str] | None, step: int | None) -> None:
        self.storage_option = storage_option
        with open_run(url, storage_option) as ckpt:
            snapshots = [s for s in ckpt.steps() if step is None or s <= step]
            if not snapshots:
                raise SnapshotNotFoundError(
                    "no committed snapshot" + (f" at or before step {step}" if step is not None else ""), url=ckpt.url
                )
            self.base = snapshots[-1]
            contents = records_after(ckpt.storage, self.base)
            self.logged_last = contents.last_step
            self.problem = str(contents.corruption) if contents.corruption is not None else None
            self.target = self.logged_last if step is None else step
            if self.target > self.logged_last:
                raise SnapshotNotFoundError(
                    f"step {self.target} is past the end of the log after snapshot {self.base} "
                    f"(it ends at step {self.logged_last})",
                    url=ckpt.url,
                )
            self.url = ckpt.url

    @property
    def needs_code(self) -> bool:
        """Whether steps must be replayed (by the training function) to reach the target."""
        return self.target > self.base

    def recorded(self) -> RecordedCall | None:
        """The call ``run.json`` records: data to show and, if the user trusts it, to use."""
        with open_run(self.url, self.storage_option) as ckpt:
            if not ckpt.storage.exists(RUN_INFO):
                return None
            data = ckpt.storage.read_record(RUN_INFO)
        try:
            info = RunInfo.model_validate_json(data)
        except ValidationError as exc:
            message = f"run.json does not validate: {exc.errors()[0]['msg']}"
            raise CorruptSnapshotError(message, url=self.url, key=RUN_INFO) from None
        return parse_recorded(info.entry, self.url)


@dataclass(frozen=True)
class Code:
    """The training function a session runs, with its arguments."""

    function: str
    args: list[Any]
    kwargs: dict[str, Any]
    recorded: bool  # named by run.json (and trusted): it must be a fault_tolerant function


# -- running a session -----------------------------------------------------------------------------


def run_session(
    plan: ReplayPlan,
    code: Code,
    session: Session,
    world_size: int,
    device: str | None,
    show_progress: bool | None = None,
) -> ReplayReport:
    """Run the training function under ``session``: in this process (with a progress bar of its steps,
    `moai_ckpt.cli.terminal.progress`), or on ``world_size`` ranks."""
    env = dict(session.to_env())
    if device is not None:
        if device not in ("cpu", "cuda"):
            raise typer.BadParameter("expected cpu or cuda", param_hint="'--device'")
        env[DEVICE_ENV] = device
    with tempfile.TemporaryDirectory(prefix="moai-session-") as scratch:
        report_path = os.path.join(scratch, "report.json")
        env.update(session.model_copy(update={"report": report_path}).to_env())
        if world_size == 1:
            _in_process(plan, code, env, session.mode, show_progress)
        else:
            _with_torchrun(code, env, world_size)
        if not os.path.exists(report_path):
            raise MoaiCkptError("the training function returned without reaching the target step", url=plan.url)
        with open(report_path) as f:
            return ReplayReport.model_validate_json(f.read())


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _in_process(plan: ReplayPlan, code: Code, env: dict[str, str], mode: str, show: bool | None) -> None:
    with _environment(env), progress("steps", show=show) as bar:
        task = bar.add_task(f"{mode}: replaying from step {plan.base}", total=plan.target - plan.base)
        on_progress(lambda step, target: bar.update(task, completed=step - plan.base))
        try:
            call(code.function, code.args, code.kwargs, recorded=code.recorded)
        finally:
            on_progress(None)


def _with_torchrun(code: Code, env: dict[str, str], world_size: int) -> None:
    # the arguments travel in the environment: a process list shows command lines to every user
    given = json.dumps({"args": code.args, "kwargs": code.kwargs, "recorded": code.recorded})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={world_size}",
        "-m",
        "moai_ckpt.run.worker",
        code.function,
    ]
    err.print(f"starting {world_size} ranks with torchrun", style="dim")
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    result = subprocess.run(cmd, env={**os.environ, **env, CALL_ENV: given, "OMP_NUM_THREADS": threads})
    if result.returncode != 0:
        raise MoaiCkptError(f"the replay ranks failed (torchrun exit code {result.returncode}); see their output above")


def announce(plan: ReplayPlan, code: Code, what: str) -> None:
    """Say on stderr what the session will replay, and through which function."""
    err.print(
        f"{what} {escape(shown_url(plan.url))}: snapshot {plan.base}, replaying steps {plan.base + 1}..{plan.target} "
        f"through {escape(describe(code.function))}" + (" (as run.json records it)" if code.recorded else ""),
        style="dim",
        soft_wrap=True,
    )
