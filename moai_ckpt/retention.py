"""Retention policies: which committed snapshots a prune keeps.

A policy names the committed snapshots it keeps; policies combine (a snapshot any policy keeps is
kept). Each is a pydantic model with a ``kind``, so a list of them loads from a configuration file
(``keep = [{kind="last", n=3}, {kind="every", steps=1000}]``):

- `KeepLast`: the newest ``n``;
- `KeepEvery`: every snapshot whose step is a multiple of ``steps``;
- `KeepBest`: the ``k`` best by a metric (lowest or highest), from a `MetricSource`;
- `KeepInterval`: the oldest, then each one committed at least ``every`` after the last one kept
  (commit times from the commit markers).

An int ``N`` is "the last N" (`policies_of`). `moai_ckpt.pruner` applies them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from moai_ckpt.errors import InvalidArgumentError
from moai_ckpt.results import SnapshotEntry

__all__ = [
    "KeepBest",
    "KeepEvery",
    "KeepInterval",
    "KeepLast",
    "MetricSource",
    "RetentionPolicy",
    "RetentionView",
    "parse_duration",
    "policies_of",
]

#: step -> metric name -> value, for the steps asked about that have any
MetricSource = Callable[[Sequence[int]], dict[int, dict[str, float]]]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str | float) -> float:
    """Seconds in ``text``: a number of seconds, or units such as ``90s``, ``30m``, ``6h``, ``1d12h``, ``2w``.

    Raises:
        ValueError: anything else, or a duration that is not positive.
    """
    if isinstance(text, bool):
        raise ValueError(f"a duration is a number of seconds or a string such as '6h', got {text!r}")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        spec = text.strip().lower().replace(" ", "")
        try:
            seconds = float(spec)
        except ValueError:
            parts = _DURATION.findall(spec)
            if not parts or "".join(n + u for n, u in parts) != spec:
                raise ValueError(f"a duration is a number of seconds or a string such as '6h', got {text!r}") from None
            seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a duration must be positive, got {text!r}")
    return seconds


class _Policy(BaseModel):
    """What every retention policy answers (frozen; unknown fields are refused)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def keep(self, view: RetentionView) -> set[int]:
        """The steps of ``view.committed`` this policy keeps."""
        raise NotImplementedError

    def describe(self) -> str:
        """The policy in a few words, as prune's reasons show it (``last 3``)."""
        raise NotImplementedError


class KeepLast(_Policy):
    """Keep the newest ``n`` committed snapshots."""

    kind: Literal["last"] = "last"
    n: int = Field(ge=1, description="how many of the newest committed snapshots to keep")

    def keep(self, view: RetentionView) -> set[int]:
        return {e.step for e in view.committed[-self.n :]}

    def describe(self) -> str:
        return f"last {self.n}"


class KeepEvery(_Policy):
    """Keep every committed snapshot whose step is a multiple of ``steps``."""

    kind: Literal["every"] = "every"
    steps: int = Field(ge=1, description="keep the snapshots of the steps that are multiples of this")

    def keep(self, view: RetentionView) -> set[int]:
        return {e.step for e in view.committed if e.step % self.steps == 0}

    def describe(self) -> str:
        return f"every {self.steps} steps"


class KeepBest(_Policy):
    """Keep the ``k`` committed snapshots with the best value of a logged metric.

    The value of a snapshot is the metric its step logged (``loss``, ``grad_norm``, a
    hyperparameter such as ``lr``; see docs/storage.md). Snapshots without a value are not kept
    by this policy; among equal values the newer wins.
    """

    kind: Literal["best"] = "best"
    metric: str = Field(min_length=1, description="the logged metric, by name (loss, grad_norm, lr, ...)")
    mode: Literal["min", "max"] = Field(default="min", description="min: lowest is best; max: highest")
    k: int = Field(default=1, ge=1, description="how many of the best to keep")

    def keep(self, view: RetentionView) -> set[int]:
        values = view.metric(self.metric)
        sign = 1.0 if self.mode == "min" else -1.0
        ranked = sorted(values, key=lambda step: (sign * values[step], -step))
        return set(ranked[: self.k])

    def describe(self) -> str:
        return f"best {self.k} by {self.metric} ({self.mode})"


class KeepInterval(_Policy):
    """Keep the oldest committed snapshot, then each committed at least ``every`` after the last one kept.

    ``every`` is seconds or a string such as ``"6h"``; times are those of the commit markers.
    """

    kind: Literal["interval"] = "interval"
    every: float = Field(description="seconds, or a string such as '30m', '6h', '1d'")

    @field_validator("every", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)

    def keep(self, view: RetentionView) -> set[int]:
        kept: set[int] = set()
        last: float | None = None
        for entry in view.committed:
            at = view.committed_at(entry)
            if at is None:
                continue
            if last is None or at - last >= self.every:
                kept.add(entry.step)
                last = at
        return kept

    def describe(self) -> str:
        return f"one per {_human_duration(self.every)}"


RetentionPolicy = Annotated[KeepLast | KeepEvery | KeepBest | KeepInterval, Field(discriminator="kind")]
_POLICIES: TypeAdapter[list[RetentionPolicy]] = TypeAdapter(list[RetentionPolicy])


def policies_of(keep: Any) -> tuple[RetentionPolicy, ...]:
    """The policies ``keep`` names: an int N (the last N), a policy, a mapping, or a list of those.

    Raises:
        InvalidArgumentError: anything else, naming what is wrong and where.
    """
    if keep is None:
        return ()
    if isinstance(keep, bool):
        raise InvalidArgumentError(f"keep must be an int, a retention policy or a list of them, got {keep!r}")
    items = list(keep) if isinstance(keep, list | tuple) else [keep]
    if not items:
        raise InvalidArgumentError("keep: an empty list of retention policies keeps nothing; give at least one")
    raw = [
        {"kind": "last", "n": item} if isinstance(item, int) and not isinstance(item, bool) else item for item in items
    ]
    raw = [item.model_dump() if isinstance(item, _Policy) else item for item in raw]
    try:
        return tuple(_POLICIES.validate_python(raw))
    except ValidationError as exc:
        raise InvalidArgumentError(f"keep: {_first_problem(exc)}") from None


def _first_problem(exc: ValidationError) -> str:
    """One line for a policy that does not validate: which one, which field, what is wrong."""
    first = exc.errors()[0]
    loc = first["loc"]
    where = f"policy {loc[0]}" if loc else "policy"
    if len(loc) > 1:
        where += f" (kind {loc[1]!r})"
    if len(loc) > 2:
        where += f", {'.'.join(map(str, loc[2:]))}"
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return f"{where}: kind must be one of last, every, best, interval"
    return f"{where}: {first['msg'].removeprefix('Value error, ')}"


def _human_duration(seconds: float) -> str:
    for unit, size in (("w", 604800.0), ("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@dataclass
class RetentionView:
    """What the policies see: the committed snapshots, oldest first, and their metrics (read once, if asked)."""

    committed: Sequence[SnapshotEntry]
    source: MetricSource | None
    _metrics: dict[int, dict[str, float]] | None = None

    def metric(self, name: str) -> dict[int, float]:
        """Step -> value of ``name`` for the committed snapshots that have one (NaN is no value).

        Raises:
            InvalidArgumentError: no committed snapshot has a value of ``name`` (a prune then deletes nothing).
        """
        if not self.committed:
            return {}
        if self._metrics is None:
            self._metrics = self.source([e.step for e in self.committed]) if self.source is not None else {}
        values = {s: m[name] for s, m in self._metrics.items() if name in m and math.isfinite(m[name])}
        if not values:
            known = sorted({n for m in self._metrics.values() for n in m})
            logged = f"logged: {', '.join(known)}" if known else "no snapshot's step logged any metric yet"
            raise InvalidArgumentError(
                f"keep best by {name!r}: no committed snapshot's step logged that metric ({logged}); nothing deleted"
            )
        return values

    @staticmethod
    def committed_at(entry: SnapshotEntry) -> float | None:
        """The commit time of ``entry`` as a POSIX timestamp (None if its marker has none that parses)."""
        if entry.marker is None:
            return None
        try:
            return datetime.fromisoformat(entry.marker.body.created).timestamp()
        except ValueError:
            return None
