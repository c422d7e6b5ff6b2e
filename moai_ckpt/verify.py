"""Verifying a snapshot: every chunk re-read and every record checked, every fault reported.

`SnapshotReader` checks what it opens (marker, manifest, rank indexes) and `SnapshotReader.verify`
decodes every state tree and re-reads every chunk. Verifying the newest committed snapshot also
reports the newer ones a restore passes over because their marker is damaged: their work is
lost, and the report says so.
"""

from __future__ import annotations

import threading

from moai_ckpt.catalog import SnapshotCatalog
from moai_ckpt.errors import MoaiCkptError, SnapshotNotFoundError, UnsupportedFormatError
from moai_ckpt.layout import commit_key
from moai_ckpt.results import VerifyReport, skipped_message
from moai_ckpt.snapshot import Fault, Progress


def verify(catalog: SnapshotCatalog, step: int | None = None, progress: Progress | None = None) -> VerifyReport:
    """Verify the snapshot at ``step`` (the newest committed one by default); see `Checkpointer.verify`."""
    latest = catalog.latest_step()
    step = catalog.resolve(step if step is not None else latest)
    report = VerifyReport(catalog.storage.url, step)
    if step == latest:
        skipped = report.passed_over = catalog.damaged_after(step)
        if skipped:
            message = skipped_message(skipped, step)
            report.faults.extend(Fault(commit_key(e.step), "CorruptSnapshotError", message) for e in skipped)
    try:
        reader = catalog.open(step)
    except (SnapshotNotFoundError, UnsupportedFormatError):
        raise
    except MoaiCkptError as exc:
        report.faults.append(Fault(exc.key or "", type(exc).__name__, str(exc)))
        return report
    report.arrays = len(reader.arrays)
    lock = threading.Lock()

    def count(nbytes: int) -> None:
        with lock:
            report.bytes_checked += nbytes
        if progress is not None:
            progress(nbytes)

    report.faults.extend(reader.verify(count))
    return report
