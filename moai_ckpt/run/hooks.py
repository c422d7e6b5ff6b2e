"""`RunView`: what the run's extensions (placement, op capture) may see of a `Run`.

`moai_ckpt.placement` plans a model's placement before the run starts and hands the result back
to `Run.place`; `moai_ckpt.opcapture` captures a step's op stream at its begin and end. Neither
reaches into the run's private state: they read what this protocol lists, and `Run` implements
it. Nothing here imports the run package, so the extensions sit below it in the import graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from moai_ckpt.distributed import World
from moai_ckpt.storage import Storage
from replay.log import Placement

__all__ = ["RunView"]


class RunView(Protocol):
    """The read-only face of a run that placement and op capture work with."""

    @property
    def rank(self) -> int:
        """This process's rank."""
        ...

    @property
    def world_size(self) -> int:
        """How many ranks the job has."""
        ...

    @property
    def device(self) -> torch.device:
        """Where this rank's model lives."""
        ...

    @property
    def world(self) -> World:
        """Collectives on the training thread (``broadcast_json``), every rank together."""
        ...

    @property
    def storage(self) -> Storage:
        """The run directory."""
        ...

    @property
    def url(self) -> str:
        """The run directory's URL."""
        ...

    @property
    def collective_timeout_s(self) -> float:
        """The bound on every collective."""
        ...

    @property
    def tracked(self) -> Mapping[str, Any]:
        """The objects snapshots hold, by name."""
        ...

    @property
    def replaying(self) -> bool:
        """Whether the step in progress re-runs a logged step."""
        ...

    @property
    def log_placement(self) -> Placement | None:
        """The placement the log records for the steps this run writes (None before it starts)."""
        ...

    @property
    def snapshot_mark(self) -> int:
        """A counter that moves whenever the run restores or takes a snapshot."""
        ...

    def restorable_steps(self) -> list[int]:
        """The committed snapshots the run may restore (a session bounds them by its target)."""
        ...
