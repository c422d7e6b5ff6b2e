"""Named fault points: where a test or the chaos harness can kill, stop or signal a real process.

A fault plan is a JSON list in the environment variable ``MOAI_CKPT_FAULTS``::

    [{"at": "log.write", "step": 6, "rank": 1, "action": "kill", "once": "/tmp/f1.fired"}]

``at`` names a point (`POINTS`); the fault fires the first time that point is reached while the
training step in progress is ``step`` or later, on ``rank`` (any rank when absent). ``once``
names a file created when the fault fires: a fault whose file exists never fires again, so a
relaunched job does not die at the same place forever (``{rank}`` in the name makes one file per
rank, so the fault fires once on every rank: all ranks at once). Actions: ``kill`` (SIGKILL), ``term``
(SIGTERM), ``stop`` (SIGSTOP: a hang), ``exit`` (``os._exit(17)``), ``raise`` (a RuntimeError),
``kill_node`` (SIGKILL of the launching torchrun agent and every process below it: a lost node).
``log.write`` with ``kill`` first writes half of the segment (a torn write), then dies.

With no plan in the environment every point is one dictionary lookup.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

ENV = "MOAI_CKPT_FAULTS"

POINTS = {
    "step.begin": "a step starts (before the user's code runs)",
    "forward": "the first forward call of a tracked module in a step",
    "backward": "the first backward pass through a tracked module in a step",
    "optimizer": "a tracked optimizer's step() is about to run",
    "step.end": "the user's step body returned (before the step is logged)",
    "snapshot.stage": "a snapshot's tensors are being copied to host memory",
    "snapshot.persist": "a snapshot's chunks are being written",
    "snapshot.commit": "every rank has written; the commit marker is about to be written",
    "log.write": "a log segment is being written (kill: half of it reaches storage)",
    "log.flush": "a log segment is written but not yet made durable",
}
ACTIONS = ("kill", "term", "stop", "exit", "raise", "kill_node")


class Fault(BaseModel):
    """One planned fault."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    at: str
    step: int = Field(default=0, ge=0)
    rank: int | None = None
    action: str = "kill"
    once: str | None = None

    def model_post_init(self, _: Any) -> None:
        if self.at not in POINTS:
            raise ValueError(f"unknown fault point {self.at!r}; known: {', '.join(POINTS)}")
        if self.action not in ACTIONS:
            raise ValueError(f"unknown fault action {self.action!r}; known: {', '.join(ACTIONS)}")


class _State:
    plan: list[Fault] | None = None
    loaded_from: str | None = None
    step = 0  # the training step in progress, set by the run


def _plan() -> list[Fault]:
    raw = os.environ.get(ENV)
    if raw != _State.loaded_from:
        _State.loaded_from = raw
        _State.plan = [Fault.model_validate(f) for f in json.loads(raw)] if raw else []
    return _State.plan or []


def active() -> bool:
    """Whether any fault is planned in this process."""
    return bool(os.environ.get(ENV)) and bool(_plan())


def set_step(step: int) -> None:
    """The training step in progress (faults name steps)."""
    _State.step = step


def current_step() -> int:
    return _State.step


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def due(point: str) -> Fault | None:
    """The fault planned at ``point`` now, claimed (its ``once`` file created), or None."""
    if not os.environ.get(ENV):
        return None
    for fault in _plan():
        if fault.at != point or _State.step < fault.step or (fault.rank is not None and fault.rank != _rank()):
            continue
        if fault.once is not None:
            try:  # "{rank}" in the path: a fault that fires once on every rank (all ranks at once)
                fd = os.open(fault.once.format(rank=_rank()), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.write(fd, json.dumps({"at": point, "step": _State.step, "rank": _rank(), "pid": os.getpid()}).encode())
            os.fsync(fd)
            os.close(fd)
        return fault
    return None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), deepest first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    stack = list(children.get(pid, []))
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children.get(p, []))
    return out[::-1]


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (stopped ones too); the caller may be among them."""
    below = descendants(pid)
    me = os.getpid()
    for p in [pid, *(p for p in below if p != me), *([me] if me in below else [])]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def fire(fault: Fault) -> None:
    """Carry out ``fault`` in this process."""
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action == "kill_node":
        kill_tree(os.getppid())  # the agent first, so it cannot react; then its workers, this one last
    elif fault.action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif fault.action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif fault.action == "exit":
        os._exit(17)
    else:
        raise RuntimeError(f"injected fault at {fault.at} (step {_State.step})")


def point(name: str) -> None:
    """Reach the fault point ``name``: fire the fault planned there, if any."""
    fault = due(name)
    if fault is not None:
        fire(fault)
