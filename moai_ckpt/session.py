"""How a `fault_tolerant` training function is being run: live, or by ``moai-ckpt restore|replay``.

The CLI re-runs a user's training function to replay its log. It says what it wants through the
environment variable ``MOAI_CKPT_SESSION`` (JSON, validated here), so the same mechanism works in
one process and in every rank that torchrun starts. The training function is named in the run's
``run.json`` (`entry_of` records it) or by ``--entrypoint``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moai_ckpt.errors import MoaiCkptError

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


class EntrypointError(MoaiCkptError, ValueError):
    """The training function to re-run cannot be found or called."""


def entry_of(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """What ``run.json`` records so ``moai-ckpt restore`` can call ``fn`` again."""
    module = fn.__module__
    if module == "__main__":
        main_file = getattr(sys.modules["__main__"], "__file__", None)
        function = f"{os.path.abspath(main_file)}:{fn.__qualname__}" if main_file else None
    else:
        function = f"{module}:{fn.__qualname__}"
    try:
        call = json.loads(json.dumps({"args": list(args), "kwargs": kwargs}))
    except (TypeError, ValueError):
        call = None  # arguments that are not JSON-able cannot be recorded
    return {
        "function": function,
        "args": call["args"] if call else None,
        "kwargs": call["kwargs"] if call else None,
        "cwd": os.getcwd(),
        "argv": list(sys.argv),
    }


def load_function(spec: str) -> Callable[..., Any]:
    """``package.module:function`` or ``path/to/file.py:function`` -> the function.

    A file is loaded under a module name of its own, so its ``__main__`` block does not run.
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise EntrypointError(f"entrypoint {spec!r} is not 'module:function' or 'file.py:function'")
    if target.endswith(".py"):
        if not os.path.exists(target):
            raise EntrypointError(f"entrypoint file {target} does not exist")
        module_name = "_moai_entry_" + os.path.splitext(os.path.basename(target))[0]
        loader = importlib.util.spec_from_file_location(module_name, target)
        if loader is None or loader.loader is None:
            raise EntrypointError(f"cannot load {target}")
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
        loader.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise EntrypointError(f"cannot import {target!r} for entrypoint {spec!r}: {exc}") from exc
    fn: Any = module
    for part in name.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise EntrypointError(f"{target!r} has no {name!r}")
    if not callable(fn):
        raise EntrypointError(f"entrypoint {spec!r} is not callable")
    return fn


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


def call(function: str, args: list[Any] | None, kwargs: dict[str, Any] | None) -> Any:
    """Call the training function named ``function`` as the run recorded it."""
    fn = load_function(function)
    return fn(*(args or []), **(kwargs or {}))


def _worker() -> None:
    """``python -m moai_ckpt.session FUNCTION CALL_JSON``: one rank of a restore under torchrun.

    Joins the process group torchrun describes (gloo on CPU, NCCL on CUDA) unless the training
    function does so itself, then calls it.
    """
    import torch
    import torch.distributed as dist

    function, raw = sys.argv[1], sys.argv[2]
    recorded = json.loads(raw)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = os.environ.get(DEVICE_ENV) != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        dist.barrier()
    try:
        call(function, recorded.get("args"), recorded.get("kwargs"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    _worker()
