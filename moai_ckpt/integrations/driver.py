"""A `moai_ckpt.Run` for a training loop that a framework drives (Lightning, the Hugging Face Trainer).

`moai_ckpt.fault_tolerant` owns its loop; Lightning and the Hugging Face ``Trainer`` own theirs and
call back at step boundaries. Their callbacks drive a `Run` through its external step API::

    run, resumed_from = open_run(options, tracked, device)  # collective: restore the newest usable snapshot
    for each step:
        run.begin_step(step, samples)       # RNG states, hyperparameters, global sample indices
        ...                                 # the framework runs the step
        run.end_step(step, loss, grad_norm) # logged, or checked against the log (a replay)
    run.finish()                            # last snapshot, replay report
    run.close()

A snapshot decided at the end of step S is taken when step S+1 begins (or at ``finish``): the
frameworks do work between steps (epoch ends, schedulers, their own callbacks, a new data
iterator that draws from the RNG), and the state a resumed run must continue from is the state
right before step S+1 starts, RNG included. For the same reason, after a restore the RNG states
of the snapshot are set again when the first step begins.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from moai_ckpt.run import Run, RunOptions

__all__ = ["integration_options", "open_run"]


def integration_options(url: str | None, options: RunOptions | None = None, **kwargs: Any) -> RunOptions:
    """The options of a framework's run: ``options``, or the callback's keyword arguments (validated now).

    Frameworks keep bookkeeping that a resumed run rebuilds differently from an uninterrupted one
    (with the digests on, a resumed Lightning fit diverges at ``state loops``, the fit loop's
    progress counters), so the exact digest of the whole state is not logged unless
    ``state_digests`` is set (an argument, or ``MOAI_CKPT_STATE_DIGESTS``); loss, grad norm,
    parameter norms, samples, RNG states and hyperparameters are checked as always.

    Raises:
        TypeError: both ``options`` and keyword options.
        pydantic.ValidationError: an option is out of range.
    """
    options = RunOptions.from_call("the callback", url, options, kwargs)
    if "state_digests" not in options.model_fields_set:
        options = options.model_copy(update={"state_digests": False})
    return options


def open_run(options: RunOptions, tracked: Mapping[str, Any], device: torch.device) -> tuple[Run, int | None]:
    """Join the run (collective): track ``tracked``, restore the newest usable snapshot into it.

    Args:
        options: the run's options.
        tracked: what a snapshot holds, by name: modules, optimizers, schedulers, objects with
            ``state_dict``/``load_state_dict``. Read again at every snapshot.
        device: where the model lives (recorded with the log's placement).

    Returns:
        The run, and the step it resumes after (None for a new run: its first `Run.begin_step`
        snapshots the state then, as the base of the log).
    """
    run = Run(options=options, device=device)
    try:
        run.track(**tracked)
        return run, run.start()
    except BaseException:
        run.close(failing=True)
        raise
