"""moai-ckpt: fault-tolerant checkpoint and replay for PyTorch training."""

from __future__ import annotations

__version__ = "0.1.0"

from moai_ckpt.checkpointer import Checkpointer, CheckpointerOptions
from moai_ckpt.distributed import CoordinationError
from moai_ckpt.errors import (
    ChecksumError,
    CorruptSnapshotError,
    ManifestMismatchError,
    MissingDataError,
    MoaiCkptError,
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
from moai_ckpt.rng import register_generator, unregister_generator
from moai_ckpt.run import ReplayDivergenceError, Run, fault_tolerant
from moai_ckpt.sampler import GlobalSampler
from moai_ckpt.storage import RetryPolicy, Storage, open_storage

__all__ = [
    "FORMAT_VERSION",
    "Checkpointer",
    "CheckpointerOptions",
    "ChecksumError",
    "CoordinationError",
    "CorruptSnapshotError",
    "GlobalSampler",
    "ManifestMismatchError",
    "MissingDataError",
    "MoaiCkptError",
    "ReplayDivergenceError",
    "RetryPolicy",
    "Run",
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
