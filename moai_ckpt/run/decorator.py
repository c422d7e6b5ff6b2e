"""`fault_tolerant`: wrap a training function so a killed run resumes at its last completed step.

    @moai_ckpt.fault_tolerant(storage="runs/r7", snapshot_every=100)
    def train(run):
        model, opt = build()
        run.track(model=model, optim=opt)
        run.sampler(len(dataset), global_batch_size=256)
        for step in run.steps(10_000):
            indices = run.batch()                 # this rank's samples of the global batch
            loss = ...
            run.record(loss=loss)                 # the step's results (logged, or checked on replay)

On start, the run restores the newest committed snapshot S, then *replays* steps S+1..F from the
op-stream log (``run.replaying`` is True: skip side effects), checking every step against its
record, and continues live from F+1. Each completed step is logged by a background thread; with
the default policy its record is durable before the next step completes. Snapshots are taken
every ``snapshot_every`` steps and/or ``snapshot_every_s`` seconds (asynchronously by default).
SIGTERM/SIGINT take a snapshot and flush the log before exiting; a user exception flushes the log
and propagates.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

from moai_ckpt.entry import function_spec, record_call
from moai_ckpt.errors import ReplayDivergenceError
from moai_ckpt.events import EventHook
from moai_ckpt.opcapture import capture_divergence
from moai_ckpt.run.handle import Run
from moai_ckpt.run.options import RunOptions
from moai_ckpt.run.session import RestoreComplete

R = TypeVar("R")

__all__ = ["fault_tolerant"]


def fault_tolerant(
    storage: str | None = None,
    *,
    options: RunOptions | None = None,
    on_event: EventHook | Iterable[EventHook] | None = None,
    **kwargs: Any,
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Make a training function resumable at its last completed step (see the module docstring).

    The function is called as ``fn(run, *args, **kwargs)`` with a `Run`. Options come from
    ``options`` or from the keyword arguments, over ``MOAI_CKPT_*`` environment variables and a
    config file (`RunOptions`; docs/configuration.md), read when the decorator runs.

    Args:
        storage: the run directory (any fsspec URL). ``{name}`` fields are filled from the keyword
            arguments of the call (``storage="{run_dir}"`` with ``train(run_dir="runs/7")``).
        options: every option at once, as a `RunOptions` (then no other keyword argument).
        on_event: a hook (or several) called with each `moai_ckpt.events.Event` of the run
            (snapshots, the restore, the replay, log flushes); see docs/observability.md.
        **kwargs: `RunOptions` fields, among them:

            - ``snapshot_every``: steps between snapshots (None: only ``snapshot_every_s``);
            - ``snapshot_every_s``: also snapshot once this many seconds have passed since the
              last one (rank 0's clock decides, so every rank snapshots at the same step);
            - ``async_snapshots``: take snapshots with `Checkpointer.save_async`;
            - ``log_flush_every``: log records per durable segment (1: a segment per step);
            - ``log_flush_seconds``: with ``log_flush_every > 1``, a group is never older than this;
            - ``log_sync``: make each step's record durable before the next step starts;
            - ``log_lag``: otherwise, a step's record is durable before the ``log_lag``-th step
              after it completes (default 1: before the next step completes), so logging
              overlaps training; a crash re-runs at most ``log_lag`` completed steps, bitwise the same;
            - ``snapshot_at_end``: snapshot the last step when the loop of `Run.steps` finishes;
            - ``state_digests``: log an exact digest of the whole tracked state every step;
            - ``deterministic``: ``torch.use_deterministic_algorithms(True)`` and the environment it needs;
            - ``capture_ops``: when to capture a step's aten op stream: ``"never"``,
              ``"on_divergence"`` (a replay that diverges re-runs its step under capture) or
              ``"after_snapshot"`` (also the first step after each snapshot); see
              `moai_ckpt.opcapture` and docs/ops.md;
            - ``record_args``: the names of the arguments ``run.json`` records, as an allow-list
              (their values as given). By default every JSON-able argument is recorded except
              those whose name looks secret (``api_key``, ``hf_token``, ``password``...), which
              are recorded as "not recorded" markers; ``sys.argv`` is never recorded. See
              docs/security.md.

            and `Checkpointer` options (``persist="process"``: the background writes of
            ``async_snapshots`` run in a writer process, started at `Run.track`; see
            `Checkpointer.save_async`) and storage options.

    Raises:
        pydantic.ValidationError: an option is out of range (a ``ValueError`` naming it).
        TypeError: ``record_args`` is not a collection of names, or both ``options`` and keywords.
    """
    chosen = RunOptions.from_call("fault_tolerant", storage, options, kwargs)

    def wrap(fn: Callable[..., R]) -> Callable[..., R]:
        return _wrap(chosen, fn, on_event)

    return wrap


def _wrap(
    options: RunOptions, fn: Callable[..., R], on_event: EventHook | Iterable[EventHook] | None = None
) -> Callable[..., R]:
    @functools.wraps(fn)
    def runner(*args: Any, **kwargs: Any) -> R:
        if options.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        run = Run(_storage_url(options.storage, kwargs), options=options, on_event=on_event)
        run.entry = record_call(fn, args, kwargs, options.record_args)
        try:
            result = fn(run, *args, **kwargs)
        except RestoreComplete as done:
            run.close()
            return done.report
        except ReplayDivergenceError as exc:
            if options.capture_ops != "never" and exc.check is not None:
                # the capture re-runs this process's own function and call, never run.json's
                label = capture_divergence(run, exc.check.step, function_spec(fn), args, kwargs)
                if label is not None and hasattr(exc, "add_note"):
                    exc.add_note(f"op capture of the diverged step: {label} (moai-ckpt diff-ops)")
            run.close(failing=True)
            raise
        except BaseException:
            run.close(failing=True)
            raise
        run.close()
        return result

    runner.__wrapped_storage__ = options.storage  # type: ignore[attr-defined]
    return runner


def _storage_url(storage: str, kwargs: dict[str, Any]) -> str:
    """``storage`` with its ``{name}`` fields filled from the call's keyword arguments."""
    try:
        return storage.format(**kwargs) if "{" in storage else storage
    except (KeyError, IndexError) as exc:
        raise TypeError(f"fault_tolerant(storage={storage!r}) needs the keyword argument {exc} in the call") from None
