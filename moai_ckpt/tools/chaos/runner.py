"""Running a chaos trial: a fault-free reference, then the same job with faults, under torchrun.

The harness is the job's supervisor: it starts ``torchrun --max-restarts 0`` on a
`moai_ckpt.run.worker` process per rank, and whenever torchrun exits because a rank died (torchrun
tears the others down, as it does before an elastic restart) it applies what is due between
attempts (a bit flip at rest, a new world size) and starts the job again, until the job finishes.
A watchdog notices a stalled job (no new log record for ``hang_timeout_s``: a rank stopped) and
kills it. Process faults are planned through `moai_ckpt.faults` (``MOAI_CKPT_FAULTS``), storage
faults through the fault-injecting fsspec wrapper (``MOAI_CKPT_STORAGE_FAULTS``).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moai_ckpt import faults as fault_points
from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.layout import LOG, commit_key, is_chunk_key, log_dir, parse_log_segment, parse_step_name, snapshot_dir
from moai_ckpt.run.session import DEVICE_ENV
from moai_ckpt.testing import protocols
from moai_ckpt.testing.faulty import EVENT_LOG_ENV, PLAN_ENV
from moai_ckpt.tools.chaos.scenario import AT_REST_KINDS, PROCESS_KINDS, STORAGE_KINDS, Fault, Scenario


@dataclass
class Attempt:
    """One torchrun launch."""

    number: int
    world_size: int
    started: float
    ended: float = 0.0
    returncode: int | None = None
    stalled: bool = False  # killed by the watchdog
    log: str = ""
    node_codes: list[int | None] = field(default_factory=list)  # each torchrun agent's exit code


@dataclass
class FaultRecord:
    """What happened to one planned fault."""

    fault: Fault
    fired_at: float | None = None  # wall time
    fired_step: int | None = None
    fired_rank: int | None = None
    detected: str | None = None
    recovered_at: float | None = None
    target: str | None = None  # the file an at-rest fault flipped a bit in
    count: int = 0  # storage faults: how many calls it hit

    @property
    def recovery_s(self) -> float | None:
        if self.fired_at is None or self.recovered_at is None:
            return None
        return self.recovered_at - self.fired_at


@dataclass
class RunOutcome:
    """A reference or faulty run, as the harness saw it."""

    run_dir: Path
    storage: str
    attempts: list[Attempt] = field(default_factory=list)
    faults: list[FaultRecord] = field(default_factory=list)
    progress: list[tuple[float, int]] = field(default_factory=list)  # (wall time, last logged step)
    started: float = 0.0
    ended: float = 0.0
    finished: bool = False
    unplanned_failures: int = 0
    handed_off: bool = False  # stopped here, to be continued on another machine


_NODE_GRACE_S = 30.0  # how long the other agents may take to stop after one exits with a failure


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    fault_points.kill_tree(proc.pid)  # works on stopped processes too
    proc.wait()


def last_logged_step(run_dir: Path) -> int:
    """The newest step any log segment of the run holds (from file names alone: cheap to poll)."""
    best = 0
    root = run_dir / LOG
    if not root.is_dir():
        return 0
    for base in os.listdir(root):
        if parse_step_name(base) is None:
            continue
        try:
            names = os.listdir(root / base)
        except OSError:
            continue
        for name in names:
            parsed = parse_log_segment(name)
            if parsed is not None:
                best = max(best, parsed[1])
    return best


class Trial:
    """One reference-or-faulty execution of a scenario."""

    def __init__(self, scenario: Scenario, out_dir: Path, seed: int, *, quiet: bool = False) -> None:
        self.scenario = scenario
        self.out_dir = out_dir
        self.seed = seed
        self.quiet = quiet
        self.rng = random.Random(f"targets/{scenario.name}/{seed}")

    # -- launching ------------------------------------------------------------------------------

    def _commands(self, world_size: int, storage: str) -> list[list[str]]:
        """One torchrun agent per node: ``--standalone`` for one node, a c10d rendezvous for more."""
        kwargs = {**self.scenario.kwargs, self.scenario.storage_kwarg: storage}
        worker = ["-m", "moai_ckpt.run.worker", self.scenario.entrypoint, json.dumps({"args": [], "kwargs": kwargs})]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--max-restarts=0"]
        nodes = self.scenario.nodes if world_size % self.scenario.nodes == 0 else 1
        if nodes == 1:
            return [[*launcher, "--standalone", f"--nproc-per-node={world_size}", *worker]]
        endpoint = f"127.0.0.1:{_free_port()}"
        rendezvous = [
            f"--nnodes={nodes}",
            f"--nproc-per-node={world_size // nodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id=chaos-{os.getpid()}-{time.monotonic_ns()}",
        ]
        return [[*launcher, *rendezvous, *worker] for _ in range(nodes)]

    def _environment(
        self, scratch: Path, plan: list[dict[str, Any]], storage_plan: dict[str, Any] | None
    ) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in (fault_points.ENV, PLAN_ENV, EVENT_LOG_ENV)}
        env.update(
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
            TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
            GPT_DEMO_SNAPSHOT_EVERY=str(self.scenario.snapshot_every),
            **self.scenario.env,
        )
        if plan:
            env[fault_points.ENV] = json.dumps(plan)
        if storage_plan is not None:
            env[PLAN_ENV] = json.dumps(storage_plan)
            env[EVENT_LOG_ENV] = str(scratch / "storage_faults.jsonl")
            env = protocols.child_environment(env)  # the job resolves faulty://, installed or not
        return env

    def run(self, name: str, drawn: list[Fault]) -> RunOutcome:
        """Run the job to completion, injecting ``drawn`` (empty: the reference).

        A run that another machine handed off (a ``handoff`` fault) continues where it stopped.
        """
        root = self.out_dir / name
        run_dir, scratch = root / "run", root / "scratch"
        scratch.mkdir(parents=True, exist_ok=True)
        storage_faults = [f for f in drawn if f.kind in STORAGE_KINDS]
        storage = f"faulty::file://{run_dir}" if storage_faults else str(run_dir)
        outcome = RunOutcome(run_dir=run_dir, storage=storage, faults=[FaultRecord(f) for f in drawn])
        plan = self._process_plan(outcome.faults, scratch)
        storage_plan = self._storage_plan(storage_faults) if storage_faults else None
        env = self._environment(scratch, plan, storage_plan)
        world_size, first = self.scenario.ranks, 0
        outcome.started = time.time()
        handed = load_handoff(root)
        if handed is not None:
            outcome, world_size, device, first = handed
            outcome.storage = storage
            if device is not None:
                env[DEVICE_ENV] = device
            record = next(r for r in outcome.faults if r.fault.kind == "handoff" and r.detected is None)
            record.fired_at = time.time()  # the recovery measured here: restore and replay on this machine
            record.detected = f"continued on {_machine()}"
            (root / HANDOFF).rename(root / f"{HANDOFF}.continued")
        deadline = time.time() + self.scenario.run_timeout_s
        for number in range(first, first + self.scenario.max_restarts + 1 + len(drawn)):
            attempt = self._launch(number, world_size, storage, env, scratch, run_dir, outcome, deadline)
            outcome.attempts.append(attempt)
            self._note_fired(outcome, scratch, attempt)
            if attempt.returncode == 0:
                outcome.finished = True
                break
            if time.time() > deadline:
                break
            world_size = self._between_attempts(outcome, run_dir, world_size, attempt, env)
            if outcome.handed_off:
                save_handoff(root, outcome, world_size, env.get(DEVICE_ENV), number + 1)
                break
        outcome.ended = time.time()
        self._note_storage_faults(outcome, scratch)
        self._note_recoveries(outcome)
        return outcome

    def _launch(
        self,
        number: int,
        world_size: int,
        storage: str,
        env: dict[str, str],
        scratch: Path,
        run_dir: Path,
        outcome: RunOutcome,
        deadline: float,
    ) -> Attempt:
        attempt = Attempt(number, world_size, time.time(), log=str(scratch / f"attempt-{number}.log"))
        if not self.quiet:
            print(f"  attempt {number}: {world_size} rank(s)", file=sys.stderr, flush=True)
        with open(attempt.log, "wb") as log:
            procs = [
                subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
                for command in self._commands(world_size, storage)
            ]
            last_step, last_change = last_logged_step(run_dir), time.time()
            first_exit: float | None = None
            while any(p.poll() is None for p in procs):
                time.sleep(0.25)
                step, now = last_logged_step(run_dir), time.time()
                if step != last_step:
                    last_step, last_change = step, now
                    outcome.progress.append((now, step))
                if first_exit is None and any(p.returncode not in (None, 0) for p in procs):
                    first_exit = now  # a lost node: the others notice in their next collective
                stalled = now - last_change > self.scenario.hang_timeout_s
                if stalled or now > deadline or (first_exit is not None and now - first_exit > _NODE_GRACE_S):
                    attempt.stalled = stalled
                    break  # a stopped rank blocks the others in their collectives
            for p in procs:
                _kill_tree(p)  # nothing of this attempt survives it
        codes = [p.returncode for p in procs]
        attempt.ended = time.time()
        attempt.returncode = next((c for c in codes if c != 0), 0)
        attempt.node_codes = codes
        return attempt

    # -- planning faults ------------------------------------------------------------------------

    def _process_plan(self, records: list[FaultRecord], scratch: Path) -> list[dict[str, Any]]:
        plan = []
        for i, record in enumerate(records):
            f = record.fault
            if f.kind in PROCESS_KINDS:
                action = {"hang": "stop", "node_loss": "kill_node"}.get(f.kind, "kill")
                once = str(scratch / (f"fault-{i}-{{rank}}.fired" if f.kind == "kill_all" else f"fault-{i}.fired"))
                entry: dict[str, Any] = {"at": f.phase, "step": f.step, "action": action, "once": once}
                if f.kind != "kill_all":
                    entry["rank"] = f.rank
                plan.append(entry)
            elif f.kind in AT_REST_KINDS:  # stop every rank after the step, so the harness can act
                once = str(scratch / f"fault-{i}-{{rank}}.fired")
                plan.append({"at": "step.end", "step": f.step, "action": "exit", "once": once})
        return plan

    def _storage_plan(self, storage_faults: list[Fault]) -> dict[str, Any]:
        plan: dict[str, Any] = {"seed": self.rng.randrange(2**31)}
        for f in storage_faults:
            if f.kind == "storage_transient":
                plan["transient_rate"] = f.rate
            elif f.kind == "storage_latency":
                plan["latency_s"] = f.latency_s
            elif f.kind == "storage_outage":
                plan["outage"] = {"start": self.rng.randint(100, 400), "seconds": f.seconds}
            elif f.kind == "storage_torn":
                plan["torn_write_rate"] = f.rate
                plan["ops"] = ["write", "read", "list", "delete", "info"]
        return plan

    # -- between attempts -----------------------------------------------------------------------

    def _note_fired(self, outcome: RunOutcome, scratch: Path, attempt: Attempt) -> None:
        for i, record in enumerate(outcome.faults):
            if record.fired_at is not None or record.fault.kind in STORAGE_KINDS:
                continue
            fired = sorted(scratch.glob(f"fault-{i}*.fired"))
            if not fired:
                continue
            with open(fired[0]) as f:
                info = json.load(f)
            record.fired_at = fired[0].stat().st_mtime
            record.fired_step, record.fired_rank = int(info.get("step", 0)), int(info.get("rank", 0))
            if record.fault.kind in ("kill", "kill_all"):
                record.detected = f"rank exit (torchrun exit code {attempt.returncode})"
            elif record.fault.kind == "hang":
                record.detected = "stall watchdog" if attempt.stalled else f"exit code {attempt.returncode}"
            elif record.fault.kind == "node_loss":
                record.detected = f"node lost: torchrun agents exited {attempt.node_codes}" + (
                    " (the survivor stalled)" if attempt.stalled else ""
                )

    def _between_attempts(
        self, outcome: RunOutcome, run_dir: Path, world_size: int, attempt: Attempt, env: dict[str, str]
    ) -> int:
        due = [
            r
            for i, r in enumerate(outcome.faults)
            if r.fault.kind in AT_REST_KINDS and r.fired_at is not None and r.detected is None
        ]
        if not due and not any(
            r.fired_at is not None and r.fired_at >= attempt.started and r.fault.kind in PROCESS_KINDS
            for r in outcome.faults
        ):
            outcome.unplanned_failures += 1
        for record in due:
            kind = record.fault.kind
            if kind == "resize":
                world_size = record.fault.world_size or world_size
                record.detected = f"restarted on {world_size} rank(s)"
                continue
            if kind == "device_change":
                env[DEVICE_ENV] = record.fault.device or "cpu"
                record.detected = f"restarted on {env[DEVICE_ENV]}"
                continue
            if kind == "handoff":
                outcome.handed_off = True  # the record is completed on the machine that continues
                continue
            record.target = self._flip_a_bit(run_dir, kind)
            record.detected = "pending: the restart must refuse it" if record.target else "nothing to corrupt"
        return world_size

    def _flip_a_bit(self, run_dir: Path, kind: str) -> str | None:
        """Flip one bit in what the next restart will read: the newest usable snapshot, or its log."""
        with Checkpointer(str(run_dir), local=True) as ckpt:
            usable = ckpt.steps()  # committed, with a valid marker: what a restart may restore
        newest = run_dir / snapshot_dir(usable[-1]) if usable else None
        if kind == "corrupt_chunk" and newest is not None:
            candidates = sorted(
                p
                for p in newest.rglob("*")
                if p.is_file() and is_chunk_key(p.relative_to(run_dir).as_posix()) and p.stat().st_size
            )
        elif kind == "corrupt_marker" and newest is not None:
            candidates = [run_dir / commit_key(usable[-1])]
        elif kind == "corrupt_log":
            # the log a restart replays first: the one after the newest usable snapshot (a log
            # whose own snapshot is unusable is read by nobody)
            logs = [run_dir / log_dir(base) for base in usable if (run_dir / log_dir(base)).is_dir()]
            candidates = sorted(p for p in logs[-1].iterdir() if parse_log_segment(p.name)) if logs else []
            candidates = candidates[:-1] or candidates  # not the newest segment: damage there reads as torn
        else:
            candidates = []
        if not candidates:
            return None
        target = self.rng.choice(candidates)
        data = bytearray(target.read_bytes())
        if kind == "corrupt_log":
            at = data.find(b"MLOG")  # inside a record, past its frame header
            position = at + 12 + self.rng.randrange(max(1, min(64, len(data) - at - 12))) if at >= 0 else 0
        else:
            position = self.rng.randrange(len(data))
        data[position] ^= 1 << self.rng.randrange(8)
        target.write_bytes(bytes(data))
        return str(target.relative_to(run_dir))

    def _note_recoveries(self, outcome: RunOutcome) -> None:
        """A fault that stopped the job is recovered from once the next attempt logs a new step;
        a storage fault is absorbed where it happens (retried, or caught by a checksum later)."""
        for record in outcome.faults:
            if record.fired_at is None:
                continue
            if record.fault.kind in STORAGE_KINDS:
                record.recovered_at = record.fired_at if outcome.finished else None
                continue
            later_attempts = [a for a in outcome.attempts if a.started > record.fired_at]
            if not later_attempts:
                continue
            before = max((s for t, s in outcome.progress if t <= record.fired_at), default=0)
            live = [t for t, s in outcome.progress if t >= later_attempts[0].started and s > before]
            if live:
                record.recovered_at = live[0]
            elif outcome.finished:
                record.recovered_at = outcome.ended

    def _note_storage_faults(self, outcome: RunOutcome, scratch: Path) -> None:
        path = scratch / "storage_faults.jsonl"
        events = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue  # a line cut short by a kill
        kinds = {
            "storage_transient": {"transient_rate", "fail_nth"},
            "storage_outage": {"outage"},
            "storage_torn": {"torn"},
            "storage_latency": set(),
        }
        for record in outcome.faults:
            if record.fault.kind not in STORAGE_KINDS:
                continue
            hits = [e for e in events if e["kind"] in kinds[record.fault.kind]]
            record.count = len(hits)
            if record.fault.kind == "storage_latency":
                record.count = -1  # not a failure: every call is slower
                record.detected = "every call slowed"
            elif hits:
                record.fired_at = min(e["t"] for e in hits)
                record.detected = "retried" if record.fault.kind != "storage_torn" else "checksums"


# -- handing a run to another machine ----------------------------------------------------------

HANDOFF = "handoff.json"


def _machine() -> str:
    """This machine's accelerator, as a person names it."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"CPU ({os.cpu_count()} cores)"


def save_handoff(root: Path, outcome: RunOutcome, world_size: int, device: str | None, next_attempt: int) -> None:
    """What the next machine needs to continue the run: its outcome so far, paths relative to ``root``."""

    def rel(path: str | Path) -> str:
        return os.path.relpath(path, root)

    state = {
        "machine": _machine(),
        "world_size": world_size,
        "device": device,
        "next_attempt": next_attempt,
        "started": outcome.started,
        "progress": outcome.progress,
        "unplanned_failures": outcome.unplanned_failures,
        "attempts": [{**asdict(a), "log": rel(a.log)} for a in outcome.attempts],
        "faults": [
            {**{k: v for k, v in asdict(r).items() if k != "fault"}, "fault": r.fault.model_dump()}
            for r in outcome.faults
        ],
    }
    (root / HANDOFF).write_text(json.dumps(state, indent=1))


def load_handoff(root: Path) -> tuple[RunOutcome, int, str | None, int] | None:
    """The outcome a handed-off run had reached, with the world size, device and attempt to go on with."""
    path = root / HANDOFF
    if not path.exists():
        return None
    state = json.loads(path.read_text())
    run_dir = root / "run"
    outcome = RunOutcome(run_dir=run_dir, storage=str(run_dir))
    outcome.started = float(state["started"])
    outcome.progress = [(float(t), int(s)) for t, s in state["progress"]]
    outcome.unplanned_failures = int(state["unplanned_failures"])
    outcome.attempts = [Attempt(**{**a, "log": str(root / a["log"])}) for a in state["attempts"]]
    outcome.faults = [FaultRecord(**{**r, "fault": Fault.model_validate(r["fault"])}) for r in state["faults"]]
    return outcome, int(state["world_size"]), state["device"], int(state["next_attempt"])
