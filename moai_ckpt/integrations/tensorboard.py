"""Event hooks for scalar loggers: TensorBoard's ``SummaryWriter`` and anything with a W&B-style ``log``.

Add one with `moai_ckpt.events.add_hook` or pass it as ``on_event=``::

    from torch.utils.tensorboard import SummaryWriter
    from moai_ckpt.integrations.tensorboard import TensorBoardEvents

    moai_ckpt.events.add_hook(TensorBoardEvents(SummaryWriter("tb/run-7")))

Each event becomes the scalars ``moai_ckpt/<kind>/<field>`` (``duration_s``, ``stall_s``,
``bytes``, ``ok``, and ``persist_s``, ``steps``, ``gb_per_s`` where they apply) at the event's
step. Neither class imports TensorBoard or wandb: they take the writer or the run you made.
"""

from __future__ import annotations

from typing import Any, Protocol

from moai_ckpt.events import Event

__all__ = ["MetricsEvents", "ScalarWriter", "StepLogger", "TensorBoardEvents", "scalars_of"]


class ScalarWriter(Protocol):
    """What `TensorBoardEvents` needs of a ``SummaryWriter``."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> Any: ...


class StepLogger(Protocol):
    """What `MetricsEvents` needs of a W&B-style run: ``log(dict, step=...)``."""

    def log(self, data: dict[str, Any], step: int | None = None) -> Any: ...


def scalars_of(event: Event, prefix: str = "moai_ckpt") -> dict[str, float]:
    """``{"moai_ckpt/<kind>/<field>": value}`` for each numeric field of ``event``."""
    return {f"{prefix}/{event.kind}/{name}": value for name, value in event.scalars().items()}


class TensorBoardEvents:
    """An event hook writing each event's scalars to a TensorBoard ``SummaryWriter``.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or anything with ``add_scalar``).
        prefix: the first part of every tag.
        flush: flush the writer after each event (events are rare: a snapshot, a restore).
    """

    def __init__(self, writer: ScalarWriter, prefix: str = "moai_ckpt", *, flush: bool = True) -> None:
        self.writer = writer
        self.prefix = prefix
        self.flush = flush

    def __call__(self, event: Event) -> None:
        for tag, value in scalars_of(event, self.prefix).items():
            self.writer.add_scalar(tag, value, global_step=event.step)
        if self.flush and hasattr(self.writer, "flush"):
            self.writer.flush()


class MetricsEvents:
    """An event hook for W&B-style loggers: calls ``logger.log({tag: value, ...}, step=event.step)``.

    Args:
        logger: a ``wandb`` run, or anything with ``log(dict, step=)``.
        prefix: the first part of every key.
        with_step: pass ``step=`` (turn off for loggers whose step must only grow: W&B drops a
            logged step older than its last, and a replay's events are of older steps).
    """

    def __init__(self, logger: StepLogger, prefix: str = "moai_ckpt", *, with_step: bool = True) -> None:
        self.logger = logger
        self.prefix = prefix
        self.with_step = with_step

    def __call__(self, event: Event) -> None:
        data = scalars_of(event, self.prefix)
        if self.with_step:
            self.logger.log(data, step=event.step)
        else:
            self.logger.log({**data, f"{self.prefix}/{event.kind}/step": float(event.step)})
