"""PyTorch Lightning through moai-ckpt: checkpoints as snapshots, and fits that resume bitwise.

Two independent pieces (``pip install moai-ckpt[lightning]``; Lightning is imported as
``lightning.pytorch``):

- `MoaiCheckpointIO`, a ``CheckpointIO`` plugin: every checkpoint Lightning saves (``ModelCheckpoint``,
  ``trainer.save_checkpoint``) becomes a moai-ckpt snapshot (zarr arrays with checksums, committed
  atomically, nothing pickled) and loads back from one (``trainer.fit(ckpt_path=...)``).
- `MoaiFaultTolerance`, a callback: snapshots, the step log and the replay check of
  `moai_ckpt.fault_tolerant`, so a fit killed mid-epoch resumes at its last completed step, bitwise,
  with the same data order.

See docs/integrations.md.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import fsspec
import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.warnings import PossibleUserWarning
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.errors import CorruptSnapshotError, MoaiCkptError, SnapshotNotFoundError, UnserializableStateError
from moai_ckpt.format import COMMIT, SNAPSHOTS, snapshot_dir
from moai_ckpt.integrations.data import ResumableBatchSampler
from moai_ckpt.integrations.driver import StepDriver
from moai_ckpt.keys import check_key, sanitize_segment
from moai_ckpt.results import SaveHandle
from moai_ckpt.storage import open_storage
from moai_ckpt.tree import TensorSink, encode
from replay.check import ReplayReport

log = logging.getLogger("moai_ckpt.integrations.lightning")

__all__ = ["CheckpointPointer", "MoaiCheckpointIO", "MoaiFaultTolerance", "ResumableBatchSampler"]

CHECKPOINTS = "checkpoints"  # below the plugin's URL: one run directory per checkpoint name
_POINTER_MAX_BYTES = 64 << 10


# -- MoaiCheckpointIO ---------------------------------------------------------------------------


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
            parent.delete([f"{name}/{snapshot_dir(s)}/{COMMIT}" for s in steps])  # un-commit first
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
                ckpt.storage.delete([f"{snapshot_dir(old)}/{COMMIT}"])  # un-commit first
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


# -- MoaiFaultTolerance -------------------------------------------------------------------------


class _LoopProgress:
    """The fit loop's progress as of the last completed step (what a snapshot holds)."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer
        self.saved = trainer.fit_loop.state_dict()

    def capture(self) -> None:
        self.saved = self.trainer.fit_loop.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return self.saved

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # what Lightning's own restore does with a checkpoint's "loops" entry
        self.trainer.fit_loop.load_state_dict(state)
        self.saved = state


class _CallbackStates:
    """The states of the trainer's other callbacks (``ModelCheckpoint``, early stopping...)."""

    def __init__(self, trainer: pl.Trainer, skip: pl.Callback) -> None:
        self.trainer = trainer
        self.skip = skip

    def _callbacks(self) -> Iterator[pl.Callback]:
        return (cb for cb in self.trainer.callbacks if cb is not self.skip)  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, Any]:
        return {cb.state_key: cb.state_dict() for cb in self._callbacks()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for cb in self._callbacks():
            if cb.state_key in state:
                cb.load_state_dict(state[cb.state_key])


class _DataPosition:
    """The data position: a `ResumableBatchSampler`'s, or a restored one waiting for its sampler."""

    def __init__(self) -> None:
        self.sampler: ResumableBatchSampler | None = None
        self.waiting: dict[str, Any] | None = None

    def attach(self, sampler: ResumableBatchSampler) -> None:
        self.sampler = sampler
        sampler.driven = True
        if self.waiting is not None:
            sampler.load_state_dict(self.waiting)
            self.waiting = None

    def state_dict(self) -> dict[str, Any]:
        if self.sampler is None:
            raise MoaiCkptError("the training DataLoader has no batch sampler from MoaiFaultTolerance.batch_sampler()")
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.sampler is None:
            self.waiting = dict(state)
        else:
            self.sampler.load_state_dict(state)


class MoaiFaultTolerance(pl.Callback):
    """Resume a Lightning fit at its last completed step, bitwise, after any crash.

    The callback takes snapshots of the whole training state (module, optimizers, LR schedulers,
    precision plugin, the fit loop's progress, the other callbacks' states, the data position and
    every RNG of every rank), logs every completed step after each snapshot, and when the fit
    starts again restores the newest snapshot and checks each re-run step against its log record
    (`replay.check`): on the same number of devices every step must be bitwise equal (else
    `ReplayDivergenceError`, as `moai_ckpt.fault_tolerant` raises); on another number, the drift
    is reported (`report`, and ``reports/`` in the run directory).

    The data must come from `batch_sampler` (its position is what training consumed, so a fit
    resumes mid-epoch on the next global batch), and ``Trainer(use_distributed_sampler=False)``
    under DDP::

        ft = MoaiFaultTolerance("runs/7", snapshot_every=100)
        loader = DataLoader(dataset, batch_sampler=ft.batch_sampler(len(dataset), global_batch_size=64))
        Trainer(callbacks=[ft], use_distributed_sampler=False, ...).fit(model, loader)

    Limits: one optimizer step per batch (``accumulate_grad_batches=1``); ``training_step`` returns
    the loss (a tensor or a dict with ``"loss"``); the dataset is a deterministic function of the
    index; a fit resumes from its own run directory, so ``ckpt_path`` is refused.

    Args:
        url: the run directory (any fsspec URL).
        snapshot_every: steps between snapshots (None: only ``snapshot_every_s``).
        snapshot_every_s: also snapshot once this many seconds have passed (rank 0's clock).
        async_snapshots: write snapshots in the background.
        snapshot_at_end: snapshot the last step when the fit ends.
        log_flush_every, log_flush_seconds, log_lag: as in `moai_ckpt.fault_tolerant`.
        **options: `Checkpointer` options and storage options.
    """

    def __init__(
        self,
        url: str,
        *,
        snapshot_every: int | None = 100,
        snapshot_every_s: float | None = None,
        async_snapshots: bool = True,
        snapshot_at_end: bool = True,
        log_flush_every: int = 1,
        log_flush_seconds: float | None = None,
        log_lag: int = 1,
        **options: Any,
    ) -> None:
        self.url = url
        self._settings = {
            "snapshot_every": snapshot_every,
            "snapshot_every_s": snapshot_every_s,
            "async_snapshots": async_snapshots,
            "snapshot_at_end": snapshot_at_end,
            "log_flush_every": log_flush_every,
            "log_flush_seconds": log_flush_seconds,
            "log_lag": log_lag,
            **options,
        }
        StepDriver(url, **self._settings)  # validates the settings now, not when the fit starts
        self._data = _DataPosition()
        self._driver: StepDriver | None = None
        self._loops: _LoopProgress | None = None
        #: the step the fit resumed from (None: a new run)
        self.resumed_from: int | None = None

    def batch_sampler(self, num_samples: int, global_batch_size: int, **options: Any) -> ResumableBatchSampler:
        """The training data's batch sampler, whose position this callback snapshots and advances.

        Args:
            num_samples: the dataset length.
            global_batch_size: samples per step over all ranks (each rank takes a contiguous slice).
            **options: ``seed``, ``shuffle``, ``drop_last`` (see `ResumableBatchSampler`).
        """
        sampler = ResumableBatchSampler(num_samples, global_batch_size, **options)
        self._data.attach(sampler)
        return sampler

    @property
    def replaying(self) -> bool:
        """Whether the step in progress re-runs a logged step (a replay after a restart)."""
        return self._driver is not None and self._driver.replaying

    @property
    def report(self) -> ReplayReport | None:
        """What the replay after the last restart checked (None before the fit starts)."""
        return self._driver.report if self._driver is not None else None

    @property
    def state_key(self) -> str:
        return f"MoaiFaultTolerance[{self.url}]"

    # -- Lightning hooks ------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "MoaiFaultTolerance logs one optimizer step per batch: use accumulate_grad_batches=1 "
                "(and a larger global batch)"
            )
        if trainer.ckpt_path is not None:
            raise ValueError(
                f"MoaiFaultTolerance resumes from its own run directory {self.url}; drop "
                f"ckpt_path={trainer.ckpt_path!r} (Lightning would restore it over the snapshot)"
            )
        if self._data.sampler is not None:
            self._data.sampler.rank, self._data.sampler.world_size = trainer.global_rank, trainer.world_size
        # Lightning cannot see that the batch sampler resumes; it warns that the data loader does not
        warnings.filterwarnings(
            "ignore", message="You're resuming from a checkpoint that ended before", category=PossibleUserWarning
        )
        self._loops = _LoopProgress(trainer)
        self._driver = StepDriver(self.url, **self._settings)
        self.resumed_from = self._driver.open(self._tracked(trainer, pl_module), pl_module.device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = self._data.sampler
        if sampler is None or not any(getattr(dl, "batch_sampler", None) is sampler for dl in _loaders(trainer)):
            raise ValueError(
                "MoaiFaultTolerance needs the training DataLoader to take its batches from "
                "batch_sampler=ft.batch_sampler(...) (and Trainer(use_distributed_sampler=False) under DDP), "
                "so that a resumed fit continues on the next global batch"
            )
        sampler.rank, sampler.world_size = trainer.global_rank, trainer.world_size

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert self._driver is not None and self._data.sampler is not None
        step = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        self._driver.begin(step, self._data.sampler.global_batch())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        assert self._driver is not None and self._loops is not None and self._data.sampler is not None
        self._data.sampler.advance()
        self._loops.capture()
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        self._driver.end(self._driver.step + 1, _loss_of(outputs), grad_norm)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._driver is not None:
            self._driver.finish()
            self._driver.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._driver is not None:
            self._driver.close(failing=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._driver is not None:
            self._driver.close(failing=True)

    # -- helpers --------------------------------------------------------------------------------

    def _tracked(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """What each snapshot holds, by name (read again at every snapshot)."""
        assert self._loops is not None
        tracked: dict[str, Any] = {"model": pl_module}
        for i, optimizer in enumerate(trainer.optimizers):
            tracked[f"optimizer_{i}"] = optimizer
        for i, config in enumerate(trainer.lr_scheduler_configs):
            tracked[f"scheduler_{i}"] = config.scheduler
        tracked["precision"] = trainer.precision_plugin
        tracked["loops"] = self._loops
        tracked["callbacks"] = _CallbackStates(trainer, self)
        if trainer.datamodule is not None:  # type: ignore[attr-defined]
            tracked["datamodule"] = trainer.datamodule  # type: ignore[attr-defined]
        tracked["data"] = self._data
        return tracked


def _loaders(trainer: pl.Trainer) -> list[Any]:
    """The training data loaders, however the fit was given them (one, a list, a dict)."""
    found = trainer.train_dataloader
    if isinstance(found, Mapping):
        return list(found.values())
    if isinstance(found, (list, tuple)):
        return list(found)
    return [found]


def _loss_of(outputs: Any) -> torch.Tensor | float:
    """The loss ``training_step`` returned (a tensor, or a dict with ``"loss"``)."""
    if isinstance(outputs, Mapping) and "loss" in outputs:
        outputs = outputs["loss"]
    if isinstance(outputs, torch.Tensor) and outputs.numel() == 1:
        return outputs.detach()
    if isinstance(outputs, (int, float)):
        return float(outputs)
    raise ValueError(
        "MoaiFaultTolerance logs each step's loss: training_step must return it (a tensor or a dict with 'loss'), "
        f"got {type(outputs).__name__}"
    )
