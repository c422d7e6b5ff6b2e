"""What Checkpointer calls hand back: save handles, directory listings and verification reports."""

from __future__ import annotations

from concurrent.futures import Future, wait
from dataclasses import dataclass, field

from moai_ckpt.errors import CorruptSnapshotError
from moai_ckpt.format import CommitMarker
from moai_ckpt.layout import commit_key
from moai_ckpt.ranklocal import RankLocalChoice
from moai_ckpt.snapshot import Fault


class SaveHandle:
    """A snapshot being written in the background by `Checkpointer.save_async`.

    Attributes:
        step: the step being saved.
        stall_s: how long `save_async` blocked the caller (capture and host copies).
        persist: where it is written: ``"process"`` (the writer process) or ``"thread"``.
    """

    def __init__(self, step: int, future: Future[CommitMarker], stall_s: float, persist: str = "thread") -> None:
        self.step = step
        self.stall_s = stall_s
        self.persist = persist
        self._future = future
        self.observed = False

    def done(self) -> bool:
        """True once the snapshot is committed or has failed."""
        return self._future.done()

    def result(self, timeout: float | None = None) -> CommitMarker:
        """Wait for the commit and return its marker; raises the background error, if any."""
        self.observed = True
        return self._future.result(timeout)

    def exception(self) -> BaseException | None:
        return self._future.exception() if self._future.done() else None

    def wait(self, timeout: float | None = None) -> None:
        wait([self._future], timeout)

    def __repr__(self) -> str:
        state = "done" if self.done() else "writing"
        return f"SaveHandle(step={self.step}, {state}, stall {self.stall_s * 1e3:.1f} ms)"


@dataclass(frozen=True)
class RestoreInfo:
    """What the last `Checkpointer.restore` loaded (`Checkpointer.last_restore`).

    Attributes:
        url: the run directory.
        step: the step restored.
        rank_local: which copy of each rank-local array this rank restored (see `moai_ckpt.ranklocal`).
    """

    url: str
    step: int
    rank_local: RankLocalChoice


@dataclass(frozen=True)
class SnapshotEntry:
    """One directory under ``snapshots/`` and what its commit marker says."""

    step: int
    status: str  # committed | uncommitted | invalid | unsupported
    marker: CommitMarker | None = None
    problem: str | None = None


def skipped_message(skipped: list[SnapshotEntry], used: int | None) -> str:
    """Why newer snapshots with a damaged commit marker were passed over for step ``used``."""
    steps = ", ".join(str(e.step) for e in skipped)
    reasons = "; ".join(f"step {e.step}: {(e.problem or 'damaged').split(' [url=', 1)[0]}" for e in skipped)
    instead = f"step {used} is used instead" if used is not None else "no older snapshot is committed"
    return (
        f"newer snapshot(s) at step {steps} are not committed: their files are there but their commit marker "
        f"is damaged ({reasons}); {instead}"
    )


@dataclass
class VerifyReport:
    """The result of `Checkpointer.verify`."""

    url: str
    step: int
    faults: list[Fault] = field(default_factory=list)
    arrays: int = 0
    bytes_checked: int = 0  # bytes of chunks that were read and passed their checksums
    #: newer snapshots a restore passes over for this one, their marker damaged (each also a fault)
    passed_over: list[SnapshotEntry] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No fault: the snapshot is sound and no newer one is lost to a damaged marker."""
        return not self.faults

    @property
    def snapshot_ok(self) -> bool:
        """The snapshot itself is sound (the faults of newer snapshots it stands in for aside)."""
        passed_over = {commit_key(e.step) for e in self.passed_over}
        return all(f.key in passed_over for f in self.faults)

    def raise_if_failed(self) -> None:
        if self.faults:
            first = self.faults[0]
            raise CorruptSnapshotError(
                f"{len(self.faults)} fault(s), first: {first.message}", url=self.url, step=self.step, key=first.key
            )
