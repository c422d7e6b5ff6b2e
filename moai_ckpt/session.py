"""How a `fault_tolerant` training function is being run: live, or by ``moai-ckpt restore|replay``.

The CLI re-runs a user's training function to replay its log. It says what it wants through the
environment variable ``MOAI_CKPT_SESSION`` (JSON, validated here), so the same mechanism works in
one process and in every rank that torchrun starts. Which training function runs is the CLI's
decision (`moai_ckpt.entry`): the one the user names, or the one ``run.json`` records when the
user trusts it; never one storage names by itself.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moai_ckpt.entry import CALL_ENV, load_function
from moai_ckpt.entry import EntrypointError as EntrypointError  # where callers found it before

ENV = "MOAI_CKPT_SESSION"
DEVICE_ENV = "MOAI_CKPT_DEVICE"


class Session(BaseModel):
    """What the CLI asks of a training function it re-runs.

    ``restore``: replay up to ``step`` (default: the last logged step) and commit the state there
    as a snapshot (in ``to`` if given), then stop. ``verify``: replay and compare every step with
    its record without stopping at a mismatch, write nothing, then stop.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["restore", "verify"]
    storage: str
    step: int | None = Field(default=None, ge=0)
    to: str | None = None
    report: str | None = Field(default=None, description="local path for rank 0's JSON report")
    progress: bool = False
    capture_ops: list[int] = Field(default_factory=list, description="steps to capture the op stream of")

    @classmethod
    def from_env(cls) -> Session | None:
        raw = os.environ.get(ENV)
        return cls.model_validate_json(raw) if raw else None

    def to_env(self) -> dict[str, str]:
        return {ENV: self.model_dump_json()}


class RestoreComplete(BaseException):
    """Raised out of the training loop once a restore or verify session is done.

    A BaseException so that the user's ``except Exception`` blocks let it through.
    """

    def __init__(self, report: Any) -> None:
        super().__init__("restore session complete")
        self.report = report


_progress: Callable[[int, int], None] | None = None


def on_progress(hook: Callable[[int, int], None] | None) -> None:
    """Call ``hook(step, target)`` after each step a session replays in this process."""
    global _progress
    _progress = hook


def report_progress(step: int, target: int, rank: int) -> None:
    if _progress is not None:
        _progress(step, target)
    elif rank == 0:
        print(f"moai-ckpt: replayed step {step} of {target}", file=sys.stderr, flush=True)


def call(function: str, args: list[Any] | None, kwargs: dict[str, Any] | None, *, recorded: bool = False) -> Any:
    """Call the training function ``function`` (``recorded``: as run.json names it) with these arguments."""
    fn = load_function(function, recorded=recorded)
    return fn(*(args or []), **(kwargs or {}))


def _worker() -> None:
    """``python -m moai_ckpt.session FUNCTION [CALL_JSON]``: one rank of a restore under torchrun.

    ``CALL_JSON`` (``{"args": [...], "kwargs": {...}, "recorded": false}``) comes from the command
    line or, so that arguments never show in a process list, from ``$MOAI_CKPT_CALL``. Joins the
    process group torchrun describes (gloo on CPU, NCCL on CUDA) unless the training function
    does so itself, then calls it.
    """
    import torch
    import torch.distributed as dist

    function = sys.argv[1]
    given = json.loads(sys.argv[2] if len(sys.argv) > 2 else os.environ.get(CALL_ENV, "{}"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = os.environ.get(DEVICE_ENV) != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        dist.barrier()
    try:
        call(function, given.get("args"), given.get("kwargs"), recorded=bool(given.get("recorded")))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    _worker()
