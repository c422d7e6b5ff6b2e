"""What a run's snapshots hold: the tracked objects, and the placed model when the run is placed.

A placed model and its optimizer are snapshotted by whole-model parameter names (so another
plan's ranks each read their own stage), and every snapshot's manifest records the plan; the log
records the norm of every parameter of the whole model. Without a placement, the tracked objects
are snapshotted as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.hooks import RemovableHandle

from moai_ckpt import faults
from moai_ckpt.capture import PartialState
from moai_ckpt.sampler import GlobalSampler
from moai_ckpt.trackable import check_trackable
from replay.stepstate import parameters_of

if TYPE_CHECKING:
    from moai_ckpt.placement import RunPlacement

__all__ = ["Tracked"]


class Tracked:
    """The objects a run tracks, by name, and the placement they run under (if any)."""

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}
        self.placement: RunPlacement | None = None

    def add(self, objects: Mapping[str, Any]) -> None:
        """Track ``objects`` (all or none: each is checked first).

        Raises:
            NotResumableError: an object keeps state no snapshot can hold.
        """
        for key, obj in objects.items():
            check_trackable(key, obj)
        self.objects.update(objects)

    def snapshot_state(self) -> dict[str, Any]:
        """What a snapshot holds (a placed model and its optimizer as whole-model-named views)."""
        if self.placement is None:
            return dict(self.objects)
        return self.placement.snapshot_state(self.objects)

    def snapshot_info(self) -> dict[str, Any] | None:
        """What a snapshot's manifest records besides the state: the plan it was taken under."""
        return self.placement.info() if self.placement is not None else None

    def keep_restored(self, state: Mapping[str, Any]) -> None:
        """After a restore into ``state``: plain values (numbers, strings) replace the tracked ones."""
        for key, value in state.items():
            if key in self.objects and not isinstance(value, PartialState):
                self.objects[key] = value

    def parameters(self) -> tuple[list[str], list[torch.Tensor], list[bool]]:
        """The parameters whose norms the log records (the whole model's when placed)."""
        if self.placement is not None:
            placed = self.placement.placed
            key = next((k for k, v in self.objects.items() if v is placed.stage_module or v is placed.module), None)
            if key is not None:
                return self.placement.parameters(key)
        return parameters_of(self.objects)

    def share(self, indices: list[int], rank: int, world_size: int) -> list[int]:
        """This rank's part of a global batch (a placed run: its data-parallel replica's, every stage alike)."""
        if self.placement is not None:
            return GlobalSampler.split(indices, *self.placement.data_rank())
        return GlobalSampler.split(indices, rank, world_size)

    @property
    def plan_label(self) -> str | None:
        """What the log's placement records of the plan (None when not placed)."""
        return self.placement.label if self.placement is not None else None

    def fault_hooks(self) -> list[RemovableHandle]:
        """Fault points in the tracked modules' forward and backward and the optimizers' step (chaos testing)."""
        handles = []
        for obj in self.objects.values():
            if isinstance(obj, torch.nn.Module):
                handles.append(obj.register_forward_pre_hook(lambda *_: faults.point("forward")))
                handles.append(obj.register_full_backward_pre_hook(lambda *_: faults.point("backward")))
            elif isinstance(obj, torch.optim.Optimizer):
                handles.append(obj.register_step_pre_hook(lambda *_: faults.point("optimizer")))
        return handles
