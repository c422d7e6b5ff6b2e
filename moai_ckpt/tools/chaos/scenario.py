"""Chaos scenarios: which training job to run, on how many ranks, and which faults to inject.

A scenario is a file (YAML-free: JSON) validated by `Scenario`, or one of the built-ins
(`BUILTIN`). Faults may leave their step, rank and phase open: `Scenario.draw` fixes them from
the seed, so a trial is reproducible from (scenario, seed) alone.

    {"name": "mine", "entrypoint": "mypkg.train:train", "kwargs": {"steps": 80},
     "ranks": 2, "faults": [{"kind": "kill"}, {"kind": "corrupt_chunk", "step": 30}]}
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Phase = Literal[
    "forward",
    "backward",
    "optimizer",
    "step.end",
    "snapshot.stage",
    "snapshot.persist",
    "snapshot.commit",
    "log.write",
    "log.flush",
]
PHASES: tuple[str, ...] = Phase.__args__  # type: ignore[attr-defined]
RANK_0_PHASES = ("snapshot.commit", "log.write", "log.flush")  # the coordinator's work alone
Kind = Literal[
    "kill",  # SIGKILL one rank at a step and phase
    "kill_all",  # SIGKILL every rank at once
    "hang",  # SIGSTOP one rank: the harness must notice the run stalled, and restart it
    "storage_transient",  # storage calls fail transiently at a rate (retried)
    "storage_latency",  # every storage call is slow
    "storage_outage",  # every storage call fails for a while
    "storage_torn",  # writes report success but keep only a prefix, at a rate
    "corrupt_chunk",  # a bit flipped at rest in a chunk of the newest snapshot
    "corrupt_log",  # a bit flipped at rest in a record of the newest log
    "corrupt_marker",  # a bit flipped at rest in the newest commit marker
    "resize",  # restart on another number of ranks
    "node_loss",  # SIGKILL one torchrun agent and its ranks (scenarios with nodes >= 2)
    "device_change",  # restart on another device type (cpu or cuda)
    "handoff",  # stop, and continue on another machine (same command, same --out)
]
KINDS: tuple[str, ...] = Kind.__args__  # type: ignore[attr-defined]
PROCESS_KINDS = frozenset({"kill", "kill_all", "hang", "node_loss"})
STORAGE_KINDS = frozenset({"storage_transient", "storage_latency", "storage_outage", "storage_torn"})
AT_REST_KINDS = frozenset({"corrupt_chunk", "corrupt_log", "corrupt_marker", "resize", "device_change", "handoff"})
PLACEMENT_KINDS = frozenset({"resize", "device_change", "handoff"})  # the run may end elsewhere: tolerance
DEMO_ENTRYPOINT = "moai_ckpt.tools.gpt:train"  # the demo's GPT, shipped in the package


class Fault(BaseModel):
    """One fault. Unset fields are drawn from the trial's seed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Kind
    step: int | None = Field(default=None, ge=1, description="the training step it strikes at")
    rank: int | None = Field(default=None, ge=0, description="the rank it strikes (kill, hang)")
    phase: Phase | None = Field(default=None, description="where in the step (kill, kill_all, hang)")
    rate: float = Field(default=0.02, gt=0, le=1, description="storage_transient / storage_torn: share of calls")
    seconds: float = Field(default=1.0, gt=0, le=120, description="storage_outage: how long")
    latency_s: float = Field(default=0.002, gt=0, le=5, description="storage_latency: added to every call")
    world_size: int | None = Field(default=None, ge=1, description="resize: the new number of ranks")
    device: Literal["cpu", "cuda"] | None = Field(default=None, description="device_change: the new device type")

    def describe(self) -> str:
        where = []
        if self.rank is not None and self.kind in ("kill", "hang", "node_loss"):
            where.append(f"rank {self.rank}'s node" if self.kind == "node_loss" else f"rank {self.rank}")
        if self.phase is not None and self.kind in PROCESS_KINDS:
            where.append(self.phase)
        if self.step is not None and self.kind not in STORAGE_KINDS:
            where.append(f"step {self.step}")
        if self.kind in ("storage_transient", "storage_torn"):
            where.append(f"{self.rate:.0%} of calls")
        if self.kind == "storage_outage":
            where.append(f"{self.seconds:g} s")
        if self.kind == "storage_latency":
            where.append(f"+{self.latency_s * 1e3:g} ms a call")
        if self.kind == "resize":
            where.append(f"to {self.world_size} ranks")
        if self.kind == "device_change":
            where.append(f"to {self.device}")
        return f"{self.kind} ({', '.join(where)})" if where else self.kind


class Scenario(BaseModel):
    """A training job and the faults to inject into it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "custom"
    description: str = ""
    entrypoint: str = Field(
        default=DEMO_ENTRYPOINT, description="a fault_tolerant function: module:function or file.py:function"
    )
    kwargs: dict[str, Any] = Field(
        default_factory=lambda: {"steps": 40, "batch_size": 16},
        description="its JSON keyword arguments; the run directory goes into `storage_kwarg`",
    )
    storage_kwarg: str = "storage"
    steps: int = Field(default=40, ge=2, description="the steps the job trains (kwargs['steps'] when it has one)")
    ranks: int = Field(default=2, ge=1, le=16)
    nodes: int = Field(default=1, ge=1, le=8, description="torchrun agents on this host, ranks split evenly")
    faults: list[Fault] = Field(default_factory=list)
    snapshot_every: int = Field(default=10, ge=1, description="for the demo entrypoint (GPT_DEMO_SNAPSHOT_EVERY)")
    hang_timeout_s: float = Field(default=25.0, gt=0, description="no new log record for this long: a stall")
    run_timeout_s: float = Field(default=900.0, gt=0)
    max_restarts: int = Field(default=8, ge=0)
    tolerance: float = Field(default=0.05, gt=0, description="relative difference allowed on another placement")
    env: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        steps = self.kwargs.get("steps", self.steps)
        if steps != self.steps and "steps" in self.kwargs:
            object.__setattr__(self, "steps", int(steps))
        if self.ranks % self.nodes:
            raise ValueError(f"{self.ranks} ranks do not split evenly over {self.nodes} nodes")
        for fault in self.faults:
            if fault.kind == "node_loss" and self.nodes < 2:
                raise ValueError("a node_loss fault needs a scenario with nodes >= 2 (one torchrun agent per node)")
            if fault.kind == "device_change" and fault.device is None:
                raise ValueError("a device_change fault names its device: cpu or cuda")
            if fault.step is not None and fault.step >= self.steps:
                raise ValueError(f"fault {fault.describe()} strikes at or after the last step ({self.steps})")
            if fault.rank is not None and fault.rank >= self.ranks:
                raise ValueError(f"fault {fault.describe()} names rank {fault.rank} of {self.ranks}")
        return self

    @classmethod
    def load(cls, name_or_path: str) -> Scenario:
        """A built-in scenario by name, or a scenario file (JSON)."""
        if name_or_path in BUILTIN:
            return BUILTIN[name_or_path]
        path = Path(name_or_path)
        if not path.exists():
            raise ValueError(f"no scenario {name_or_path!r}: not a file, nor one of {', '.join(BUILTIN)}")
        return cls.model_validate_json(path.read_text())

    def draw(self, seed: int) -> list[Fault]:
        """Every fault with its step, rank and phase fixed, in the order they strike."""
        rng = random.Random(f"{self.name}/{seed}")
        drawn = []
        for fault in self.faults:
            update: dict[str, Any] = {}
            if fault.step is None:
                update["step"] = rng.randint(2, self.steps - 2)
            if fault.kind in ("kill", "hang", "node_loss") and fault.rank is None:
                update["rank"] = rng.randrange(self.ranks)
            if fault.kind in PROCESS_KINDS and fault.phase is None:
                phases = PHASES if fault.kind != "hang" else ("forward", "backward", "optimizer")
                update["phase"] = rng.choice(phases)
            if fault.kind == "kill" and update.get("phase", fault.phase) in RANK_0_PHASES:
                update["rank"] = 0  # rank 0 alone writes the log and commits: a kill there must strike it
            if fault.kind == "resize" and fault.world_size is None:
                update["world_size"] = max(1, self.ranks - 1)
            drawn.append(fault.model_copy(update=update))
        return sorted(drawn, key=lambda f: (f.step or 0, KINDS.index(f.kind)))

    def with_random_faults(self, count: int, seed: int, kinds: tuple[str, ...] | None = None) -> Scenario:
        """A copy with ``count`` faults of kinds drawn from the seed (for many-trial runs)."""
        rng = random.Random(f"random/{seed}")
        pool = kinds or ("kill", "kill", "kill_all", "corrupt_chunk", "corrupt_log", "corrupt_marker", "storage_torn")
        faults = [Fault(kind=rng.choice(pool)) for _ in range(count)]  # type: ignore[arg-type]
        return self.model_copy(update={"faults": faults, "name": f"{self.name}-random{count}"})


def _builtin(name: str, description: str, faults: list[dict[str, Any]], **fields: Any) -> Scenario:
    return Scenario(name=name, description=description, faults=[Fault(**f) for f in faults], **fields)


BUILTIN: dict[str, Scenario] = {
    s.name: s
    for s in [
        _builtin(
            "smoke",
            "a few faults of different kinds on 2 ranks: a kill, all ranks killed, a flipped chunk, flaky storage",
            [
                {"kind": "kill"},
                {"kind": "kill_all", "phase": "optimizer"},
                {"kind": "corrupt_chunk"},
                {"kind": "storage_transient", "rate": 0.02},
            ],
        ),
        _builtin(
            "kills",
            "SIGKILL of a random rank in a random phase, three times, then all ranks at once",
            [{"kind": "kill"}, {"kind": "kill"}, {"kind": "kill"}, {"kind": "kill_all"}],
            steps=60,
            kwargs={"steps": 60, "batch_size": 16},
        ),
        _builtin(
            "storage",
            "flaky, slow, briefly unavailable and lying storage",
            [
                {"kind": "storage_transient", "rate": 0.03},
                {"kind": "storage_latency", "latency_s": 0.002},
                {"kind": "storage_outage", "seconds": 1.0},
                {"kind": "storage_torn", "rate": 0.01},
                {"kind": "kill"},
            ],
        ),
        _builtin(
            "at-rest",
            "bit flips at rest in a chunk, a log record and a commit marker, each found after a restart",
            [{"kind": "corrupt_chunk"}, {"kind": "corrupt_log"}, {"kind": "corrupt_marker"}],
            steps=60,
            kwargs={"steps": 60, "batch_size": 16},
        ),
        _builtin("hang", "one rank stops (SIGSTOP); the stall is noticed and the job restarted", [{"kind": "hang"}]),
        _builtin(
            "resize", "a restart on one rank fewer: same data, same step count, drift reported", [{"kind": "resize"}]
        ),
        _builtin(
            "node-loss",
            "two torchrun agents on this host, one rank each; one agent dies with its rank (a lost node)",
            [{"kind": "node_loss"}],
            nodes=2,
        ),
        _builtin(
            "gpu-to-cpu",
            "start on CUDA (NCCL), restart on CPU (gloo) after a stop: drift against the reference reported",
            [{"kind": "device_change", "device": "cpu"}],
            env={"MOAI_CKPT_DEVICE": "cuda"},
        ),
        _builtin(
            "cpu-to-gpu",
            "start on CPU (gloo), restart on CUDA (NCCL) after a stop: drift against the reference reported",
            [{"kind": "device_change", "device": "cuda"}],
            env={"MOAI_CKPT_DEVICE": "cpu"},
        ),
        _builtin(
            "handoff",
            "stop after a step and continue on another machine (e.g. H100 -> H200): run the same command "
            "with the same --out there",
            [{"kind": "handoff"}],
        ),
        _builtin(
            "full",
            "every fault kind this machine can produce, one after another",
            [
                {"kind": "kill"},
                {"kind": "kill_all"},
                {"kind": "hang"},
                {"kind": "corrupt_chunk"},
                {"kind": "corrupt_log"},
                {"kind": "corrupt_marker"},
                {"kind": "storage_transient", "rate": 0.02},
                {"kind": "storage_torn", "rate": 0.005},
                {"kind": "resize"},
            ],
            steps=100,
            kwargs={"steps": 100, "batch_size": 16},
        ),
    ]
}
