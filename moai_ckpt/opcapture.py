"""A run's op capture: which steps it captures, and capturing one (see `replay.ops`).

Policies (``fault_tolerant(capture_ops=...)``):

- ``"never"``: no capture, not even on a divergence;
- ``"on_divergence"`` (default): nothing in steady state; when a replay after a restart diverges
  from the log, the diverged step is re-run under capture (``moai-ckpt capture``, on this device,
  with this process's own training function) before the error propagates;
- ``"after_snapshot"``: also the first step after each snapshot (the step a restart replays first).

``run.capture_ops(step)`` asks for any step. With no step to capture the run holds no hooks
object at all: a step pays one ``is not None`` check.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from moai_ckpt.entry import CALL_ENV
from moai_ckpt.errors import MoaiCkptError, redact_url
from replay.ops import OpRecorder
from replay.opstore import new_label, write_capture

if TYPE_CHECKING:
    from moai_ckpt.run.hooks import RunView

log = logging.getLogger("moai_ckpt.ops")
SOURCE_ENV = "MOAI_CKPT_CAPTURE_SOURCE"  # what a capture session's label says it was for


class OpCaptureHooks:
    """The steps a run captures and the capture in progress (held only while there is work)."""

    def __init__(self, *, after_snapshot: bool = False, steps: Iterable[int] = (), source: str = "live") -> None:
        self.after_snapshot = after_snapshot
        self.requested: set[int] = set(steps)
        self.source = source
        self.labels: dict[int, str] = {}  # step -> label of the capture written
        self._seen_snapshot: int | None = None
        self._recorder: OpRecorder | None = None
        self._handles: list[Any] = []

    def request(self, step: int) -> None:
        self.requested.add(step)

    def begin(self, run: RunView, step: int) -> None:
        """Start capturing if ``step`` is due (called at the end of the run's step start)."""
        snapshot_mark = run.snapshot_mark  # moves whenever the run restores or takes a snapshot
        due = step in self.requested or (self.after_snapshot and snapshot_mark != self._seen_snapshot)
        self._seen_snapshot = snapshot_mark
        if not due:
            return
        self.requested.discard(step)
        recorder = OpRecorder(step, run.tracked, rank=run.rank)
        for obj in run.tracked.values():
            if isinstance(obj, torch.optim.Optimizer):
                self._handles.append(obj.register_step_pre_hook(lambda *_: recorder.set_phase("optimizer")))
                self._handles.append(obj.register_step_post_hook(lambda *_: recorder.set_phase("after optimizer")))
        recorder.__enter__()
        self._recorder = recorder

    def end(self, run: RunView, step: int, loss: Any, grad_norm: Any) -> None:
        """Stop the capture of ``step`` and store it (called first thing at the run's step end)."""
        recorder = self._recorder
        if recorder is None:
            return
        self._release()
        stream = recorder.finish(
            results={"loss": loss, "grad_norm": grad_norm},
            world_size=run.world_size,
            meta={"replaying": run.replaying, "source": self.source},
        )
        label = new_label("replay" if run.replaying and self.source == "live" else self.source)
        if run.world_size > 1:
            label = run.world.broadcast_json(label, "naming the op capture")
        placement = run.log_placement
        assert placement is not None  # a step ends only after the run opened its log
        index = write_capture(run.storage, stream, label, placement)
        self.labels[step] = label
        log.info(
            "captured the op stream of step %d: %d ops, %d values (%s); %.2f s",
            step,
            index.ops,
            index.values,
            label,
            stream.meta["capture_s"],
        )

    def _release(self) -> None:
        recorder, self._recorder = self._recorder, None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if recorder is not None:
            recorder.__exit__(None, None, None)

    def abandon(self) -> None:
        """Leave a capture the step never finished (an exception): nothing is written."""
        self._release()

    @property
    def idle(self) -> bool:
        return self._recorder is None and not self.requested and not self.after_snapshot


def hooks_for(policy: str, session_steps: Iterable[int] = ()) -> OpCaptureHooks | None:
    """The hooks a new run needs, or None when it captures nothing step by step."""
    steps = list(session_steps)
    if policy != "after_snapshot" and not steps:
        return None
    source = os.environ.get(SOURCE_ENV, "session") if steps else "live"
    return OpCaptureHooks(after_snapshot=policy == "after_snapshot" and not steps, steps=steps, source=source)


def capture_divergence(
    run: RunView,
    step: int,
    function: str | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout_s: float = 3600.0,
) -> str | None:
    """Re-run ``step`` of a diverged run under capture, in a process of its own (``moai-ckpt capture``).

    The process re-runs this process's own training function (``function``, with the same
    arguments, handed over in the environment so they show in no process list and reach no
    storage), never the one ``run.json`` names: storage is untrusted. Only a single-process run
    does it; several ranks print the command instead. Never raises: the divergence is the error
    the caller reports. Returns the label of the new capture, if any.
    """
    if function is None:
        log.warning("cannot capture the diverged step %d: the training function has no importable name", step)
        return None
    try:
        call = json.dumps({"args": list(args), "kwargs": kwargs}, allow_nan=False)
    except (TypeError, ValueError) as exc:
        log.warning("cannot capture the diverged step %d: its arguments are not JSON (%s)", step, exc)
        return None
    command = [sys.executable, "-m", "moai_ckpt.cli", "capture", run.url, "--step", str(step)]
    command += ["--device", run.device.type, "--source", "divergence", "--entrypoint", function]
    shown = redact_url(" ".join(command))
    if run.world_size > 1:
        if run.rank == 0:
            log.warning(
                "to see the first divergent op, run: %s --world-size %d (and this run's arguments with --kwarg)",
                shown,
                run.world_size,
            )
        return None
    log.warning("replay diverged at step %d: re-running it under op capture (%s)", step, shown)
    env = {k: v for k, v in os.environ.items() if k not in ("MOAI_CKPT_SESSION", "MOAI_CKPT_FAULTS")}
    env[CALL_ENV] = call
    try:
        done = subprocess.run([*command, "--call-from-env"], env=env, timeout=timeout_s, capture_output=True, text=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("the op capture of step %d failed: %s", step, redact_url(str(exc)))
        return None
    sys.stderr.write(done.stdout[-6000:])
    if done.returncode != 0:
        log.warning("the op capture of step %d failed (exit %d): %s", step, done.returncode, done.stderr[-2000:])
        return None
    from replay.opstore import latest_label

    try:
        return latest_label(run.storage, step)
    except MoaiCkptError:
        return None
