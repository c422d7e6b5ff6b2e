"""One writer per run, fenced: a lease with an owner and an epoch, and a claim per step.

The protocol, in the order a writer meets it (docs/security.md, "Writers and fencing"):

1. **Acquire.** The run's lease is one object per epoch, ``lease/<epoch>.json``; the highest
   epoch holds the run. A writer reads it and may take the run over when there is none, or it
   was released, expired, is unreadable, belongs to this process, its process is gone (same
   host: the pid is dead, a zombie, or reused), or it is an earlier incarnation of the same
   torchelastic job (a restart: the old workers are dead). A holder on another host that may be
   alive is watched for one TTL: a renewal seen means it lives (`RunLockedError`, naming it);
   silence means it does not. The takeover is an exclusive create of the next epoch, so of two
   contenders exactly one wins.
2. **Hold.** A daemon thread renews the lease every third of its TTL after checking that no
   newer epoch exists. The holder trusts its lease only until its own monotonic deadline (last
   renewal + TTL - a clock margin): a process that was stopped or cut off stops writing by itself.
3. **Claim.** Before writing anything of a step, the writer creates ``snapshots/<step>/claim.json``
   exclusively. A claim left by an older epoch is stale once its writer is known dead, or one TTL
   after a takeover from a holder that may still have been alive (``fenced_until``); until then
   the step is not reused (`StepClaimedError`).
4. **Commit.** Right before the commit marker is created (itself exclusively), the writer checks
   that its lease is unexpired and that no newer epoch exists; a writer that lost it fails with
   `LeaseLostError` and never commits.
5. **Release.** Closing the last Checkpointer of the run in this process (or exiting) marks the
   lease released, so the next job takes over at once.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from datetime import UTC, datetime

from pydantic import ValidationError

from moai_ckpt.errors import (
    CorruptSnapshotError,
    LeaseLostError,
    MoaiCkptError,
    RunLockedError,
    StepClaimedError,
)
from moai_ckpt.format import ClaimRecord, LeaseRecord
from moai_ckpt.keys import warn_once
from moai_ckpt.layout import LEASE, claim_key, lease_key, parse_lease_key
from moai_ckpt.liveness import process_gone, same_pid_space, this_writer
from moai_ckpt.storage import Storage

log = logging.getLogger("moai_ckpt.lease")

#: the most two hosts' clocks are assumed to differ (NTP keeps them far closer); a lease is
#: trusted by its holder this much less, and by others this much more, than its TTL
CLOCK_SKEW_S = 2.0
#: lease and claim records are a few hundred bytes; anything bigger is not one of ours
RECORD_LIMIT = 64 << 10
#: lease objects of epochs this far below the holder's are deleted (a few stay, for post-mortems)
KEEP_EPOCHS = 4


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds")


# -- the lease -----------------------------------------------------------------------------------


class RunLease:
    """This process's hold on one run directory: acquire, renew, check, claim steps, release.

    One per process and run (`attach`); every Checkpointer of the process on that run shares it.

    Args:
        storage: the run directory.
        ttl_s: how long a lease lasts unless renewed (renewed every third of it).
    """

    def __init__(self, storage: Storage, ttl_s: float) -> None:
        self.storage = storage
        self.ttl_s = ttl_s
        self.margin_s = min(CLOCK_SKEW_S, ttl_s / 10)
        self.me = this_writer()
        self.epoch: int | None = None
        #: why the previous holder was displaced ("" when the run had no lease)
        self.takeover = ""
        #: until this Unix time, claims of older epochs may belong to a writer still finishing
        self.fenced_until = 0.0
        self._valid_until = 0.0  # monotonic: after this the holder no longer trusts its lease
        self._lost: str | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._claimed: set[int] = set()  # steps this process claimed and has not let go of
        self.users = 0

    @property
    def url(self) -> str:
        return self.storage.url

    @property
    def held(self) -> bool:
        return self.epoch is not None and self._lost is None

    # -- acquiring -----------------------------------------------------------------------------

    def acquire(self) -> None:
        """Hold the run (no-op while held).

        Raises:
            RunLockedError: another live writer holds it (the message names it).
        """
        with self._lock:
            if self.held:
                return
            self.me = this_writer()
            for _ in range(_ACQUIRE_ROUNDS):
                if self._try_acquire():
                    return
            raise RunLockedError(
                f"could not take the run's lease: other writers kept taking it ({_ACQUIRE_ROUNDS} rounds)",
                url=self.url,
            )

    def _try_acquire(self) -> bool:
        top, record = self._newest()
        reason, unsure = ("", False) if top is None else self._verdict(top, record)
        if top is not None and reason is None:
            assert record is not None
            observed = self._watch(top, record)
            if observed is None:
                return False  # the run changed hands while we watched: look again
            reason, unsure = observed, True
        epoch = (top or 0) + 1
        now, started = time.time(), time.monotonic()
        inherited = record.fenced_until if record is not None else 0.0
        # a holder that may still live stops by itself within its own TTL of its last renewal;
        # its claims stay off limits for one more TTL (the longer of the two) after the takeover
        grace = max(self.ttl_s, record.ttl_s if record is not None else 0.0) + self.margin_s
        fenced_until = max(inherited, now + grace if unsure else 0.0)
        body = self._record(epoch, now, fenced_until)
        try:
            self.storage.create(lease_key(epoch), body.model_dump_json(indent=1).encode())
        except FileExistsError:
            return False  # another contender took this epoch first
        if self._highest() != epoch:
            return False  # a contender working from an older listing made a newer epoch
        self.epoch, self.takeover, self.fenced_until = epoch, reason or "", fenced_until
        self._lost = None
        self._valid_until = started + self.ttl_s - self.margin_s
        if reason:
            log.warning("took over the writer lease of %s (epoch %d): %s", self.url, epoch, reason)
        self._forget_old(epoch)
        self._start_heartbeat()
        return True

    def _record(self, epoch: int, now: float, fenced_until: float, released: bool = False) -> LeaseRecord:
        return LeaseRecord(
            epoch=epoch,
            writer=self.me,
            renewed_at=now,
            expires_at=now if released else now + self.ttl_s,
            ttl_s=self.ttl_s,
            fenced_until=fenced_until,
            released=released,
        )

    def _epochs(self) -> list[int]:
        found = []
        for key in self.storage.list(LEASE):
            epoch = parse_lease_key(key)
            if epoch is None:
                warn_once(self.url, key, "not a lease object")
            else:
                found.append(epoch)
        return sorted(found)

    def _highest(self) -> int | None:
        epochs = self._epochs()
        return epochs[-1] if epochs else None

    def _newest(self) -> tuple[int | None, LeaseRecord | None]:
        """The highest epoch and its record (None when it does not parse: a torn write)."""
        top = self._highest()
        return (None, None) if top is None else (top, self._load(top))

    def _load(self, epoch: int) -> LeaseRecord | None:
        record = _load_record(self.storage, lease_key(epoch), LeaseRecord)
        return record if isinstance(record, LeaseRecord) and record.epoch == epoch else None

    def _verdict(self, epoch: int, record: LeaseRecord | None) -> tuple[str | None, bool]:
        """Why the lease of ``epoch`` may be taken over (and whether its holder might still live),
        or (None, False) while its holder may be alive."""
        if record is None:
            return f"lease epoch {epoch} is unreadable (a torn write, or not ours)", True
        writer = record.writer
        if record.released:
            return f"{writer.describe()} released it", False
        if writer.owner == self.me.owner:
            return "it was this process's own", False
        if process_gone(writer, self.me):
            return f"its process ({writer.describe()}) is gone", False
        if writer.job is not None and writer.job == self.me.job and (self.me.restart or 0) >= (writer.restart or 0):
            return (
                f"it belongs to an earlier incarnation of torchelastic job {writer.job!r} ({writer.describe()})",
                False,
            )
        if time.time() > record.expires_at + CLOCK_SKEW_S:
            return f"it expired at {_iso(record.expires_at)} ({writer.describe()})", True
        return None, False

    def _watch(self, epoch: int, first: LeaseRecord) -> str | None:
        """Watch a holder that may be alive: raise `RunLockedError` once it renews (or if it is
        certainly alive), return why it may be taken over once it stays silent for a whole TTL,
        or None if the run changed hands meanwhile."""
        if same_pid_space(first.writer, self.me):  # its process is alive: no need to wait
            raise self._locked(first, "its process is alive on this host")
        log.warning(
            "the run %s is held by %s; watching its lease for up to %.0f s",
            self.url,
            first.writer.describe(),
            first.ttl_s,
        )
        deadline = time.monotonic() + first.ttl_s + self.margin_s
        while time.monotonic() < deadline:
            time.sleep(min(1.0, max(first.ttl_s / 10, 0.05)))
            top, record = self._newest()
            if top != epoch:
                return None
            if record is None:
                return f"lease epoch {epoch} became unreadable"
            if record.renewed_at != first.renewed_at:
                raise self._locked(record, "it is being renewed")
            reason, _ = self._verdict(epoch, record)
            if reason is not None:
                return reason
        return f"{first.writer.describe()} did not renew its lease for {first.ttl_s:g} s"

    def _locked(self, record: LeaseRecord, alive: str) -> RunLockedError:
        left = record.expires_at - time.time()
        return RunLockedError(
            f"the run is held by another writer: {record.writer.describe()} (lease epoch {record.epoch}); its lease "
            f"expires at {_iso(record.expires_at)} (in {max(left, 0):.0f} s) unless renewed, and {alive}. "
            "Stop that job, or write to another run directory",
            url=self.url,
        )

    def _forget_old(self, epoch: int) -> None:
        with contextlib.suppress(MoaiCkptError, OSError):
            old = [lease_key(e) for e in self._epochs() if e < epoch - KEEP_EPOCHS]
            if old:
                self.storage.delete(old)

    # -- holding -------------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="moai-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseLostError as exc:
                log.error("%s", exc)
                return
            except Exception as exc:  # noqa: BLE001 - one failed renewal must not kill the heartbeat
                log.warning("renewing the writer lease of %s failed (will retry): %s", self.url, exc)

    def renew(self) -> None:
        """Extend the lease by one TTL, unless a newer epoch took the run (`LeaseLostError`).

        Storage is called without the lock held: a slow renewal never stalls `check`.
        """
        with self._lock:
            epoch = self.epoch
            if epoch is None:
                return
            self._check_local()
        started = time.monotonic()
        self._check_successor(epoch)
        record = self._record(epoch, time.time(), self.fenced_until)
        self.storage.write(lease_key(epoch), record.model_dump_json(indent=1).encode())
        with self._lock:
            if self.epoch == epoch and self._lost is None:
                self._valid_until = started + self.ttl_s - self.margin_s

    def _check_successor(self, epoch: int) -> None:
        if self.storage.exists(lease_key(epoch + 1)):
            newer = self._load(epoch + 1)
            who = newer.writer.describe() if newer is not None else "another writer"
            self._lose(f"{who} took the run over (lease epoch {epoch + 1})")

    def _lose(self, why: str) -> None:
        with self._lock:
            if self._lost is None:
                self._lost = f"this writer lost the run's lease (epoch {self.epoch}): {why}; it commits nothing more"
            self._stop.set()
            raise LeaseLostError(self._lost, url=self.url)

    def _check_local(self) -> int:
        if self._lost is not None:
            raise LeaseLostError(self._lost, url=self.url)
        if self.epoch is None:
            raise LeaseLostError("this writer holds no lease on the run", url=self.url)
        late = time.monotonic() - self._valid_until
        if late > 0:
            self._lose(
                f"it was not renewed in time ({late:.1f} s late: the process was stopped, or storage was "
                "unreachable); another job may have taken the run over"
            )
        return self.epoch

    def deadline(self) -> float:
        """The `time.monotonic` instant after which this holder stops trusting its lease, or
        -inf once it is lost or not held (for a writer process fenced by this lease)."""
        with self._lock:
            return self._valid_until if self.epoch is not None and self._lost is None else float("-inf")

    def check(self, *, remote: bool = False) -> None:
        """Raise `LeaseLostError` unless the lease is held and unexpired.

        Args:
            remote: also ask storage that no newer epoch exists (one request), as a commit must.
        """
        with self._lock:
            epoch = self._check_local()
        if remote:
            self._check_successor(epoch)

    # -- claims --------------------------------------------------------------------------------

    def claim(self, step: int) -> None:
        """Claim ``step`` before writing anything of it (exclusive create of its claim object).

        Raises:
            StepClaimedError: another writer may still be writing this step.
            LeaseLostError: this writer lost the run.
        """
        self.check(remote=True)
        assert self.epoch is not None
        key = claim_key(step)
        body = ClaimRecord(step=step, epoch=self.epoch, writer=self.me, created_at=time.time())
        data = body.model_dump_json(indent=1).encode()
        try:
            self.storage.create(key, data)
            self._claimed.add(step)
            return
        except FileExistsError:
            pass
        claim = _load_record(self.storage, key, ClaimRecord)
        why = self._stale(step, claim if isinstance(claim, ClaimRecord) else None)
        log.info("replacing the stale claim on step %d of %s: %s", step, self.url, why)
        self.storage.delete([key])
        try:
            self.storage.create(key, data)
        except FileExistsError:
            raise StepClaimedError(
                "another writer claimed this step at the same moment", url=self.url, step=step, key=key
            ) from None
        self._claimed.add(step)

    def _stale(self, step: int, claim: ClaimRecord | None) -> str:
        """Why an existing claim on ``step`` may be replaced; raises while it may be live."""
        assert self.epoch is not None
        key = claim_key(step)
        if claim is not None and claim.epoch > self.epoch:
            self._lose(f"step {step} is claimed under a newer lease epoch ({claim.writer.describe()})")
        if claim is not None and claim.writer.owner == self.me.owner:
            return "a leftover of this process's own failed save"
        if claim is not None and claim.epoch == self.epoch:
            raise StepClaimedError(
                f"claimed under this writer's own lease epoch by {claim.writer.describe()}",
                url=self.url,
                step=step,
                key=key,
            )
        left = self.fenced_until - time.time()
        who = claim.writer.describe() if claim is not None else "an unreadable claim"
        if left > 0:
            raise StepClaimedError(
                f"claimed by {who} under an older lease that this writer took over from a holder that may still "
                f"be finishing a write; the step can be reused in {left:.0f} s",
                url=self.url,
                step=step,
                key=key,
            )
        return f"left by {who}, whose lease was taken over"

    def forget_claim(self, step: int) -> None:
        """Remove this writer's claim on ``step`` (after its commit, or its failure), if it made one.

        Best effort: a claim left behind is this process's own and stale to it.
        """
        if step not in self._claimed:
            return
        self._claimed.discard(step)
        try:
            self.storage.delete([claim_key(step)])
        except (MoaiCkptError, OSError) as exc:
            log.warning("could not remove the claim on step %d of %s: %s", step, self.url, exc)

    # -- releasing -----------------------------------------------------------------------------

    def release(self) -> None:
        """Stop renewing and mark the lease released, so the next writer takes over at once."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)  # a renewal in flight must not land after the release
        with self._lock:
            epoch, self.epoch = self.epoch, None
            if epoch is None or self._lost is not None or self.me.pid != os.getpid():
                return
            try:
                # not if a newer writer took over, nor if the run (or its lease) was deleted meanwhile
                if self.storage.exists(lease_key(epoch)) and not self.storage.exists(lease_key(epoch + 1)):
                    record = self._record(epoch, time.time(), self.fenced_until, released=True)
                    self.storage.write(lease_key(epoch), record.model_dump_json(indent=1).encode())
            except (MoaiCkptError, OSError) as exc:
                log.warning("could not release the writer lease of %s: %s", self.url, exc)


_ACQUIRE_ROUNDS = 8


def _load_record(storage: Storage, key: str, model: type[LeaseRecord | ClaimRecord]) -> object:
    """A lease or claim record, or None when it is missing or not one (torn, tampered)."""
    try:
        data = storage.read_record(key, RECORD_LIMIT)
    except FileNotFoundError:
        return None
    except CorruptSnapshotError as exc:  # a link, a FIFO, far too large
        warn_once(storage.url, key, str(exc))
        return None
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        warn_once(storage.url, key, f"{model.__name__} does not parse: {str(exc)[:200]}")
        return None


def live_lease(storage: Storage) -> LeaseRecord | None:
    """The run's newest lease record while it is held (neither released nor expired), else None."""
    epochs = sorted(e for e in map(parse_lease_key, storage.list(LEASE)) if e is not None)
    record = _load_record(storage, lease_key(epochs[-1]), LeaseRecord) if epochs else None
    if not isinstance(record, LeaseRecord) or record.released or time.time() > record.expires_at + CLOCK_SKEW_S:
        return None
    return record


def read_claim(storage: Storage, step: int) -> ClaimRecord | None:
    """The claim on ``step``, or None when there is none (or it does not parse)."""
    record = _load_record(storage, claim_key(step), ClaimRecord)
    return record if isinstance(record, ClaimRecord) else None


# -- one lease per process and run --------------------------------------------------------------

_leases: dict[tuple[int, str], RunLease] = {}
_leases_lock = threading.Lock()


def attach(storage: Storage, ttl_s: float) -> RunLease:
    """The lease of this process on ``storage``'s run (shared by its Checkpointers); count a user."""
    key = (os.getpid(), storage.url)
    with _leases_lock:
        lease = _leases.get(key)
        if lease is None:
            lease = _leases[key] = RunLease(storage, ttl_s)
        lease.users += 1
        return lease


def detach(lease: RunLease) -> None:
    """One user less; the last one releases the lease."""
    with _leases_lock:
        lease.users -= 1
        if lease.users > 0:
            return
        _leases.pop((os.getpid(), lease.url), None)
    lease.release()


@atexit.register
def _release_all() -> None:
    """A process that exits without closing its Checkpointers still hands its runs back."""
    with _leases_lock:
        held = [lease for (pid, _), lease in _leases.items() if pid == os.getpid()]
        _leases.clear()
    for lease in held:
        try:
            lease.release()
        except Exception as exc:  # noqa: BLE001 - at exit, one run's failure must not stop the others'
            log.warning("could not release the writer lease of %s at exit: %s", lease.url, exc)


__all__ = [
    "CLOCK_SKEW_S",
    "RunLease",
    "attach",
    "detach",
    "live_lease",
    "read_claim",
]
