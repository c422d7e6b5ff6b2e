"""What snapshots a run directory holds: every step's status, read from its commit marker, and
opening one to read.

A snapshot is committed if and only if its marker exists and validates; a marker of a newer
format version lists the step too (as "unsupported": a restore says to upgrade), and a damaged
one means "not committed" ("invalid"), though its files may still be there. Listing is cheap:
one directory listing, then markers read newest first where only the newest is wanted.
"""

from __future__ import annotations

from concurrent.futures import Executor

from moai_ckpt.errors import CorruptSnapshotError, SnapshotNotFoundError, UnsupportedFormatError
from moai_ckpt.format import load_commit
from moai_ckpt.layout import SNAPSHOTS, commit_key, snapshot_steps
from moai_ckpt.options import valid_step
from moai_ckpt.results import SnapshotEntry
from moai_ckpt.snapshot import DEFAULT_MAX_ARRAY_BYTES, SnapshotReader
from moai_ckpt.storage import Storage

#: the statuses that count as a snapshot of the run (`SnapshotCatalog.steps`)
LISTED = ("committed", "unsupported")


class SnapshotCatalog:
    """The snapshots of one run directory, with their status.

    Args:
        storage: the run directory.
        executor: runs the chunk reads of the snapshots it opens.
        max_array_bytes: the largest array a read allocates (`CheckpointerOptions.max_array_bytes`).
    """

    def __init__(self, storage: Storage, executor: Executor, *, max_array_bytes: int = DEFAULT_MAX_ARRAY_BYTES) -> None:
        self.storage = storage
        self.executor = executor
        self.max_array_bytes = max_array_bytes

    def open(self, step: int) -> SnapshotReader:
        """The committed snapshot at ``step``, its marker, manifest and rank indexes checked."""
        return SnapshotReader(self.storage, step, self.executor, max_array_bytes=self.max_array_bytes)

    def entry(self, step: int) -> SnapshotEntry:
        """The status of the snapshot folder at ``step``, from its commit marker."""
        try:
            # bounded, and refused at once if it is a link, a FIFO or a device
            data = self.storage.read_record(commit_key(step))
            return SnapshotEntry(step, "committed", load_commit(data, url=self.storage.url, step=step))
        except FileNotFoundError:
            return SnapshotEntry(step, "uncommitted")
        except UnsupportedFormatError as exc:
            return SnapshotEntry(step, "unsupported", problem=str(exc))
        except CorruptSnapshotError as exc:
            return SnapshotEntry(step, "invalid", problem=str(exc))

    def folders(self) -> list[int]:
        """The step of every snapshot folder, committed or not, ascending."""
        return snapshot_steps(self.storage.list_dirs(SNAPSHOTS), self.storage.url)

    def scan(self) -> list[SnapshotEntry]:
        """Every snapshot folder with its status, oldest first (committed or not)."""
        return [self.entry(step) for step in self.folders()]

    def steps(self) -> list[int]:
        """Steps of committed snapshots, oldest first (including ones of a newer format version)."""
        return [e.step for e in self.scan() if e.status in LISTED]

    def latest_step(self) -> int | None:
        """The newest committed step (reads markers newest first and stops at the first valid one)."""
        for step in reversed(self.folders()):
            if self.entry(step).status in LISTED:
                return step
        return None

    def resolve(self, step: int | None) -> int:
        """``step`` checked, or the newest committed one (`SnapshotNotFoundError` if there is none)."""
        if step is not None:
            return valid_step(step)
        latest = self.latest_step()
        if latest is None:
            raise SnapshotNotFoundError("no committed snapshot in this run directory", url=self.storage.url)
        return latest

    def damaged_after(self, step: int | None) -> list[SnapshotEntry]:
        """Snapshots newer than ``step`` (all, for None) whose commit marker is there but damaged."""
        newer = [s for s in self.folders() if step is None or s > step]
        return [e for e in map(self.entry, newer) if e.status == "invalid"]
