"""Hugging Face through moai-ckpt: ``Trainer.train()`` that resumes bitwise, and Accelerate state.

``pip install moai-ckpt[hf]``.

- `MoaiTrainerCallback`, a ``transformers.TrainerCallback``: snapshots, the step log and the
  replay check of `moai_ckpt.fault_tolerant` for ``Trainer.train()``, so a run killed mid-epoch
  resumes at its last completed step, bitwise, with the same data order.
- `save_state` / `load_state`: everything ``accelerator.save_state`` / ``load_state`` keep
  (prepared models, optimizers, schedulers, registered objects, every RNG), as one moai-ckpt
  snapshot, with nothing pickled; `register_state_hooks` makes ``accelerator.save_state(dir)``
  and ``accelerator.load_state(dir)`` go through them.

See docs/integrations.md.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.errors import MoaiCkptError
from moai_ckpt.integrations.data import ResumableDataset
from moai_ckpt.integrations.driver import integration_options, open_run
from moai_ckpt.run import Run, RunOptions
from replay.check import ReplayReport

log = logging.getLogger("moai_ckpt.integrations.hf")

__all__ = [
    "MoaiTrainerCallback",
    "ResumableDataset",
    "load_state",
    "register_state_hooks",
    "save_state",
]

STATE_DIR = "moai_ckpt"  # below an ``accelerator.save_state`` directory: the snapshot's run directory


# -- Trainer ------------------------------------------------------------------------------------


class _TrainerStateAdapter:
    """The ``TrainerState`` fields a resumed run continues from (global step, epoch, log history...)."""

    _LOCAL = ("is_local_process_zero", "is_world_process_zero")  # facts about this process, not the run
    # set from this call's TrainingArguments: a run restarted with a larger max_steps trains on
    _CONFIG = ("max_steps", "num_train_epochs", "logging_steps", "eval_steps", "save_steps", "train_batch_size")

    def __init__(self, state: TrainerState) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self.state)
        return {k: v for k, v in values.items() if k not in self._LOCAL}

    def load_state_dict(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if hasattr(self.state, key) and key not in self._LOCAL + self._CONFIG:
                setattr(self.state, key, value)


class _LossTap:
    """The loss of the current step, from the model's own ``.loss`` outputs, as the Trainer counts it.

    A model given ``num_items_in_batch`` divides each micro-batch's loss by the tokens of the whole
    step (on this process, or on every process with ``average_tokens_across_devices``, for which
    the Trainer multiplies it back by the process count): the step's loss is then the sum over
    micro-batches. Otherwise each micro-batch's loss is a mean and the step's is their mean.
    """

    def __init__(self, model: torch.nn.Module, scale: int) -> None:
        self.losses: list[torch.Tensor] = []
        self.normalized = False
        self.scale = scale  # the process count when tokens are averaged across processes, else 1
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if not module.training:
            return  # evaluation inside training
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            self.losses.append(loss.detach())
            self.normalized = kwargs.get("num_items_in_batch") is not None

    def take(self) -> torch.Tensor | float:
        losses, self.losses = self.losses, []
        if not losses:
            return 0.0  # the model computes no loss itself: parameters and gradients are still checked
        stacked = torch.stack(losses)
        return stacked.sum() * self.scale if self.normalized else stacked.mean()


class MoaiTrainerCallback(TrainerCallback):
    """Resume ``Trainer.train()`` at its last completed step, bitwise, after any crash.

    The callback snapshots the model, the optimizer, the LR scheduler, the ``TrainerState``, the
    data position and every RNG; logs every optimizer step after each snapshot; and when training
    starts again restores the newest snapshot and checks each re-run step against its log record.
    On the same number of processes every step must be bitwise equal (else
    `ReplayDivergenceError`); on another number, the drift is reported (`report`).

    The training data must come from `dataset` (its position is what training consumed, so a run
    resumes mid-epoch on the next global batch)::

        moai = MoaiTrainerCallback("runs/gpt", snapshot_every=100)
        args = TrainingArguments(..., per_device_train_batch_size=8, save_strategy="no")
        trainer = Trainer(model=model, args=args, train_dataset=moai.dataset(train, global_batch_size=8),
                          callbacks=[moai])
        trainer.train()

    ``global_batch_size`` is ``per_device_train_batch_size * gradient_accumulation_steps * processes``.
    Each step's logged loss is the Trainer's loss of the step, from the model's own ``.loss``
    outputs (a model that returns none logs 0.0; its parameters and gradients are still checked). Limits:
    ``dataloader_num_workers=0``; the dataset is a deterministic function of the index; a fp16
    ``GradScaler`` (held by Accelerate, out of a callback's reach) is not snapshotted: use bf16 or
    fp32; do not pass ``resume_from_checkpoint`` (the run resumes from its own directory).

    Args:
        url: the run directory (any fsspec URL).
        options: every option at once, as a `moai_ckpt.RunOptions` (then no other keyword argument).
        **kwargs: `RunOptions` fields (``snapshot_every`` counts optimizer steps; ``snapshot_every_s``,
            ``async_snapshots``, ``snapshot_at_end``, ``log_flush_every``, ``log_flush_seconds``,
            ``log_lag``... as in `moai_ckpt.fault_tolerant`), `Checkpointer` options and storage
            options; the exact state digests are off unless asked for
            (`moai_ckpt.integrations.driver.integration_options`).
    """

    def __init__(self, url: str, *, options: RunOptions | None = None, **kwargs: Any) -> None:
        self.url = url
        self._options = integration_options(url, options, **kwargs)  # validated now, not when training starts
        self._data: ResumableDataset[Any] | None = None
        self._run: Run | None = None
        self._tap: _LossTap | None = None
        self._grad_norm: torch.Tensor | None = None
        #: the step training resumed from (None: a new run)
        self.resumed_from: int | None = None

    def dataset(self, dataset: Any, global_batch_size: int, **options: Any) -> ResumableDataset[Any]:
        """The training dataset, read from the position this callback snapshots and advances.

        Args:
            dataset: an indexable dataset (a ``datasets.Dataset`` in torch format, a list of dicts...).
            global_batch_size: samples per optimizer step over all processes.
            **options: ``seed``, ``shuffle``, ``drop_last`` (see `ResumableDataset`).
        """
        self._data = ResumableDataset(dataset, global_batch_size, **options)
        self._data.driven = True
        return self._data

    @property
    def replaying(self) -> bool:
        """Whether the step in progress re-runs a logged step (a replay after a restart)."""
        return self._run is not None and self._run.replaying

    @property
    def report(self) -> ReplayReport | None:
        """What the replay after the last restart checked (None before training starts)."""
        return self._run.report if self._run is not None else None

    # -- Trainer events -------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        data = self._data
        if data is None:
            raise ValueError(
                "MoaiTrainerCallback needs the training data from train_dataset=callback.dataset(...), so that "
                "a resumed run continues on the next global batch"
            )
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        if per_step != data.position.global_batch_size:
            raise ValueError(
                f"per_device_train_batch_size x gradient_accumulation_steps x processes is {per_step}, but the "
                f"dataset's global_batch_size is {data.position.global_batch_size}: make them equal"
            )
        model, optimizer, scheduler = kwargs["model"], kwargs["optimizer"], kwargs["lr_scheduler"]
        tracked: dict[str, Any] = {
            "model": model,
            "optimizer": getattr(optimizer, "optimizer", optimizer),  # Accelerate's wrapper holds the real one
            "trainer_state": _TrainerStateAdapter(state),
            "data": data,
        }
        if scheduler is not None:
            tracked["scheduler"] = getattr(scheduler, "scheduler", scheduler)
        self._tap = _LossTap(model, args.world_size if getattr(args, "average_tokens_across_devices", False) else 1)
        self._run, self.resumed_from = open_run(self._options, tracked, next(model.parameters()).device)
        if 0 < state.max_steps <= state.global_step:
            # the Trainer would run one more step before it looks at max_steps
            self.close()
            raise ValueError(
                f"the run in {self.url} already finished: its snapshot is at step {state.global_step}, "
                f"max_steps is {state.max_steps}. Raise max_steps (or num_train_epochs) to train on"
            )

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        assert self._run is not None and self._data is not None
        self._run.begin_step(state.global_step + 1, self._data.global_batch())

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs["model"]
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self._grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        assert self._run is not None and self._data is not None and self._tap is not None
        self._data.advance()
        position = self._data.position
        # the epoch the data is in, as an uninterrupted run counts it (a resumed Trainer restarts its count)
        state.epoch = position.epoch + position.step_in_epoch / position.steps_per_epoch
        self._run.end_step(state.global_step, self._tap.take(), self._grad_norm)
        self._grad_norm = None

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._run is not None:
            self._run.finish()
            self.close()

    def close(self) -> None:
        """Release the run's threads and process groups (done by ``on_train_end``; call it after an
        exception if the process goes on: the Trainer has no event for that)."""
        if self._tap is not None:
            self._tap.handle.remove()
            self._tap = None
        if self._run is not None:
            self._run.close(failing=True)


# -- Accelerate ---------------------------------------------------------------------------------


def _accelerator_state(accelerator: Any) -> dict[str, Any]:
    """What ``accelerator.save_state`` keeps, by name, as live objects (the models unwrapped)."""
    state: dict[str, Any] = {}
    for i, model in enumerate(accelerator._models):
        state[f"model_{i}"] = accelerator.unwrap_model(model)
    for i, optimizer in enumerate(accelerator._optimizers):
        state[f"optimizer_{i}"] = getattr(optimizer, "optimizer", optimizer)
    for i, scheduler in enumerate(accelerator._schedulers):
        state[f"scheduler_{i}"] = getattr(scheduler, "scheduler", scheduler)
    for i, obj in enumerate(accelerator._custom_objects):
        state[f"custom_{i}"] = obj
    if accelerator.scaler is not None:
        state["scaler"] = accelerator.scaler
    state["accelerator"] = _StepCounter(accelerator)
    return state


class _StepCounter:
    """``accelerator.step`` (the gradient-accumulation counter), as state."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def state_dict(self) -> dict[str, Any]:
        return {"step": int(self.accelerator.step)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accelerator.step = int(state["step"])


def save_state(accelerator: Any, url: str, step: int | None = None, **options: Any) -> int:
    """Snapshot what ``accelerator.save_state`` would keep, with nothing pickled; returns the step.

    Prepared models (by their unwrapped names), optimizers, schedulers, the grad scaler, objects
    registered with ``accelerator.register_for_checkpointing`` (they need ``state_dict`` /
    ``load_state_dict``) and every RNG of every process. Collective: call it on every process.

    Args:
        accelerator: an ``accelerate.Accelerator`` that prepared the objects.
        url: the run directory (any fsspec URL).
        step: the snapshot's step (default: ``accelerator.step``); an existing one is replaced.
        **options: `Checkpointer` options and storage options.
    """
    step = int(accelerator.step) if step is None else step
    with Checkpointer(url, **options) as ckpt:
        ckpt.save(step, _accelerator_state(accelerator), overwrite=True)
    return step


def load_state(accelerator: Any, url: str, step: int | None = None, **options: Any) -> int:
    """Restore a `save_state` snapshot (the newest by default) into the accelerator's objects in place.

    Everything is read and checked before anything is loaded. Collective. Returns the step.

    Raises:
        SnapshotNotFoundError: no committed snapshot (at ``step``).
        StateMismatchError: the snapshot does not fit the prepared objects (names, shapes).
    """
    with Checkpointer(url, **options) as ckpt:
        return ckpt.restore(_accelerator_state(accelerator), step=step)


def register_state_hooks(accelerator: Any, **options: Any) -> tuple[Any, Any]:
    """Make ``accelerator.save_state(dir)`` and ``load_state(dir)`` go through moai-ckpt.

    ``save_state(dir)`` then writes the whole state as a snapshot in ``dir/moai_ckpt/`` (see
    `save_state`) and Accelerate writes no model weights; ``load_state(dir)`` restores that
    snapshot and Accelerate loads no model weights. Accelerate's hooks cannot take over the rest:
    it still writes (and on load reads, with ``torch.load``) its own optimizer, scheduler and RNG
    files beside the snapshot. For a round trip with nothing unpickled, call `load_state`
    (``load_state(accelerator, f"{dir}/moai_ckpt")``) instead of ``accelerator.load_state``.

    Returns:
        The two hook handles (``handle.remove()`` undoes each).
    """

    def on_save(models: list[torch.nn.Module], weights: list[Any], output_dir: str) -> None:
        save_state(accelerator, os.path.join(output_dir, STATE_DIR), **options)
        weights.clear()  # the snapshot holds them

    def on_load(models: list[torch.nn.Module], input_dir: str) -> None:
        url = os.path.join(input_dir, STATE_DIR)
        if not os.path.isdir(url):
            raise MoaiCkptError(f"{input_dir} holds no moai-ckpt snapshot (saved without the hooks?)", url=url)
        load_state(accelerator, url, **options)
        models.clear()  # loaded already

    save_hook: Callable[..., None] = on_save
    load_hook: Callable[..., None] = on_load
    return accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(load_hook)
