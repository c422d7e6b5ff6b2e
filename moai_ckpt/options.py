"""What a `Checkpointer` is told: its validated options, and the checks on a save's arguments.

Everything here is checked before any I/O, with messages that name the option or argument.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moai_ckpt.errors import InvalidArgumentError, UnserializableStateError
from moai_ckpt.layout import STEP_DIGITS
from moai_ckpt.retention import RetentionPolicy, policies_of
from moai_ckpt.snapshot import DEFAULT_MAX_ARRAY_BYTES
from moai_ckpt.storage import RetryPolicy
from moai_ckpt.tree import MAX_DEPTH, json_depth


class CheckpointerOptions(BaseModel):
    """Validated options of a `Checkpointer`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chunk_bytes: int = Field(default=64 << 20, ge=1, description="largest chunk of a stored array")
    io_threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="parallel storage operations (None: the cores this process may use, 2 to 8)",
    )
    capture_rng: bool = Field(default=True, description="save and restore every global RNG with the state")
    leftover_grace_s: float = Field(
        default=600.0,
        ge=0,
        description="prune leaves uncommitted snapshots newer than the latest commit alone this long",
    )
    collective_timeout_s: float = Field(
        default=300.0, gt=0, description="bound on every collective of a distributed save or restore"
    )
    max_array_bytes: int = Field(
        default=DEFAULT_MAX_ARRAY_BYTES,
        ge=1,
        description="largest array a restore or verify allocates; larger records are refused before any allocation",
    )
    lease_ttl_s: float = Field(
        default=30.0,
        ge=0.5,
        le=3600,
        description="the writer's lease on the run lasts this long unless renewed (every third of it); "
        "another job may take the run over once it lapses",
    )
    max_record_bytes: int = Field(
        default=64 << 20,
        ge=4096,
        description="largest metadata object read (commit marker, manifest, rank index, zarr.json, run.json); "
        "a larger one is refused unread",
    )
    persist: Literal["process", "thread"] = Field(
        default="thread",
        description="where `save_async` writes in the background: a writer process fed through shared memory "
        "(started at the first save_async; until it is up, and where it cannot be used, a thread), or a thread "
        "of the training process",
    )
    shm_limit_bytes: int | None = Field(
        default=None,
        ge=0,
        description="most bytes of shared memory the writer process's host buffers may take (default: what "
        "/dev/shm has free); a state that does not fit persists in a thread",
    )
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    keep: tuple[RetentionPolicy, ...] | None = Field(
        default=None,
        description="retention policies applied after each commit (an int N: the last N; None: keep all)",
    )

    @field_validator("keep", mode="before")
    @classmethod
    def _policies(cls, keep: Any) -> Any:
        return policies_of(keep) if keep is not None else None

    @classmethod
    def merged(
        cls, base: CheckpointerOptions | None, named: Mapping[str, Any], keywords: Mapping[str, Any]
    ) -> tuple[CheckpointerOptions, dict[str, Any]]:
        """``base`` with the options a `Checkpointer` was given by name (None: not given) and those
        among its other keyword arguments that are option fields; returns it and the remaining
        keyword arguments, which go to the storage back end."""
        overrides = {k: v for k, v in named.items() if v is not None}
        overrides |= {k: v for k, v in keywords.items() if k in cls.model_fields}
        rest = {k: v for k, v in keywords.items() if k not in cls.model_fields}
        base = base or cls()
        return (cls.model_validate({**dict(base), **overrides}) if overrides else base), rest


def valid_step(step: object) -> int:
    """``step`` as a plain int in [0, 1e12), or `InvalidArgumentError` (checked before any I/O).

    Integer types other than ``int`` (numpy integers, 0-d integer tensors) are accepted; bools are not.
    """
    if isinstance(step, bool):
        raise InvalidArgumentError(f"step must be an integer, got the bool {step}")
    try:
        value = operator.index(step)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgumentError(f"step must be an integer, got {type(step).__name__} {step!r:.40}") from None
    if not 0 <= value < 10**STEP_DIGITS:
        raise InvalidArgumentError(f"step must be in [0, 1e{STEP_DIGITS}), got {value}")
    return value


def valid_info(info: Mapping[str, Any] | None) -> dict[str, Any]:
    """``info`` as a plain dict once it is strict JSON with string keys a manifest can hold."""
    if info is None:
        return {}
    if not isinstance(info, Mapping):
        raise UnserializableStateError(f"info must be a dict, got {type(info).__name__}", key="info")
    bad = [k for k in info if not isinstance(k, str)]
    if bad:
        raise UnserializableStateError(f"info keys must be strings, got {bad[0]!r}", key="info")
    try:
        json.dumps(info, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise UnserializableStateError(f"info is not strict JSON: {exc}", key="info") from None
    if json_depth(info) > MAX_DEPTH:
        raise UnserializableStateError(f"info is nested more than {MAX_DEPTH} levels deep", key="info")
    return dict(info)
