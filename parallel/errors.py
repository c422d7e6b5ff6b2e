"""Errors of the placement layer, rooted in `moai_ckpt.errors.MoaiCkptError`.

Each also inherits the builtin a caller would catch: a device declaration or a model the planner
cannot work with is a ``ValueError``; a plan that fits no device is a ``ValueError`` too (the
request cannot be met), and applying a plan to a job it was not made for is a ``RuntimeError``.
"""

from __future__ import annotations

from moai_ckpt.errors import MoaiCkptError


class PlacementError(MoaiCkptError):
    """Root of the errors the `parallel` package raises."""


class DeviceSpecError(PlacementError, ValueError):
    """A device declaration (``2xH100,1xA100``) names an unknown type or is malformed."""


class ProfileError(PlacementError, ValueError):
    """A model cannot be profiled: no layer sequence, or layers that do not chain."""


class NoFeasiblePlanError(PlacementError, ValueError):
    """No candidate plan fits the devices; the message names the closest one and why it failed."""


class PlanMismatchError(PlacementError, RuntimeError):
    """A plan is applied to a job it does not describe (world size, layers, devices)."""
