"""One exception hierarchy for everything moai-ckpt raises.

Each class also inherits the builtin a caller would naturally catch (``OSError`` for storage,
``ValueError`` for bad data, ``TypeError`` for unsupported values, ``FileNotFoundError`` for a
missing snapshot), so ``except FileNotFoundError`` keeps working for code that never heard of us.
Messages say what failed, where (URL, step, key) and what to do next.
"""

from __future__ import annotations


class MoaiCkptError(Exception):
    """Root of every error raised by moai-ckpt.

    Attributes carry the context as data so tools need not parse messages.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        step: int | None = None,
        key: str | None = None,
    ) -> None:
        self.url = url
        self.step = step
        self.key = key
        where = ", ".join(
            f"{name}={value}" for name, value in (("url", url), ("step", step), ("key", key)) if value is not None
        )
        super().__init__(f"{message} [{where}]" if where else message)


class StorageError(MoaiCkptError, OSError):
    """A storage operation failed permanently or after its retries ran out."""


class TransientStorageError(StorageError):
    """A storage fault worth retrying (timeouts, throttling, dropped connections)."""


class SnapshotNotFoundError(MoaiCkptError, FileNotFoundError):
    """No committed snapshot matches the request."""


class SnapshotExistsError(MoaiCkptError, FileExistsError):
    """A committed snapshot already exists at this step."""


class CorruptSnapshotError(MoaiCkptError, ValueError):
    """Stored data fails its checks; it is never loaded."""


class ChecksumError(CorruptSnapshotError):
    """A chunk, manifest or commit marker does not match its checksum."""


class TruncatedDataError(CorruptSnapshotError):
    """A stored object is shorter or longer than its metadata says."""


class MissingDataError(CorruptSnapshotError):
    """An array, chunk or index named by a committed snapshot is missing."""


class ManifestMismatchError(CorruptSnapshotError):
    """The manifest disagrees with the stored arrays (shape, dtype, layout)."""


class UnsupportedFormatError(MoaiCkptError, ValueError):
    """The snapshot was written in a format version this moai-ckpt cannot read."""


class UnsafeKeyError(MoaiCkptError, ValueError):
    """A storage key would leave the run directory or uses characters outside the safe set."""


class UnserializableStateError(MoaiCkptError, TypeError):
    """A state value is neither a tensor nor JSON-able; nothing is ever pickled."""


class StateMismatchError(MoaiCkptError, ValueError):
    """The snapshot does not fit the objects being restored (names, shapes, structure)."""


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
