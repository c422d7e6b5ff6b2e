"""The errors of moai-ckpt's conversions to and from other checkpoint formats."""

from __future__ import annotations

from moai_ckpt.errors import MoaiCkptError


class InteropError(MoaiCkptError, ValueError):
    """A conversion cannot proceed: a missing entry, a dtype the target format lacks, a clash of names,
    or a destination that already holds files. Nothing is written, or what was written is not final."""


class UntrustedDataError(MoaiCkptError, PermissionError):
    """Reading this input would unpickle it, and the caller has not said it trusts the input."""
