"""A fault-injecting fsspec file system: storage that fails on purpose, reproducibly.

`FaultyFileSystem` wraps any fsspec file system (local, ``memory``, ``s3``...) and passes every
call through one hook that may sleep, raise a transient error (`ConnectionError` or
`TimeoutError`, which `moai_ckpt.storage.is_transient` retries), raise a permanent
`PermissionError`, or tear a write (report success but store only a prefix of the bytes). What
happens is fixed by a validated, frozen `FaultPlan`; every call and every injected fault is
counted, so a test or a chaos report can account for each one.

It is registered under the protocol ``faulty``::

    plan = FaultPlan(transient_rate=0.05, seed=7)
    ckpt = Checkpointer("faulty:///data/run", target_protocol="file", plan=plan)
    ckpt.storage.fs.stats.faults  # {"transient_rate": 12}

or chained: ``Checkpointer("faulty::memory://bucket/run", plan=plan)``. A process that builds its
Checkpointer itself (a training job under test) takes its plan from ``MOAI_CKPT_STORAGE_FAULTS``
(JSON) and, with ``MOAI_CKPT_STORAGE_FAULT_LOG`` set, appends every injected fault to that file.

Calls are numbered from 1 in the order they reach the hook, counting only the calls the plan
applies to (its ``ops`` and ``paths``); ``fail_nth``, ``permanent_nth``, ``torn_nth`` and the
outage window all refer to these numbers. With several threads the numbers are handed out in
arrival order, so which object gets call 7 can vary; the counts cannot.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import fsspec
from fsspec.implementations.chained import ChainedFileSystem
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

PLAN_ENV = "MOAI_CKPT_STORAGE_FAULTS"  # a FaultPlan as JSON, used when no plan= is given
EVENT_LOG_ENV = "MOAI_CKPT_STORAGE_FAULT_LOG"  # a file that gets one JSON line per injected fault

Op = Literal["read", "write", "list", "delete", "info"]
FaultKind = Literal["fail_nth", "transient_rate", "outage", "permanent", "torn"]
ALL_OPS: frozenset[Op] = frozenset(get_args(Op))
TRANSIENT_KINDS: frozenset[str] = frozenset({"fail_nth", "transient_rate", "outage"})

__all__ = [
    "ALL_OPS",
    "FaultEvent",
    "FaultPlan",
    "FaultStats",
    "FaultyFileSystem",
    "InjectedConnectionError",
    "InjectedFault",
    "InjectedPermissionError",
    "InjectedTimeoutError",
    "Outage",
]


class Outage(BaseModel):
    """A window in which every call fails transiently.

    It opens at call number ``start`` and lasts either ``calls`` calls or ``seconds`` seconds
    from the moment call ``start`` arrived (exactly one of the two).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    start: PositiveInt = Field(default=1, description="call number at which the outage begins")
    calls: PositiveInt | None = Field(default=None, description="length of the outage in calls")
    seconds: float | None = Field(default=None, gt=0, description="length of the outage in seconds")

    @model_validator(mode="after")
    def _one_length(self) -> Outage:
        if (self.calls is None) == (self.seconds is None):
            raise ValueError("outage needs exactly one of 'calls' or 'seconds'")
        return self


class FaultPlan(BaseModel):
    """What a `FaultyFileSystem` does to the calls it sees; checked when built.

    The default plan injects nothing (a pass-through wrapper that still counts calls).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    fail_nth: Sequence[PositiveInt] = Field(default=(), description="call numbers that raise a transient error")
    transient_rate: float = Field(
        default=0.0, ge=0, le=1, description="probability that a call raises a transient error"
    )
    permanent_nth: Sequence[PositiveInt] = Field(default=(), description="call numbers that raise PermissionError")
    latency_s: float = Field(default=0.0, ge=0, le=60, description="sleep before every call")
    outage: Outage | None = Field(default=None, description="a window in which every call fails transiently")
    torn_write_rate: float = Field(
        default=0.0, ge=0, le=1, description="probability that a write stores only a prefix and reports success"
    )
    torn_nth: Sequence[PositiveInt] = Field(default=(), description="call numbers of writes to tear")
    torn_fraction: float = Field(default=0.5, ge=0, lt=1, description="share of the bytes a torn write keeps")
    ops: AbstractSet[Op] = Field(default=ALL_OPS, description="operations the plan applies to")
    paths: Sequence[str] = Field(
        default=(), description="fnmatch patterns of paths the plan applies to (all when empty)"
    )
    transient_error: Literal["connection", "timeout"] = Field(
        default="connection", description="raise ConnectionError or TimeoutError for transient faults"
    )
    seed: int = Field(default=0, description="seed of the random draws (transient_rate, torn_write_rate)")

    @field_validator("fail_nth", "permanent_nth", "torn_nth", "paths", mode="after")
    @classmethod
    def _frozen_sequence(cls, v: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(v)

    @field_validator("ops", mode="after")
    @classmethod
    def _frozen_set(cls, v: AbstractSet[Op]) -> frozenset[Op]:
        return frozenset(v)

    @model_validator(mode="after")
    def _consistent(self) -> FaultPlan:
        both = sorted(set(self.fail_nth) & set(self.permanent_nth))
        if both:
            raise ValueError(f"fail_nth and permanent_nth both name call(s) {both}")
        if (self.torn_nth or self.torn_write_rate) and "write" not in self.ops:
            raise ValueError("torn_nth / torn_write_rate need 'write' in ops")
        if not self.ops:
            raise ValueError("ops must name at least one operation")
        return self

    @property
    def injects_faults(self) -> bool:
        """Whether this plan can inject any fault (latency alone is not a fault)."""
        return bool(
            self.fail_nth
            or self.transient_rate
            or self.permanent_nth
            or self.outage
            or self.torn_write_rate
            or self.torn_nth
        )


class InjectedFault(Exception):
    """Marker base of every error a `FaultyFileSystem` raises on purpose."""

    kind: FaultKind = "fail_nth"


class InjectedConnectionError(InjectedFault, ConnectionError):
    """A transient fault that looks like a dropped connection."""


class InjectedTimeoutError(InjectedFault, TimeoutError):
    """A transient fault that looks like a timeout."""


class InjectedPermissionError(InjectedFault, PermissionError):
    """A permanent fault: access denied."""

    kind: FaultKind = "permanent"


@dataclass(frozen=True)
class FaultEvent:
    """One injected fault: which call, operation and path, and what was done."""

    call: int
    op: str
    path: str
    kind: FaultKind


@dataclass(frozen=True)
class FaultStats:
    """Counters of a `FaultyFileSystem` at one moment.

    Attributes:
        calls: every call per operation, whether the plan applies to it or not.
        numbered: calls the plan applies to (the numbers ``fail_nth`` and friends refer to).
        faults: injected faults per kind.
        events: every injected fault, in order.
    """

    calls: dict[str, int] = field(default_factory=dict)
    numbered: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    events: tuple[FaultEvent, ...] = ()

    @property
    def total_faults(self) -> int:
        """All injected faults of any kind."""
        return sum(self.faults.values())

    @property
    def transient_faults(self) -> int:
        """Injected faults that raised a transient error (and so should have been retried)."""
        return sum(n for kind, n in self.faults.items() if kind in TRANSIENT_KINDS)

    def paths(self, kind: FaultKind) -> list[str]:
        """Paths that received a fault of ``kind``, in order."""
        return [e.path for e in self.events if e.kind == kind]


class FaultyFileSystem(ChainedFileSystem):
    """An fsspec file system that forwards to a target file system and injects faults.

    Args:
        target_protocol: protocol of the wrapped file system (``"file"``, ``"memory"``, ``"s3"``).
        target_options: options of the wrapped file system. A local target gets
            ``auto_mkdir=True`` unless told otherwise (object stores need no directories).
        plan: a `FaultPlan` (or a mapping validated into one); the default injects nothing.
        fs: an already built target file system, instead of ``target_protocol``.
        fo: the path of a chained URL (``faulty::memory://b/run``); not used.
        **kwargs: passed to `fsspec.AbstractFileSystem`.

    Raises:
        ValueError: neither ``target_protocol`` nor ``fs`` is given.
    """

    protocol = "faulty"
    root_marker = ""
    #: pipe_file passes ``mode="create"`` through to the target: an exclusive create stays one
    forwards_create_mode = True
    # each instance carries its own counters and plan: never hand out a cached one
    cachable = False

    def __init__(
        self,
        target_protocol: str | None = None,
        target_options: Mapping[str, Any] | None = None,
        plan: FaultPlan | Mapping[str, Any] | None = None,
        fs: fsspec.AbstractFileSystem | None = None,
        fo: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if fs is None:
            if target_protocol is None:
                raise ValueError(
                    "faulty:// needs the file system to wrap: pass target_protocol= (e.g. 'file', "
                    "'memory', 's3') or fs=, or chain it: 'faulty::memory://bucket/run'"
                )
            options = dict(target_options or {})
            if target_protocol in ("file", "local"):
                options.setdefault("auto_mkdir", True)
            fs = fsspec.filesystem(target_protocol, **options)
        self.fs = fs
        self._lock = threading.Lock()
        if plan is None and os.environ.get(PLAN_ENV):
            plan = FaultPlan.model_validate_json(os.environ[PLAN_ENV])  # set for a worker process
        self._plan = FaultPlan() if plan is None else FaultPlan.model_validate(plan)
        self._event_log = os.environ.get(EVENT_LOG_ENV)
        self.reset()

        def _strip_protocol(path: Any) -> Any:
            # acts as a method: the target decides what its paths look like
            if isinstance(path, (list, tuple)):
                return [_strip_protocol(p) for p in path]
            return self.fs._strip_protocol(type(self)._strip_protocol(path))  # type: ignore[misc]

        self._strip_protocol = _strip_protocol

    # -- the plan and its counters ------------------------------------------------------------

    @property
    def plan(self) -> FaultPlan:
        """The plan in force."""
        return self._plan

    def reset(self, plan: FaultPlan | Mapping[str, Any] | None = None) -> None:
        """Clear every counter and restart call numbering and the random draws.

        Args:
            plan: a new plan to follow from now on (the current one when omitted).
        """
        with self._lock:
            if plan is not None:
                self._plan = FaultPlan.model_validate(plan)
            seed = self._plan.seed
            self._rng_fail = random.Random(f"{seed}:transient")
            self._rng_torn = random.Random(f"{seed}:torn")
            self._calls: Counter[str] = Counter()
            self._faults: Counter[str] = Counter()
            self._events: list[FaultEvent] = []
            self._numbered = 0
            self._outage_since: float | None = None

    @property
    def stats(self) -> FaultStats:
        """A consistent copy of the counters."""
        with self._lock:
            return FaultStats(
                calls=dict(self._calls),
                numbered=self._numbered,
                faults=dict(self._faults),
                events=tuple(self._events),
            )

    def _applies(self, op: Op, path: str) -> bool:
        plan = self._plan
        if op not in plan.ops:
            return False
        return not plan.paths or any(fnmatch.fnmatchcase(path, p) for p in plan.paths)

    def _record(self, call: int, op: Op, path: str, kind: FaultKind) -> None:
        self._faults[kind] += 1
        self._events.append(FaultEvent(call, op, path, kind))
        if self._event_log:  # one JSON line per injected fault, for whoever accounts for them
            line = json.dumps(
                {"call": call, "op": op, "path": path, "kind": kind, "pid": os.getpid(), "t": time.time()}
            )
            with open(self._event_log, "a") as f:
                f.write(line + "\n")

    def _hook(self, op: Op, path: Any) -> int | None:
        """Count a call and maybe fail it; returns its call number (None if the plan skips it)."""
        where = str(path if isinstance(path, str) else next(iter(path), ""))
        with self._lock:
            self._calls[op] += 1
            if not self._applies(op, where):
                return None
            plan = self._plan
            self._numbered += 1
            n = self._numbered
            # draw for every numbered call, so call n sees the same draw whatever came before
            unlucky = plan.transient_rate > 0 and self._rng_fail.random() < plan.transient_rate
            kind: FaultKind | None = None
            if n in plan.permanent_nth:
                kind = "permanent"
            elif self._in_outage(n):
                kind = "outage"
            elif n in plan.fail_nth:
                kind = "fail_nth"
            elif unlucky:
                kind = "transient_rate"
            if kind is not None:
                self._record(n, op, where, kind)
        if plan.latency_s:
            time.sleep(plan.latency_s)
        if kind is not None:
            raise self._error(kind, op, where, n)
        return n

    def _in_outage(self, n: int) -> bool:
        outage = self._plan.outage
        if outage is None or n < outage.start:
            return False
        if outage.calls is not None:
            return n < outage.start + outage.calls
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
        return now - self._outage_since < (outage.seconds or 0.0)

    def _error(self, kind: FaultKind, op: str, path: str, n: int) -> InjectedFault:
        message = f"injected {kind} fault on {op} of {path!r} (call {n})"
        exc: InjectedFault
        if kind == "permanent":
            exc = InjectedPermissionError(errno.EACCES, message, path)
        elif self._plan.transient_error == "timeout":
            exc = InjectedTimeoutError(errno.ETIMEDOUT, message)
        else:
            exc = InjectedConnectionError(errno.ECONNRESET, message)
        exc.kind = kind
        return exc

    def _tear(self, n: int | None, path: str, value: bytes) -> bytes:
        """The bytes a write really stores: all of them, or a prefix if this write is torn."""
        plan = self._plan
        if n is None or not (plan.torn_nth or plan.torn_write_rate):
            return value
        with self._lock:
            unlucky = plan.torn_write_rate > 0 and self._rng_torn.random() < plan.torn_write_rate
            if not value or not (n in plan.torn_nth or unlucky):
                return value
            self._record(n, "write", path, "torn")
        return bytes(memoryview(value)[: int(len(value) * plan.torn_fraction)])

    # -- file system methods: hook, then forward ----------------------------------------------

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        """Write a whole object (possibly torn, per the plan)."""
        path = self._strip_protocol(path)
        n = self._hook("write", path)
        self.fs.pipe_file(path, self._tear(n, path, value), mode=mode, **kwargs)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        """Read an object (or a byte range of it)."""
        path = self._strip_protocol(path)
        self._hook("read", path)
        return self.fs.cat_file(path, start=start, end=end, **kwargs)

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        """Details of one path."""
        path = self._strip_protocol(path)
        self._hook("info", path)
        return self.fs.info(path, **kwargs)

    def isdir(self, path: str) -> bool:
        """Whether ``path`` is a directory."""
        path = self._strip_protocol(path)
        self._hook("info", path)
        return bool(self.fs.isdir(path))

    def isfile(self, path: str) -> bool:
        """Whether ``path`` is a file."""
        path = self._strip_protocol(path)
        self._hook("info", path)
        return bool(self.fs.isfile(path))

    def exists(self, path: str, **kwargs: Any) -> bool:
        """Whether ``path`` exists (an injected fault raises instead of answering False)."""
        path = self._strip_protocol(path)
        self._hook("info", path)
        return bool(self.fs.exists(path, **kwargs))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        """Entries of one directory."""
        path = self._strip_protocol(path)
        self._hook("list", path)
        return self.fs.ls(path, detail=detail, **kwargs)

    def find(
        self, path: str, maxdepth: int | None = None, withdirs: bool = False, detail: bool = False, **kwargs: Any
    ) -> Any:
        """Every file below ``path`` (one call, however deep)."""
        path = self._strip_protocol(path)
        self._hook("list", path)
        return self.fs.find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs)

    def rm(self, path: str | list[str], recursive: bool = False, maxdepth: int | None = None) -> None:
        """Delete files (and directories with ``recursive``)."""
        path = self._strip_protocol(path)
        self._hook("delete", path)
        self.fs.rm(path, recursive=recursive, maxdepth=maxdepth)

    def rm_file(self, path: str) -> None:
        """Delete one file."""
        path = self._strip_protocol(path)
        self._hook("delete", path)
        self.fs.rm_file(path)

    def rmdir(self, path: str) -> None:
        """Delete an empty directory."""
        path = self._strip_protocol(path)
        self._hook("delete", path)
        self.fs.rmdir(path)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        """Create a directory (a write)."""
        path = self._strip_protocol(path)
        self._hook("write", path)
        self.fs.mkdir(path, create_parents=create_parents, **kwargs)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        """Create a directory and its parents (a write)."""
        path = self._strip_protocol(path)
        self._hook("write", path)
        self.fs.makedirs(path, exist_ok=exist_ok)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        """Copy one file (a write of ``path2``)."""
        path1, path2 = self._strip_protocol(path1), self._strip_protocol(path2)
        self._hook("write", path2)
        self.fs.cp_file(path1, path2, **kwargs)

    def invalidate_cache(self, path: str | None = None) -> None:
        """Drop the target's listing cache (never faulted: it does no I/O)."""
        self.fs.invalidate_cache(None if path is None else self._strip_protocol(path))

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        # faults strike at open time; torn writes apply to pipe_file only
        path = self._strip_protocol(path)
        self._hook("read" if "r" in mode and "+" not in mode else "write", path)
        return self.fs._open(
            path, mode=mode, block_size=block_size, autocommit=autocommit, cache_options=cache_options, **kwargs
        )

    def __repr__(self) -> str:
        return f"FaultyFileSystem({self.fs!r}, {self._plan!r})"


fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)
