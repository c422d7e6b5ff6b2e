"""The writer process itself: plans, checksums and writes the snapshots a training process staged.

Started by `moai_ckpt.persist.WriterProcess` as ``python -m moai_ckpt.persist_worker FD CONFIG``:
``FD`` is its end of a socket pair, ``CONFIG`` the run directory's URL and storage options, the
training process's pid and the name of the segment that mirrors the lease deadline. It opens the
run directory itself, from the same URL and options, says it is ready, then answers requests
one at a time (JSON in both directions; see `moai_ckpt.persist`): ``plan`` (the staged layout and
every rank's planning message), ``write`` (the chunks and rank index), ``commit`` (the metadata,
manifest and commit marker), ``drop`` and ``exit``. The steps are the phases of
`moai_ckpt.commit.SnapshotCommit`, run here on host tensors that are views of the training
process's shared-memory segments.

It exits when asked, when its socket closes, or when the training process is gone (its parent
changes), and then removes the segments that process left.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch

from moai_ckpt import shm
from moai_ckpt.commit import Planned, SnapshotCommit
from moai_ckpt.distributed import SingleProcess
from moai_ckpt.errors import LeaseLostError, MoaiCkptError
from moai_ckpt.format import ObjectRecord, RankIndex
from moai_ckpt.iopool import IOPool
from moai_ckpt.layout import lease_key
from moai_ckpt.persist import DEADLINE
from moai_ckpt.sharding import Piece
from moai_ckpt.staging import Staged
from moai_ckpt.storage import RetryPolicy, Storage, open_storage
from moai_ckpt.writer import RunWriter

PARENT_POLL_S = 0.2


class MirroredFence:
    """The lease check of the training process, from here: its deadline, read from a shared
    segment before every chunk, and with ``remote=True`` (before the commit marker) storage asked
    that no newer lease epoch exists. Once lost, lost for good."""

    def __init__(self, storage: Storage, epoch: int, deadline: mmap.mmap) -> None:
        self.storage = storage
        self.epoch = epoch
        self.deadline = deadline
        self.lost: str | None = None

    def __call__(self, *, remote: bool = False) -> None:
        if self.lost is None:
            late = time.monotonic() - DEADLINE.unpack_from(self.deadline, 0)[0]
            if late > 0:
                self.lost = (
                    f"this writer lost the run's lease (epoch {self.epoch}): it was not renewed in time; "
                    "another job may have taken the run over; it writes nothing more"
                )
            elif remote and self.storage.exists(lease_key(self.epoch + 1)):
                self.lost = (
                    f"this writer lost the run's lease (epoch {self.epoch}): another writer took the run over "
                    f"(lease epoch {self.epoch + 1}); it commits nothing more"
                )
        if self.lost is not None:
            raise LeaseLostError(self.lost, url=self.storage.url)


class WorkerCommit(SnapshotCommit):
    """The phases of a save this process runs, on one rank, fenced by a `MirroredFence`."""

    mirrored: MirroredFence | None = None

    def fence(self) -> Callable[..., None] | None:
        return self.mirrored


class Worker:
    """The request loop of the writer process."""

    def __init__(self, conn: Connection, config: dict[str, Any]) -> None:
        self.conn = conn
        self.config = config
        self.send_lock = threading.Lock()
        retry = RetryPolicy.model_validate(config["retry"])
        self.storage = open_storage(config["url"], retry, **config["storage_options"])
        self.storage.record_limit = int(config["record_limit"])
        threads = config["io_threads"]
        self.executor = IOPool(None if threads is None else int(threads))
        self.deadline = shm.attach(config["deadline"], DEADLINE.size)
        self.segments: dict[str, mmap.mmap] = {}
        self.saves: dict[int, tuple[WorkerCommit, Staged, Planned]] = {}

    def send(self, message: dict[str, Any]) -> None:
        with self.send_lock:
            self.conn.send_bytes(json.dumps(message).encode())

    def serve(self) -> None:
        self.send({"ready": True, "pid": os.getpid()})
        while True:
            try:
                request = json.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                return
            if request["op"] == "exit":
                return
            try:
                answer = getattr(self, "op_" + request["op"])(request)
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the training process
                answer = {"error": described(exc)}
            self.send(answer)

    # -- requests ------------------------------------------------------------------------------

    def op_plan(self, request: dict[str, Any]) -> dict[str, Any]:
        world = SingleProcess()
        world.rank, world.world_size = int(request["rank"]), int(request["world_size"])
        commit = WorkerCommit(
            self.storage,
            world,
            self.executor,
            RunWriter(self.storage, 30.0),  # never used: the training process holds the lease
            chunk_bytes=int(request["chunk_bytes"]),
        )
        staged = self.staged(int(request["step"]), request["staged"])
        planned = commit.decide(staged, request["everyone"])
        self.saves[staged.step] = (commit, staged, planned)
        return {"ok": True}

    def op_write(self, request: dict[str, Any]) -> dict[str, Any]:
        commit, staged, planned = self.saves[int(request["step"])]
        if "epoch" in request:
            commit.mirrored = MirroredFence(self.storage, int(request["epoch"]), self.deadline)
        progress = (lambda n: self.send({"progress": n})) if request.get("progress") else None
        index = commit.write(planned, staged, progress)
        return {"index": index.model_dump(mode="json")}

    def op_commit(self, request: dict[str, Any]) -> dict[str, Any]:
        commit, staged, planned = self.saves[int(request["step"])]
        commit.run_entry = request.get("run_entry")
        indexes = [RankIndex.model_validate(i) for i in request["indexes"]]
        return {"marker": commit.commit(planned, staged, indexes).to_json()}

    def op_drop(self, request: dict[str, Any]) -> dict[str, Any]:
        self.saves.pop(int(request["step"]), None)
        return {"ok": True}

    # -- the staged state, from its layout -----------------------------------------------------

    def staged(self, step: int, raw: dict[str, Any]) -> Staged:
        """The training process's `Staged`, its host tensors mapped from shared memory."""
        used: dict[str, mmap.mmap] = {}
        host: dict[str, torch.Tensor] = {}
        for name, (segment, nbytes, dtype, shape) in raw["host"].items():
            mapping = self.segments.get(segment)
            if mapping is None or len(mapping) < max(int(nbytes), 1):
                mapping = shm.attach(segment, int(nbytes))
            used[segment] = mapping
            host[name] = shm.tensor(mapping, tuple(shape), shm.dtype_named(dtype))
        self.segments = used  # segments no longer used were freed by the training process
        return Staged(
            step=step,
            objects={k: ObjectRecord.model_validate(v) for k, v in raw["objects"].items()},
            info=raw["info"],
            rng_key=raw["rng_key"],
            pieces={n: Piece.from_json(p) for n, p in raw["pieces"].items()},
            devices=raw["devices"],
            host=host,
        )


def described(exc: BaseException) -> dict[str, Any]:
    """An error as plain data: its class name, message, and where (moai-ckpt errors)."""
    if isinstance(exc, MoaiCkptError):
        return {
            "moai": True,
            "type": type(exc).__name__,
            "detail": exc.detail,
            "url": exc.url,
            "step": exc.step,
            "key": exc.key,
        }
    return {"moai": False, "type": type(exc).__name__, "detail": str(exc)}


def watch_parent(parent: int) -> None:
    """Exit as soon as the training process is gone (this process is re-parented), cleaning up."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    shm.remove_all(parent)
    os._exit(0)


def main(argv: list[str]) -> None:
    fd, config = int(argv[1]), json.loads(argv[2])
    parent = int(config["parent"])
    torch.set_num_threads(1)
    threading.Thread(target=watch_parent, args=(parent,), name="moai-parent", daemon=True).start()
    conn = Connection(fd)
    try:
        worker = Worker(conn, config)
    except Exception as exc:  # noqa: BLE001 - the training process falls back to the thread path
        conn.send_bytes(json.dumps({"error": described(exc)}).encode())
        return
    try:
        worker.serve()
    finally:
        worker.executor.shutdown(wait=True)
        if os.getppid() != parent:
            shm.remove_all(parent)


if __name__ == "__main__":
    main(sys.argv)
