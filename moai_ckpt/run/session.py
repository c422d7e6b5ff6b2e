"""How a run is being run: live (it trains and writes), or as an offline session of the CLI.

``moai-ckpt restore`` and ``moai-ckpt replay --verify`` re-run a user's training function to
replay its log. The CLI says what it wants through the environment variable ``MOAI_CKPT_SESSION``
(JSON, validated by `Session`), so the same mechanism works in one process and in every rank
torchrun starts. A `Run` holds one `RunMode` and asks it every question on which a live run and
a session differ: `Live` takes the writer lease, continues the log and takes snapshots; `Offline`
reads the run as it is, stops at its target step, commits the state there (restore) or only
reports (verify), and raises `RestoreComplete` out of the training loop.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, Protocol

from pydantic import BaseModel, ConfigDict, Field

from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.errors import SnapshotNotFoundError
from moai_ckpt.layout import RUN_INFO
from replay.check import ReplayReport

ENV = "MOAI_CKPT_SESSION"
DEVICE_ENV = "MOAI_CKPT_DEVICE"

__all__ = [
    "DEVICE_ENV",
    "ENV",
    "Completion",
    "Live",
    "Offline",
    "RestoreComplete",
    "RunMode",
    "Session",
    "mode_from_env",
    "on_progress",
]


class Session(BaseModel):
    """What the CLI asks of a training function it re-runs.

    ``restore``: replay up to ``step`` (default: the last logged step) and commit the state there
    as a snapshot (in ``to`` if given), then stop. ``verify``: replay and compare every step with
    its record without stopping at a mismatch, write nothing, then stop.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["restore", "verify"]
    storage: str
    step: int | None = Field(default=None, ge=0)
    to: str | None = None
    report: str | None = Field(default=None, description="local path for rank 0's JSON report")
    progress: bool = False
    capture_ops: list[int] = Field(default_factory=list, description="steps to capture the op stream of")

    @classmethod
    def from_env(cls) -> Session | None:
        raw = os.environ.get(ENV)
        return cls.model_validate_json(raw) if raw else None

    def to_env(self) -> dict[str, str]:
        return {ENV: self.model_dump_json()}


class RestoreComplete(BaseException):
    """Raised out of the training loop once a restore or verify session is done.

    A BaseException so that the user's ``except Exception`` blocks let it through.
    """

    def __init__(self, report: Any) -> None:
        super().__init__("restore session complete")
        self.report = report


_progress: Callable[[int, int], None] | None = None


def on_progress(hook: Callable[[int, int], None] | None) -> None:
    """Call ``hook(step, target)`` after each step a session replays in this process."""
    global _progress
    _progress = hook


@dataclass
class Completion:
    """What a session needs from the run when it reaches its target step."""

    ckpt: Checkpointer
    step: int
    state: Callable[[], dict[str, Any]]  # what a snapshot holds, built only when one is written
    info: dict[str, Any] | None
    report: ReplayReport
    rank: int


class RunMode(Protocol):
    """The questions on which a live run and an offline session differ."""

    @property
    def writes(self) -> bool:
        """Whether the run takes the writer lease, continues the log and takes snapshots."""
        ...

    def storage_url(self, url: str) -> str:
        """The run directory the run opens (``url``, as the training function names it, or the session's)."""
        ...

    def capture_steps(self) -> list[int]:
        """Steps whose op stream this run captures from the start."""
        ...

    def restore_bound(self) -> int | None:
        """The newest snapshot step a restore may pick (None: any)."""
        ...

    def require_snapshot(self, url: str) -> None:
        """Called when the run directory holds no committed snapshot: a new run, or an error."""
        ...

    def stop_step(self, logged_last: int, url: str) -> int | None:
        """The step the run stops at, given the last logged step (None: it trains on)."""
        ...

    def replay_strict(self, same_placement: bool) -> bool:
        """Whether a replayed step that differs from its record is an error."""
        ...

    def progress(self, step: int, stop: int, rank: int) -> None:
        """A replayed step before the stop step completed."""
        ...

    def complete(self, done: Completion) -> NoReturn:
        """The stop step is reached: commit or report, then leave the training loop."""
        ...


class Live:
    """A training run: it writes snapshots and the log, and runs until its loop ends."""

    writes = True

    def storage_url(self, url: str) -> str:
        return url

    def capture_steps(self) -> list[int]:
        return []

    def restore_bound(self) -> int | None:
        return None

    def require_snapshot(self, url: str) -> None:
        return None  # a new run: its base snapshot is taken from the state the function built

    def stop_step(self, logged_last: int, url: str) -> int | None:
        return None

    def replay_strict(self, same_placement: bool) -> bool:
        return same_placement

    def progress(self, step: int, stop: int, rank: int) -> None:
        return None

    def complete(self, done: Completion) -> NoReturn:
        raise AssertionError("a live run has no stop step")


class Offline:
    """A ``moai-ckpt restore`` or ``replay --verify`` session: replay up to a step, then commit or report."""

    writes = False

    def __init__(self, session: Session) -> None:
        self.session = session

    def storage_url(self, url: str) -> str:
        return self.session.storage

    def capture_steps(self) -> list[int]:
        return list(self.session.capture_ops)

    def restore_bound(self) -> int | None:
        step = self.session.step
        if step is not None and step in self.session.capture_ops:
            return step - 1  # a captured step must run: restore a snapshot before it
        return step

    def require_snapshot(self, url: str) -> None:
        raise SnapshotNotFoundError("no committed snapshot to restore from", url=url)

    def stop_step(self, logged_last: int, url: str) -> int:
        wanted = self.session.step
        if wanted is None:
            return logged_last
        if wanted > logged_last:
            raise SnapshotNotFoundError(f"step {wanted} is past the end of the log (step {logged_last})", url=url)
        return wanted

    def replay_strict(self, same_placement: bool) -> bool:
        return same_placement and self.session.mode == "restore"

    def progress(self, step: int, stop: int, rank: int) -> None:
        if not self.session.progress:
            return
        if _progress is not None:
            _progress(step, stop)
        elif rank == 0:
            print(f"moai-ckpt: replayed step {step} of {stop}", file=sys.stderr, flush=True)

    def complete(self, done: Completion) -> NoReturn:
        """Commit the state at the target as a snapshot (restore; in ``to`` if given), write the report, stop."""
        if self.session.mode == "restore":
            started = time.perf_counter()
            self._commit(done)
            done.report.snapshot_s = time.perf_counter() - started
        if done.rank == 0 and self.session.report:
            with open(self.session.report, "w") as f:
                f.write(done.report.model_dump_json(indent=1))
        raise RestoreComplete(done.report)

    def _commit(self, done: Completion) -> None:
        to = self.session.to
        source = done.ckpt
        target = Checkpointer(to, collective_timeout_s=source.options.collective_timeout_s) if to else source
        try:
            if to and done.rank == 0 and not target.storage.exists(RUN_INFO) and source.storage.exists(RUN_INFO):
                target.storage.write(RUN_INFO, source.storage.read_record(RUN_INFO))
            if target.latest_step() != done.step or to:
                target.save(done.step, done.state(), overwrite=bool(to), info=done.info)
        finally:
            if target is not source:
                target.close()


def mode_from_env() -> RunMode:
    """The mode ``MOAI_CKPT_SESSION`` asks for: `Offline` when set, else `Live`."""
    session = Session.from_env()
    return Live() if session is None else Offline(session)
