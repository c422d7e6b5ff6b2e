"""PyTorch Lightning through moai-ckpt: fits that resume bitwise, and checkpoints as snapshots.

Two independent pieces (``pip install moai-ckpt[lightning]``; Lightning is imported as
``lightning.pytorch``):

- `MoaiFaultTolerance`, a callback: snapshots, the step log and the replay check of
  `moai_ckpt.fault_tolerant`, so a fit killed mid-epoch resumes at its last completed step, bitwise,
  with the same data order.
- `MoaiCheckpointIO`, a ``CheckpointIO`` plugin (`moai_ckpt.integrations.lightning_io`): every
  checkpoint Lightning saves becomes a moai-ckpt snapshot and loads back from one.

See docs/integrations.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning

from moai_ckpt.errors import MoaiCkptError
from moai_ckpt.integrations.data import ResumableBatchSampler
from moai_ckpt.integrations.driver import integration_options, open_run
from moai_ckpt.integrations.lightning_io import CheckpointPointer, MoaiCheckpointIO
from moai_ckpt.run import Run, RunOptions
from replay.check import ReplayReport

__all__ = ["CheckpointPointer", "MoaiCheckpointIO", "MoaiFaultTolerance", "ResumableBatchSampler"]


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
        options: every option at once, as a `moai_ckpt.RunOptions` (then no other keyword argument).
        **kwargs: `RunOptions` fields (``snapshot_every``, ``snapshot_every_s``, ``async_snapshots``,
            ``snapshot_at_end``, ``log_flush_every``, ``log_flush_seconds``, ``log_lag``... as in
            `moai_ckpt.fault_tolerant`), `Checkpointer` options and storage options; the exact
            state digests are off unless asked for (`moai_ckpt.integrations.driver.integration_options`).
    """

    def __init__(self, url: str, *, options: RunOptions | None = None, **kwargs: Any) -> None:
        self.url = url
        self._options = integration_options(url, options, **kwargs)  # validated now, not when the fit starts
        self._data = _DataPosition()
        self._run: Run | None = None
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
        return self._run is not None and self._run.replaying

    @property
    def report(self) -> ReplayReport | None:
        """What the replay after the last restart checked (None before the fit starts)."""
        return self._run.report if self._run is not None else None

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
        self._run, self.resumed_from = open_run(self._options, self._tracked(trainer, pl_module), pl_module.device)

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
        assert self._run is not None and self._data.sampler is not None
        step = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        self._run.begin_step(step, self._data.sampler.global_batch())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        assert self._run is not None and self._loops is not None and self._data.sampler is not None
        self._data.sampler.advance()
        self._loops.capture()
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        self._run.end_step(self._run.step + 1, _loss_of(outputs), grad_norm)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._run is not None:
            self._run.finish()
            self._run.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._run is not None:
            self._run.close(failing=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._run is not None:
            self._run.close(failing=True)

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
