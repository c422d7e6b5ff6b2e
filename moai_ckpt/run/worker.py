"""One process of a re-run training function: ``python -m moai_ckpt.run.worker FUNCTION [CALL_JSON]``.

The CLI's sessions under torchrun and the chaos harness start one of these per rank. Which
training function runs is the caller's decision (`moai_ckpt.entry`): the one the user names, or
the one ``run.json`` records when the user trusts it; never one storage names by itself.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from moai_ckpt.entry import CALL_ENV, load_function
from moai_ckpt.run.session import DEVICE_ENV

__all__ = ["call", "main"]


def call(function: str, args: list[Any] | None, kwargs: dict[str, Any] | None, *, recorded: bool = False) -> Any:
    """Call the training function ``function`` (``recorded``: as run.json names it) with these arguments."""
    fn = load_function(function, recorded=recorded)
    return fn(*(args or []), **(kwargs or {}))


def main() -> None:
    """One rank: join the process group torchrun describes, then call the function.

    ``CALL_JSON`` (``{"args": [...], "kwargs": {...}, "recorded": false}``) comes from the command
    line or, so that arguments never show in a process list, from ``$MOAI_CKPT_CALL``. The group
    is gloo on CPU and NCCL on CUDA, unless the training function initialises one itself.
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
    main()
