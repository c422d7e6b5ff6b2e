"""moai-ckpt: fault-tolerant checkpoint and replay for PyTorch training."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moai_ckpt._version import __version__
from moai_ckpt.capture import PartialState
from moai_ckpt.checkpointer import Checkpointer, CheckpointerOptions
from moai_ckpt.errors import (
    ChecksumError,
    CoordinationError,
    CorruptSnapshotError,
    InvalidArgumentError,
    LimitExceededError,
    ManifestMismatchError,
    MissingDataError,
    MoaiCkptError,
    NotResumableError,
    ReplayDivergenceError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    StateMismatchError,
    StorageError,
    TransientStorageError,
    TruncatedDataError,
    UnsafeKeyError,
    UnserializableStateError,
    UnsupportedFormatError,
)
from moai_ckpt.format import FORMAT_VERSION
from moai_ckpt.results import SaveHandle, SnapshotEntry, VerifyReport
from moai_ckpt.retention import KeepBest, KeepEvery, KeepInterval, KeepLast
from moai_ckpt.rng import register_generator, unregister_generator
from moai_ckpt.sampler import GlobalSampler
from moai_ckpt.storage import RetryPolicy, Storage, open_storage

if TYPE_CHECKING:
    from moai_ckpt.run import Run, RunOptions, fault_tolerant

_LAZY = {"Run": "moai_ckpt.run", "RunOptions": "moai_ckpt.run", "fault_tolerant": "moai_ckpt.run"}


def __getattr__(name: str) -> Any:
    # the run layer sits on top of the replay package, which itself uses this package's format and
    # storage layers: importing it lazily keeps `import replay.log` free of import cycles
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moai_ckpt' has no attribute {name!r}")


__all__ = [
    "FORMAT_VERSION",
    "Checkpointer",
    "CheckpointerOptions",
    "ChecksumError",
    "CoordinationError",
    "CorruptSnapshotError",
    "GlobalSampler",
    "InvalidArgumentError",
    "KeepBest",
    "KeepEvery",
    "KeepInterval",
    "KeepLast",
    "LimitExceededError",
    "ManifestMismatchError",
    "MissingDataError",
    "MoaiCkptError",
    "NotResumableError",
    "PartialState",
    "ReplayDivergenceError",
    "RetryPolicy",
    "Run",
    "RunOptions",
    "SaveHandle",
    "SnapshotEntry",
    "SnapshotExistsError",
    "SnapshotNotFoundError",
    "StateMismatchError",
    "Storage",
    "StorageError",
    "TransientStorageError",
    "TruncatedDataError",
    "UnsafeKeyError",
    "UnserializableStateError",
    "UnsupportedFormatError",
    "VerifyReport",
    "__version__",
    "fault_tolerant",
    "open_storage",
    "register_generator",
    "unregister_generator",
]
