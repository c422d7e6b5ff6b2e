"""Coordination between the ranks of a collective save or restore: small JSON messages and the vote.

Messages are small JSON documents carried as byte tensors over a dedicated gloo group (CPU only,
its own timeout, safe to use from a background thread while training runs NCCL collectives).
Nothing is pickled, unlike ``all_gather_object``. A rank that dies or hangs turns into a
`CoordinationError` that names it, within the timeout, instead of a hang. `agree` is the vote
every phase of a save or restore ends with (torchft's ``should_commit``): one rank's failure is
everyone's.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from moai_ckpt.errors import CoordinationError, RankLostError

T = TypeVar("T")
_WORLDS = itertools.count()


class World(Protocol):
    """The ranks taking part in a save or restore."""

    rank: int
    world_size: int

    def all_gather_json(self, obj: Any, what: str) -> list[Any]: ...

    def broadcast_json(self, obj: Any, what: str, src: int = 0) -> Any: ...

    def barrier(self, what: str) -> None: ...

    def close(self) -> None: ...


class SingleProcess:
    """A world of one: every collective is the identity.

    Args:
        rank: the rank this process is in a larger job that it acts alone for (a rank reading a
            snapshot on its own: its own copies of rank-local state and RNG); 0 by default.
        world_size: that job's ranks; 1 by default.
    """

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank = rank
        self.world_size = world_size

    def all_gather_json(self, obj: Any, what: str) -> list[Any]:
        return [obj]

    def broadcast_json(self, obj: Any, what: str, src: int = 0) -> Any:
        return obj

    def barrier(self, what: str) -> None:
        return None

    def close(self) -> None:
        return None


class ProcessGroupWorld:
    """All ranks of the default process group, talking over their own gloo group.

    Args:
        timeout: bound on every collective; a rank silent for longer is reported as lost.
        group: an existing gloo group to use instead of creating one (it must span the world).
    """

    def __init__(self, timeout: timedelta = timedelta(minutes=5), group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise CoordinationError("torch.distributed is not initialised")
        self.timeout = timeout
        # creating a group is itself collective: every rank builds its Checkpointer in the same order
        self._owned = group is None
        self.group = group if group is not None else dist.new_group(backend="gloo", timeout=timeout)
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self._store = _default_store()
        self._arrivals = 0
        self._serial = next(_WORLDS)  # the same on every rank: worlds are built collectively, in order

    def _fail(self, what: str, exc: BaseException) -> RankLostError:
        return RankLostError(
            f"{what}: rank {self.rank} lost contact with the other ranks (one died, hung past "
            f"{self.timeout.total_seconds():.0f} s, or failed): {exc}"
        )

    def all_gather_json(self, obj: Any, what: str) -> list[Any]:
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        try:
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
            dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64), group=self.group)
            longest = int(max(s.item() for s in sizes))
            padded = torch.zeros(longest, dtype=torch.uint8)
            padded[: data.numel()] = data
            gathered = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
            dist.all_gather(gathered, padded, group=self.group)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise self._fail(what, exc) from exc
        return [json.loads(bytes(g[: int(n.item())].numpy())) for g, n in zip(gathered, sizes, strict=True)]

    def broadcast_json(self, obj: Any, what: str, src: int = 0) -> Any:
        return self.all_gather_json(obj if self.rank == src else None, what)[src]

    def close(self) -> None:
        """Release the coordination group if this world created it."""
        if self._owned and dist.is_initialized():
            dist.destroy_process_group(self.group)
            self._owned = False

    def barrier(self, what: str) -> None:
        """A barrier that names the ranks that did not arrive instead of hanging.

        Each rank also marks its arrival in the job's key-value store, so whichever way the
        barrier breaks (a timeout, a closed connection) the ranks that never came are named.
        """
        self._arrivals += 1
        mark = f"moai-ckpt/arrived/{self._serial}/{self._arrivals}"
        if self._store is not None:
            self._store.set(f"{mark}/{self.rank}", "1")
        try:
            dist.monitored_barrier(group=self.group, timeout=self.timeout, wait_all_ranks=True)
        except (RuntimeError, dist.DistBackendError) as exc:
            missing = self._missing(mark)
            error = self._fail(what, exc)
            if missing:
                error = RankLostError(f"{what}: rank(s) {missing} never arrived (died or hung); {error}")
            raise error from exc

    def _missing(self, mark: str) -> list[int]:
        if self._store is None:
            return []
        try:
            return [r for r in range(self.world_size) if not self._store.check([f"{mark}/{r}"])]
        except RuntimeError:  # the store's host may be the rank that died
            return []


def _default_store() -> dist.Store | None:
    """The job's key-value store (where torchrun's rendezvous lives), if it can be reached."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except (ImportError, RuntimeError, ValueError):
        return None


def current_world(timeout: timedelta, group: dist.ProcessGroup | None = None, *, local: bool = False) -> World:
    """The world a Checkpointer built now takes part in (``local``: this process alone)."""
    if not local and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return ProcessGroupWorld(timeout, group)
    return SingleProcess()


def agree(world: World, what: str, fn: Callable[[], T], *, url: str | None = None, step: int | None = None) -> T:
    """Run ``fn`` on every rank and vote on the outcome: if it failed anywhere, it fails everywhere.

    Every rank reaches the vote, whatever ``fn`` did (a barrier that names ranks that died or
    hung, then each rank's verdict gathered), so no rank goes on with a step the others gave
    up. The failing rank raises its own error; the others raise `CoordinationError` naming the
    failed ranks and their errors.
    """
    try:
        result, error = fn(), None
    except Exception as exc:  # noqa: BLE001 - re-raised below, after every rank has heard of it
        result, error = None, exc
    if world.world_size > 1:
        world.barrier(what)  # names ranks that died or hung (on rank 0) instead of a bare socket error
        verdicts = world.all_gather_json(None if error is None else f"{type(error).__name__}: {error}", what)
        failed = {rank: msg for rank, msg in enumerate(verdicts) if msg}
        if failed and error is None:
            raise CoordinationError(
                f"{what} failed on rank(s) {sorted(failed)}: "
                + "; ".join(f"rank {r}: {m}" for r, m in sorted(failed.items())),
                url=url,
                step=step,
            )
    if error is not None:
        raise error
    return result  # type: ignore[return-value]
