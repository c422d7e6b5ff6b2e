"""`MoaiCheckpointIO`: Lightning's checkpoints stored as moai-ckpt snapshots.

Every checkpoint Lightning saves (``ModelCheckpoint``, ``trainer.save_checkpoint``) becomes a
committed snapshot (zarr arrays with checksums, committed atomically, nothing pickled), and
``trainer.fit(ckpt_path=...)`` loads one back. Lightning keeps its bookkeeping by file, so each
checkpoint path holds a small JSON `CheckpointPointer` to its snapshot. Import it from
`moai_ckpt.integrations.lightning`.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import CheckpointIO
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.errors import CorruptSnapshotError, MoaiCkptError, SnapshotNotFoundError, UnserializableStateError
from moai_ckpt.keys import check_key, sanitize_segment
from moai_ckpt.layout import SNAPSHOTS, commit_key, snapshot_dir
from moai_ckpt.results import SaveHandle
from moai_ckpt.storage import open_storage
from moai_ckpt.tree import TensorSink, encode

__all__ = ["CHECKPOINTS", "CheckpointPointer", "MoaiCheckpointIO"]

CHECKPOINTS = "checkpoints"  # below the plugin's URL: one run directory per checkpoint name
_POINTER_MAX_BYTES = 64 << 10


class CheckpointPointer(BaseModel):
    """What Lightning finds at a checkpoint path: which snapshot holds the checkpoint.

    Lightning keeps its own bookkeeping by file (top-k, ``last.ckpt``, ``ckpt_path="last"``), so
    each checkpoint path gets this small JSON file; the state lives in the snapshot
    ``<url>/checkpoints/<run>/snapshots/<step>``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["moai-ckpt-lightning"] = "moai-ckpt-lightning"
    version: Literal[1] = 1
    run: str = Field(description="the checkpoint's run directory under <url>/checkpoints/")
    step: int = Field(ge=0)


def _run_name(path: str) -> str:
    """The run directory name of a checkpoint path: its file name, made a safe storage key."""
    base = os.path.basename(str(path).rstrip("/")) or "checkpoint"
    name = sanitize_segment(base)
    if name != base:  # keep names that sanitize alike apart
        name = f"{name[:160]}-{hashlib.sha256(base.encode()).hexdigest()[:10]}"
    return check_key(name)


class MoaiCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that stores checkpoints as moai-ckpt snapshots.

    ``Trainer(plugins=[MoaiCheckpointIO("s3://bucket/run-7")])``: each checkpoint Lightning saves
    at ``path`` becomes a committed snapshot in ``<url>/checkpoints/<file name of path>/`` (at the
    checkpoint's ``global_step``), and ``path`` itself holds a `CheckpointPointer`. Saving a
    checkpoint name again commits the new snapshot before the old one is dropped, so a crash never
    leaves a name without a valid checkpoint. Lightning calls the plugin on rank 0 only.

    Tensors become zarr arrays; everything else in Lightning's checkpoint dict is stored as JSON.
    Nothing is pickled: a value that is neither (an object in ``hyper_parameters``, say) is an
    error naming its key, unless ``unserializable="drop"``.

    Args:
        url: where snapshots go (any fsspec URL); keep it apart from a `MoaiFaultTolerance` run.
        async_save: return once the tensors are copied to host memory; the write, the commit and
            the pointer file finish in the background (waited for by the next call and `teardown`).
            Lightning's ``AsyncCheckpointIO(MoaiCheckpointIO(url))`` works too.
        unserializable: ``"error"`` (default) or ``"drop"``: leave out, with a warning naming
            them, the values of ``hyper_parameters`` that are neither tensors nor JSON-able.
        **options: `Checkpointer` options and storage options.
    """

    def __init__(
        self,
        url: str,
        *,
        async_save: bool = False,
        unserializable: Literal["error", "drop"] = "error",
        **options: Any,
    ) -> None:
        if unserializable not in ("error", "drop"):
            raise ValueError(f"unserializable must be 'error' or 'drop', got {unserializable!r}")
        self.url = url.rstrip("/")
        self.async_save = async_save
        self.unserializable = unserializable
        self.options = {"capture_rng": False, **options}  # Lightning checkpoints hold no RNG state
        self._lock = threading.RLock()
        self._finisher: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    # -- the CheckpointIO interface -------------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Snapshot ``checkpoint`` and point ``path`` at it.

        Raises:
            UnserializableStateError: a value is neither a tensor nor JSON-able (names its key).
            StorageError: storage failed; the previous checkpoint of this name is untouched.
        """
        if storage_options is not None:
            raise TypeError(
                "MoaiCheckpointIO takes no storage_options per save; pass storage options to MoaiCheckpointIO(url, ...)"
            )
        with self._lock:
            self.wait()
            name = _run_name(str(path))
            step = int(checkpoint.get("global_step", 0))
            state = self._entries(checkpoint)
            ckpt = Checkpointer(self._run_url(name), local=True, **self.options)
            try:
                overwrite = step in ckpt.steps()
                if not self.async_save:
                    ckpt.save(step, state, overwrite=overwrite)
                    self._point(ckpt, str(path), name, step)
                    ckpt.close()
                    return
                handle = ckpt.save_async(step, state, overwrite=overwrite)
            except UnserializableStateError as exc:
                ckpt.close()
                raise UnserializableStateError(
                    f"{exc}. In a Lightning checkpoint this is usually a hyperparameter: exclude it with "
                    "self.save_hyperparameters(ignore=[...]) or use MoaiCheckpointIO(url, unserializable='drop')",
                    url=ckpt.url,
                    step=step,
                    key=exc.key,
                ) from exc
            except BaseException:
                ckpt.close()
                raise
            if self._finisher is None:
                self._finisher = ThreadPoolExecutor(1, thread_name_prefix="moai-lightning")
            self._pending = self._finisher.submit(self._finish_async, ckpt, handle, str(path), name, step)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read the checkpoint ``path`` points at (a pointer file, or a snapshot run directory).

        Tensors come back on the CPU, or on ``map_location`` when it is a device (a callable or a
        dict ``map_location`` leaves them on the CPU). ``weights_only`` is irrelevant: nothing
        stored is ever unpickled.

        Raises:
            SnapshotNotFoundError: nothing at ``path``, or its snapshot is gone.
            CorruptSnapshotError: the pointer or the snapshot fails its checks.
        """
        with self._lock:
            self.wait()
            run_url, step = self._locate(str(path))
            with Checkpointer(run_url, local=True, **self.options) as ckpt:
                step = ckpt.latest_step() if step is None else step
                if step is None:
                    raise SnapshotNotFoundError("no committed checkpoint snapshot", url=run_url)
                objects = ckpt.manifest(step).objects
                odd = [k for k, r in objects.items() if r.kind != "json" and not k.startswith("_rng")]
                if odd:
                    raise CorruptSnapshotError(
                        f"not a Lightning checkpoint snapshot: entries {odd} are not plain values",
                        url=run_url,
                        step=step,
                    )
                state: dict[str, Any] = {key: {} for key in objects if not key.startswith("_rng")}
                ckpt.restore(state, step=step, restore_rng=False)
        if isinstance(map_location, (str, torch.device)):
            state = _to_device(state, torch.device(map_location))
        return state

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the pointer at ``path`` and the snapshots of its checkpoint name."""
        with self._lock:
            self.wait()
            fs, local = fsspec.core.url_to_fs(str(path))
            name = _run_name(str(path))
            owner = self._owns(fs, local, name)
            if os.path.islink(local):
                os.remove(local)
            elif fs.exists(local):
                fs.rm(local, recursive=fs.isdir(local))
            if not owner:
                return
            parent = open_storage(f"{self.url}/{CHECKPOINTS}")
            with Checkpointer(self._run_url(name), local=True, **self.options) as ckpt:
                steps = ckpt.steps()
            parent.delete([f"{name}/{commit_key(s)}" for s in steps])  # un-commit first
            parent.delete_prefix(name)

    def teardown(self) -> None:
        """Finish the checkpoint being written in the background; raise its error, if any."""
        try:
            self.wait()
        finally:
            if self._finisher is not None:
                self._finisher.shutdown(wait=True)
                self._finisher = None

    def wait(self) -> None:
        """Wait for the checkpoint being written in the background (raises its error)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    # -- helpers --------------------------------------------------------------------------------

    def _run_url(self, name: str) -> str:
        return f"{self.url}/{CHECKPOINTS}/{name}"

    def _entries(self, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
        """Lightning's checkpoint dict as snapshot entries (hyperparameters filtered on request)."""
        state = dict(checkpoint)
        if self.unserializable == "drop":
            for key in ("hyper_parameters", "datamodule_hyper_parameters"):
                if isinstance(state.get(key), Mapping):
                    state[key] = _storable(state[key], key)
        return state

    def _finish_async(self, ckpt: Checkpointer, handle: SaveHandle | None, path: str, name: str, step: int) -> None:
        try:
            if handle is not None:
                handle.result()
            self._point(ckpt, path, name, step)
        finally:
            ckpt.close()

    def _point(self, ckpt: Checkpointer, path: str, name: str, step: int) -> None:
        """After the commit: write the pointer, then drop this name's older snapshots."""
        data = CheckpointPointer(run=name, step=step).model_dump_json(indent=1).encode()
        fs, local = fsspec.core.url_to_fs(path)
        if isinstance(fs, LocalFileSystem):
            _write_local_atomically(local, data)
        else:  # an object store's PUT replaces the object whole
            fs.pipe_file(local, data)
        for old in ckpt.steps():
            if old != step:
                ckpt.storage.delete([commit_key(old)])  # un-commit first
                ckpt.storage.delete_prefix(snapshot_dir(old))

    def _locate(self, path: str) -> tuple[str, int | None]:
        """(run directory, step) of a checkpoint path: a pointer file, or a run directory itself."""
        fs, local = fsspec.core.url_to_fs(path)
        if fs.isfile(local):
            pointer = self._read_pointer(fs, local)
            return self._run_url(pointer.run), pointer.step
        if fs.isdir(local) and fs.exists(f"{local.rstrip('/')}/{SNAPSHOTS}"):
            return path, None
        raise SnapshotNotFoundError(f"no checkpoint at {path} (neither a pointer file nor a run directory)", url=path)

    def _owns(self, fs: Any, local: str, name: str) -> bool:
        """Whether the checkpoint at ``local`` owns the snapshots of ``name``: not a link or a copy of
        another name's pointer (ModelCheckpoint's ``last.ckpt``), whose removal must keep them."""
        if os.path.islink(local):
            return False
        if not fs.isfile(local):
            return True
        try:
            return self._read_pointer(fs, local).run == name
        except CorruptSnapshotError:  # not a pointer: nothing else refers to this name's snapshots
            return True

    @staticmethod
    def _read_pointer(fs: Any, local: str) -> CheckpointPointer:
        size = fs.size(local)
        if size is None or size > _POINTER_MAX_BYTES:
            raise CorruptSnapshotError(f"{local} is not a moai-ckpt checkpoint pointer ({size} bytes)", url=local)
        try:
            pointer = CheckpointPointer.model_validate_json(fs.cat_file(local))
            check_key(pointer.run)
        except (ValidationError, MoaiCkptError, ValueError) as exc:
            raise CorruptSnapshotError(
                f"{local} is not a moai-ckpt checkpoint pointer (a torch.save checkpoint? it is never unpickled "
                f"here): {exc}",
                url=local,
            ) from exc
        return pointer


def _storable(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The entries of ``values`` that are tensors or JSON-able; the others are dropped with a warning."""
    kept = {}
    for key, value in values.items():
        try:
            encode(value, f"{where}.{key}", TensorSink(lambda path: path))
        except UnserializableStateError as exc:
            warnings.warn(f"MoaiCheckpointIO leaves out {where}.{key}: {exc}", stacklevel=3)
            continue
        kept[key] = value
    return kept


def _write_local_atomically(path: str, data: bytes) -> None:
    """A whole file or none: written beside it, flushed, then renamed over it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if os.path.islink(path):  # a "last.ckpt" link made by ModelCheckpoint: replace the link, not its target
        os.remove(path)
    os.replace(temp, path)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value
