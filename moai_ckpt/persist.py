"""The writer process of `save_async`: the background persist, off the training process's interpreter.

A Python thread that runs beside the training thread slows its steps several times over, because
every torch op gives the GIL up and must take it back (docs/benchmarks.md, "Where the time goes").
So the work of a background save that runs Python (planning the chunks, checksums, the writes,
the zarr metadata, the manifest and the commit marker) runs in one long-lived writer process per
training process (`moai_ckpt.persist_worker`), started in the background by `WriterProcess.start`
(a fresh interpreter: it imports torch, which takes seconds; until it is ready saves take the
thread path).

What crosses the boundary is plain data, as JSON over a socket pair: the staged layout (state
records, pieces, and for every host tensor the name of the shared-memory segment of the host pool
that holds it, `moai_ckpt.shm`), the planning messages of every rank, the rank indexes, and back
the rank index, the commit marker, or a moai-ckpt error (re-raised here as the same class, with
URL, step and key). The training process keeps what needs it: the collectives and votes of a
distributed save, the run's writer lease (its heartbeat) and the step's claim. The lease fences
the writer process too: this side mirrors the lease's deadline into a shared segment that the
writer reads before every chunk, and before the commit marker it asks storage that no newer epoch
exists, so a writer that lost the run writes nothing more (`moai_ckpt.persist_worker.MirroredFence`).

The writer process exits on `WriterProcess.close` and by itself when its training process dies
(it watches its parent), removing the shared segments that process left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from moai_ckpt import errors, shm
from moai_ckpt.commit import SnapshotCommit
from moai_ckpt.errors import MoaiCkptError, WriterProcessError
from moai_ckpt.format import CommitMarker, RankIndex
from moai_ckpt.lease import RunLease
from moai_ckpt.snapshot import Progress
from moai_ckpt.staging import HostPool, Staged

log = logging.getLogger("moai_ckpt")

#: how often the training process refreshes the lease deadline the writer process reads
MIRROR_INTERVAL_S = 0.05
DEADLINE = struct.Struct("<d")


def shareable(url: str, storage_options: Mapping[str, Any]) -> str | None:
    """Why a writer process cannot open this run directory as this process does, or None if it can.

    ``memory://`` lives in this process only; storage options must be plain data (a pydantic
    model is sent as its JSON form, as the fault-injecting file system of the test kit takes it).
    """
    protocols = [part.split("://", 1)[0] for part in url.split("::") if "://" in part or part.isidentifier()]
    if "memory" in protocols:
        return "memory:// storage lives in this process only"
    try:
        json.dumps(plain_options(storage_options))
    except (TypeError, ValueError) as exc:
        return f"its storage options are not plain data ({exc})"
    return None


def plain_options(storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """Storage options as JSON-able data (pydantic models as their JSON form)."""
    return {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in storage_options.items()}


class WriterProcess:
    """The training process's handle on its writer process: start, ready, call, close.

    Args:
        url: the run directory, as the Checkpointer was given it.
        storage_options: its storage options (plain data, see `shareable`).
        retry: the retry policy, as JSON.
        record_limit: `CheckpointerOptions.max_record_bytes`.
        io_threads: threads the writer process writes with (None: as many as its cores allow).
    """

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any],
        retry: dict[str, Any],
        record_limit: int,
        io_threads: int | None,
    ) -> None:
        self.config = {
            "url": url,
            "storage_options": plain_options(storage_options),
            "retry": retry,
            "record_limit": record_limit,
            "io_threads": io_threads,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None
        #: why the writer process cannot be used (set once it failed to start or died)
        self.broken: str | None = None
        self._ready = False
        self._lock = threading.Lock()
        self._deadline_name, self._deadline = shm.create(DEADLINE.size)
        self.lease: RunLease | None = None  # the lease that fences the current save, if any

    def start(self) -> None:
        """Start the process (returns at once; `ready` says when it can take a save)."""
        ours, theirs = socket.socketpair()
        package_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        boot = dict(self.config, parent=os.getpid(), deadline=self._deadline_name)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moai_ckpt.persist_worker", str(theirs.fileno()), json.dumps(boot)],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            ours.close()
            self._broke(f"it could not start: {exc}")
            return
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())

    def ready(self, timeout: float = 0.0) -> bool:
        """Whether the process is up (waits up to ``timeout`` s for it); False for good once it is broken."""
        if self._ready or self.broken is not None:
            return self._ready and self.broken is None
        if self.conn is None:
            return False
        try:
            if not self.conn.poll(timeout):
                if self.proc is not None and self.proc.poll() is not None:
                    self._broke(f"it exited with code {self.proc.returncode} while starting")
                return False
            hello = json.loads(self.conn.recv_bytes())
        except (EOFError, OSError):
            self._broke("it exited while starting")
            return False
        if "error" in hello:
            self._broke(f"it failed to start: {hello['error'].get('type')}: {hello['error'].get('detail')}")
            return False
        self._ready = True
        return True

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _broke(self, why: str) -> None:
        if self.broken is None:
            self.broken = why
            log.warning("the writer process of save_async is not used any more (%s); saves persist in a thread", why)

    def call(self, request: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
        """Send one request and wait for its answer, mirroring the lease deadline meanwhile.

        Raises:
            MoaiCkptError: the writer's error, as the same class (`WriterProcessError` for others).
        """
        with self._lock:
            conn = self.conn
            if conn is None or self.broken is not None:
                raise WriterProcessError(f"the writer process cannot be used: {self.broken}", step=request.get("step"))
            try:
                self._mirror()
                conn.send_bytes(json.dumps(request).encode())
                while True:
                    while not conn.poll(MIRROR_INTERVAL_S):
                        self._mirror()
                    answer = json.loads(conn.recv_bytes())
                    if "progress" in answer:
                        if progress is not None:
                            progress(answer["progress"])
                        continue
                    break
            except (EOFError, OSError) as exc:
                code = self.proc.poll() if self.proc is not None else None
                self._broke(f"it died (exit code {code}): {exc or type(exc).__name__}")
                raise WriterProcessError(
                    f"the writer process died during the save (exit code {code})", step=request.get("step")
                ) from None
        if "error" in answer:
            raise rebuilt(answer["error"]).located(step=request.get("step"))
        return answer

    def _mirror(self) -> None:
        """Publish the fencing lease's deadline (monotonic clock, the same for both processes)."""
        deadline = self.lease.deadline() if self.lease is not None else float("inf")
        DEADLINE.pack_into(self._deadline, 0, deadline)

    def close(self, timeout: float = 10.0) -> None:
        """Ask the process to exit, wait for it (killing it after ``timeout`` s), remove its segment."""
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.send_bytes(json.dumps({"op": "exit"}).encode())
            conn.close()
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.broken = self.broken or "closed"
        shm.unlink(self._deadline_name)


def rebuilt(error: Mapping[str, Any]) -> MoaiCkptError:
    """A writer-process error as this process raises it: the same moai-ckpt class, URL, step and key."""
    cls = getattr(errors, str(error.get("type")), None)
    where = {"url": error.get("url"), "step": error.get("step"), "key": error.get("key")}
    if isinstance(cls, type) and issubclass(cls, MoaiCkptError) and error.get("moai"):
        try:
            return cls(str(error.get("detail")), **where)
        except TypeError:
            pass
    return WriterProcessError(f"the writer process failed: {error.get('type')}: {error.get('detail')}", **where)


def layout(staged: Staged, pool: HostPool) -> dict[str, Any]:
    """``staged`` as plain data: its records, pieces and devices, and where each host tensor lies."""
    host = {}
    for name, tensor in staged.host.items():
        segment = pool.segment(name)
        if segment is None:
            raise WriterProcessError(f"host copy of {name!r} is not in shared memory", step=staged.step)
        host[name] = [segment[0], segment[1], str(tensor.dtype).removeprefix("torch."), list(tensor.shape)]
    return {
        "objects": {k: r.model_dump(mode="json") for k, r in staged.objects.items()},
        "info": staged.info,
        "rng_key": staged.rng_key,
        "pieces": {n: p.to_json() for n, p in staged.pieces.items()},
        "devices": staged.devices,
        "host": host,
    }


class ProcessCommit(SnapshotCommit):
    """Phases 2 to 6 of a save with the writing done by the writer process.

    This process gathers the planning messages, claims the step, votes and broadcasts (its
    collectives and its lease stay here); the writer process decides the plan, writes the chunks
    and rank index, and on the coordinator the metadata, manifest and commit marker.
    """

    def __init__(self, *args: Any, process: WriterProcess, pool: HostPool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.process = process
        self.pool = pool
        self.request: dict[str, Any] = {}  # what every request of this save carries

    def run(self, staged: Staged, *, overwrite: bool = False, progress: Progress | None = None) -> CommitMarker:
        step = staged.step
        self.request = {"step": step, "rank": self.world.rank, "world_size": self.world.world_size}
        self.process.lease = None
        try:
            plan = {"chunk_bytes": self.chunk_bytes, "staged": layout(staged, self.pool)}
            self.process.call({"op": "plan", **self.request, **plan, "everyone": self.gather(staged)})
            self.claim(step, overwrite)
            indexes = self.vote(step, lambda: self._write(progress))
            return self.seal(step, lambda: self._commit(indexes))
        finally:
            self.process.lease = None
            if self.process.broken is None:
                try:
                    self.process.call({"op": "drop", "step": step})
                except MoaiCkptError as exc:
                    log.warning("the writer process could not forget step %d: %s", step, exc)

    def _write(self, progress: Progress | None) -> RankIndex:
        """Phase 4 in the writer process, fenced by the coordinator's lease (mirrored meanwhile)."""
        lease = self.writer.lease if self.world.rank == 0 else None
        self.process.lease = lease
        fenced = {"epoch": lease.epoch} if lease is not None and lease.epoch is not None else {}
        answer = self.process.call(
            {"op": "write", **self.request, **fenced, "progress": progress is not None}, progress
        )
        return RankIndex.model_validate(answer["index"])

    def _commit(self, indexes: list[RankIndex]) -> CommitMarker:
        """Phase 6 on the coordinator, in the writer process: metadata, manifest, commit marker."""
        sent = [i.model_dump(mode="json") for i in indexes]
        answer = self.process.call({"op": "commit", **self.request, "indexes": sent, "run_entry": self.run_entry})
        return CommitMarker.model_validate(answer["marker"])
