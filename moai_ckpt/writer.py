"""This process as the writer of a run: its lease, the steps it is writing, a step made ready to write.

A `Checkpointer` writes through one `RunWriter`. Its coordinator takes the run's writer lease
(`moai_ckpt.lease`, shared by every Checkpointer of the process on that run) on the first write,
claims each step before any rank writes a byte of it, and clears what an interrupted save left
there. Every process also keeps the set of steps it is writing, which prune leaves alone, and
tells prune which uncommitted steps another live writer has claimed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from moai_ckpt.errors import FencingError, SnapshotExistsError, UnsafeEntryError
from moai_ckpt.layout import claim_key, commit_key, snapshot_dir
from moai_ckpt.lease import RunLease, attach, detach, live_lease, read_claim
from moai_ckpt.storage import Storage

log = logging.getLogger("moai_ckpt")


class RunWriter:
    """The writer side of one run directory, in this process.

    Args:
        storage: the run directory.
        lease_ttl_s: how long the lease lasts unless renewed (`CheckpointerOptions.lease_ttl_s`).
    """

    def __init__(self, storage: Storage, lease_ttl_s: float) -> None:
        self.storage = storage
        self.lease_ttl_s = lease_ttl_s
        #: the run's writer lease, once this process took it (the coordinator, on its first write)
        self.lease: RunLease | None = None
        self._writing: set[int] = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.storage.url

    # -- the lease -------------------------------------------------------------------------------

    def hold(self) -> RunLease:
        """Hold the run's lease (taking it if needed; coordinator only).

        Raises:
            RunLockedError: another live writer holds the run.
        """
        if self.lease is None:
            self.lease = attach(self.storage, self.lease_ttl_s)
        self.lease.acquire()
        return self.lease

    def check(self) -> None:
        """Raise `LeaseLostError` if this process took the lease and no longer holds it (no I/O)."""
        if self.lease is not None:
            self.lease.check()

    def fence(self) -> Callable[..., None] | None:
        """The check a snapshot writer calls before each chunk and before its commit marker
        (`moai_ckpt.lease.RunLease.check`), or None where this process holds no lease."""
        return self.lease.check if self.lease is not None else None

    def close(self) -> None:
        """Let go of the lease (the last Checkpointer of the run in this process releases it)."""
        lease, self.lease = self.lease, None
        if lease is not None:
            detach(lease)

    # -- a step to write -------------------------------------------------------------------------

    def prepare(self, step: int, overwrite: bool) -> None:
        """Coordinator, before any rank writes: hold the run, claim the step, clear leftovers.

        Raises:
            SnapshotExistsError: a commit marker is at ``step`` and ``overwrite`` is off.
            FencingError: another writer holds the run, or has claimed the step.
        """
        lease = self.hold()
        self._refuse_or_clear_marker(step, overwrite)
        lease.claim(step)  # from here no other writer touches this step
        self._clear(step, overwrite)

    def _refuse_or_clear_marker(self, step: int, overwrite: bool) -> None:
        """Refuse to write over a commit marker (valid or damaged) unless ``overwrite``.

        A link or special file where the step's directory belongs is no snapshot: it is removed
        (the entry itself; a link is never followed) so the step can be written.
        """
        prefix = snapshot_dir(step)
        try:
            marked = self.storage.exists(commit_key(step))
        except UnsafeEntryError as exc:
            if exc.key != prefix:
                marked = True  # a link or FIFO as the marker: not ours to ignore
            else:
                log.warning("removing %s from %s: %s", prefix, self.url, exc)
                self.storage.delete_tree(prefix)
                marked = False
        if marked and not overwrite:
            raise SnapshotExistsError(
                "a commit marker exists at this step (a committed snapshot, or a damaged one: see "
                "`moai-ckpt list --all`); pass overwrite=True to replace it",
                url=self.url,
                step=step,
            )

    def _clear(self, step: int, overwrite: bool) -> None:
        """Coordinator, holding the step's claim: remove what an interrupted save left there.

        Everything goes but the claim, whatever its names or kinds (a stray ``.nfs…`` file, a
        link, which is removed, never followed); a committed marker first, so readers never see
        a mix of two snapshots.
        """
        self._refuse_or_clear_marker(step, overwrite)  # again, under the claim
        self.storage.delete_tree(snapshot_dir(step), first=[commit_key(step)], keep=[claim_key(step)])

    def release_claim(self, step: int) -> None:
        """Give up this writer's storage claim on ``step`` (after its commit), if it made one."""
        if self.lease is not None:
            self.lease.forget_claim(step)

    # -- steps in progress -----------------------------------------------------------------------

    @contextmanager
    def writing(self, step: int) -> Iterator[None]:
        """Mark ``step`` as being written by this process (prune leaves it alone)."""
        with self._lock:
            if step in self._writing:
                raise SnapshotExistsError("a save of this step is already in progress", url=self.url, step=step)
            self._writing.add(step)
        try:
            yield
        except Exception as exc:
            self.failed(step, exc)
            raise
        finally:
            with self._lock:
                self._writing.discard(step)

    def failed(self, step: int, error: Exception) -> None:
        """After a failed save, give up this writer's storage claim on ``step`` (if it made one):
        its leftovers are then plain leftovers. A writer fenced off touches nothing more."""
        if not isinstance(error, FencingError):
            self.release_claim(step)

    def busy(self) -> set[int]:
        """The steps this process is writing now."""
        with self._lock:
            return set(self._writing)

    def claimed_elsewhere(self, steps: set[int]) -> set[int]:
        """Of ``steps`` (uncommitted), those another process is writing: claimed under the run's live lease."""
        lease = live_lease(self.storage) if steps else None
        if lease is None or (self.lease is not None and lease.epoch == self.lease.epoch):
            return set()  # no live writer, or it is this process (its own saves are in `busy`)
        return {s for s in steps if (claim := read_claim(self.storage, s)) is not None and claim.epoch == lease.epoch}
