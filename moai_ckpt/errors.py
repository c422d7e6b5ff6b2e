"""One exception hierarchy for everything moai-ckpt raises, `MoaiCkptError` at its root.

Every error of every package (`moai_ckpt`, `replay`, `parallel`, the tools) is defined here, so
this module reads as the whole hierarchy::

    MoaiCkptError
    ├── StorageError (OSError) ── TransientStorageError
    ├── SnapshotNotFoundError (FileNotFoundError), SnapshotExistsError (FileExistsError)
    ├── CorruptDataError (ValueError): stored data fails its checks; never loaded
    │   ├── CorruptSnapshotError ── ChecksumError, TruncatedDataError, MissingDataError,
    │   │                           ManifestMismatchError, LimitExceededError,
    │   │                           UnsafeEntryError, ObjectTooLargeError
    │   ├── CorruptLogError (the op-stream log)
    │   └── CorruptCaptureError (an op capture)
    ├── UnsupportedFormatError, UnsafeKeyError, StateMismatchError, InvalidArgumentError,
    │   NotResumableError, EntrypointError (ValueError); UnserializableStateError (TypeError)
    ├── FencingError (PermissionError) ── RunLockedError, LeaseLostError, StepClaimedError
    ├── CoordinationError (RuntimeError) ── RankLostError
    ├── ReplayDivergenceError, OpCaptureError (RuntimeError)
    ├── PlacementError ── DeviceSpecError, ProfileError (── ModelFunctionError),
    │                     NoFeasiblePlanError (ValueError); PlanMismatchError (RuntimeError)
    ├── InteropError (ValueError), UntrustedDataError (PermissionError)
    └── ChaosError, DemoError (RuntimeError): the tools could not run

Each class also inherits the builtin a caller would naturally catch, so ``except
FileNotFoundError`` keeps working for code that never heard of us. Messages say what failed,
where (URL, step, key) and what to do next. The modules that raise an error also export it
under their own name (``replay.log.CorruptLogError``, ``moai_ckpt.distributed.CoordinationError``),
where callers found it before.
"""

from __future__ import annotations

import re
from typing import Any

# ``scheme://userinfo@``: the userinfo (``user:password``) ends at the last ``@`` before the host's
# ``/``, so a password with a raw ``@`` in it is caught whole
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")


def redact_url(text: str) -> str:
    """``text`` with the userinfo of every URL in it replaced: ``s3://key:secret@host/b`` ->
    ``s3://***@host/b``.

    For messages only (errors, warnings, CLI output): storage is opened with the real URL.
    """
    return _USERINFO.sub(r"\g<scheme>***@", text)


class MoaiCkptError(Exception):
    """Root of every error raised by moai-ckpt.

    Attributes carry the context as data so tools need not parse messages. A password in a URL
    (``scheme://user:password@host``) never reaches the message or ``url``: see `redact_url`.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        step: int | None = None,
        key: str | None = None,
    ) -> None:
        self.detail = message
        self.url = redact_url(url) if url is not None else None
        self.step = step
        self.key = key
        where = ", ".join(
            f"{name}={value}" for name, value in (("url", self.url), ("step", step), ("key", key)) if value is not None
        )
        super().__init__(redact_url(f"{message} [{where}]" if where else message))

    def located(self, *, url: str | None = None, step: int | None = None, key: str | None = None) -> MoaiCkptError:
        """The same error with URL, step and key filled in where it names none (``self`` if nothing changes)."""
        url, key = self.url or url, self.key or key
        step = self.step if self.step is not None else step
        if (url, step, key) == (self.url, self.step, self.key):
            return self
        return type(self)(self.detail, url=url, step=step, key=key)


class StorageError(MoaiCkptError, OSError):
    """A storage operation failed permanently or after its retries ran out."""


class TransientStorageError(StorageError):
    """A storage fault worth retrying (timeouts, throttling, dropped connections)."""


class SnapshotNotFoundError(MoaiCkptError, FileNotFoundError):
    """No committed snapshot matches the request."""


class SnapshotExistsError(MoaiCkptError, FileExistsError):
    """A committed snapshot already exists at this step."""


class CorruptDataError(MoaiCkptError, ValueError):
    """Stored data fails its checks; it is never loaded (a snapshot, a log, an op capture)."""


class CorruptSnapshotError(CorruptDataError):
    """A snapshot (or a metadata object of the run) fails its checks; it is never loaded."""


class ChecksumError(CorruptSnapshotError):
    """A chunk, manifest or commit marker does not match its checksum."""


class TruncatedDataError(CorruptSnapshotError):
    """A stored object is shorter or longer than its metadata says."""


class MissingDataError(CorruptSnapshotError):
    """An array, chunk or index named by a committed snapshot is missing."""


class ManifestMismatchError(CorruptSnapshotError):
    """The manifest disagrees with the stored arrays (shape, dtype, layout)."""


class LimitExceededError(CorruptSnapshotError):
    """Stored metadata asks for more than a configured bound allows; refused before anything is allocated."""


class UnsupportedFormatError(MoaiCkptError, ValueError):
    """The snapshot was written in a format version this moai-ckpt cannot read."""


class UnsafeKeyError(MoaiCkptError, ValueError):
    """A storage key would leave the run directory or uses characters outside the safe set."""


class UnserializableStateError(MoaiCkptError, TypeError):
    """A state value is neither a tensor nor JSON-able; nothing is ever pickled."""


class StateMismatchError(MoaiCkptError, ValueError):
    """The snapshot does not fit the objects being restored (names, shapes, structure)."""


class InvalidArgumentError(MoaiCkptError, ValueError):
    """An argument of a moai-ckpt call has the wrong type or is out of range (checked before any I/O)."""


class UnsafeEntryError(CorruptSnapshotError):
    """A stored entry is refused: a symbolic link, FIFO, device or socket where an object belongs,
    or a path that would resolve outside the run directory. It is never followed or opened."""


class ObjectTooLargeError(CorruptSnapshotError):
    """A metadata object (marker, manifest, index, lease) is larger than the configured limit."""


class FencingError(MoaiCkptError, PermissionError):
    """This process may not write the run now: another writer holds it, or took it over.

    Never a snapshot failure to shrug off: a writer that lost its run must stop writing it.
    """


class RunLockedError(FencingError):
    """Another live writer holds the run's lease (the message names its host, pid and start)."""


class LeaseLostError(FencingError):
    """This writer's lease was taken over or lapsed; it commits nothing more."""


class StepClaimedError(FencingError):
    """Another writer has claimed this step and may still be writing it."""


# -- the op-stream log and its replay ------------------------------------------------------------


class CorruptLogError(CorruptDataError):
    """A log record or blob fails its checks (not a torn tail): replay must stop before it."""


class CorruptCaptureError(CorruptDataError):
    """An op capture is torn, or fails a checksum or a check of its structure."""


class ReplayDivergenceError(MoaiCkptError, RuntimeError):
    """A replayed step produced a different result than its record, on the same placement and
    device type: non-determinism or silent data corruption. ``check`` names the quantity.

    Attributes:
        check: the `replay.check.StepCheck` of the step that diverged, when known (typed loosely:
            this module sits below every layer and imports none of them).
    """

    def __init__(self, message: str, *, check: Any = None, **where: Any) -> None:
        super().__init__(message, **where)
        self.check = check


class OpCaptureError(MoaiCkptError, RuntimeError):
    """An op stream cannot be captured or replayed as asked."""


class StagingRaceError(MoaiCkptError, RuntimeError):
    """A tracked tensor was written in place while `save_async` was still copying it to host
    memory, by something no guard waits for (not an optimizer step): the snapshot is not written."""


# -- coordination between ranks --------------------------------------------------------------------


class CoordinationError(MoaiCkptError, RuntimeError):
    """Ranks could not agree: one died, hung past the timeout, or reported a failure."""


class RankLostError(CoordinationError):
    """A collective failed: a rank died or hung past the timeout. The group is unusable now."""


class WriterProcessError(MoaiCkptError, RuntimeError):
    """The background writer process of `save_async` died, or failed with an error that is not a
    moai-ckpt one (its type and message are in this one's); the save is not committed."""


# -- what the user hands over ---------------------------------------------------------------------


class NotResumableError(MoaiCkptError, ValueError):
    """A tracked object keeps state no snapshot can hold: a resumed run would silently differ."""


class EntrypointError(MoaiCkptError, ValueError):
    """The training function to re-run cannot be found, is refused, or cannot be called."""


# -- placement (`parallel`) ---------------------------------------------------------------------------


class PlacementError(MoaiCkptError):
    """Root of the errors the `parallel` package raises."""


class DeviceSpecError(PlacementError, ValueError):
    """A device declaration (``2xH100,1xA100``) names an unknown type or is malformed."""


class ProfileError(PlacementError, ValueError):
    """A model cannot be profiled: no layer sequence, or layers that do not chain."""


class ModelFunctionError(ProfileError):
    """``--model`` names nothing importable, or the function returns something else."""


class NoFeasiblePlanError(PlacementError, ValueError):
    """No candidate plan fits the devices; the message names the closest one and why it failed."""


class PlanMismatchError(PlacementError, RuntimeError):
    """A plan is applied to a job it does not describe (world size, layers, devices)."""


# -- conversions to and from other formats ---------------------------------------------------------


class InteropError(MoaiCkptError, ValueError):
    """A conversion cannot proceed: a missing entry, a dtype the target format lacks, a clash of names,
    or a destination that already holds files. Nothing is written, or what was written is not final."""


class UntrustedDataError(MoaiCkptError, PermissionError):
    """Reading this input would unpickle it, and the caller has not said it trusts the input."""


# -- the tools ------------------------------------------------------------------------------------------


class ChaosError(MoaiCkptError, RuntimeError):
    """The chaos harness itself could not run a trial (not a finding about the job)."""


class DemoError(MoaiCkptError, RuntimeError):
    """The demo could not run (a torchrun launch failed or timed out)."""
