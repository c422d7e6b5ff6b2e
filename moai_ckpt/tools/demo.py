"""`moai-ckpt demo`: kill a rank of a torchrun job mid-step and show the recovered run is the same run.

The demo trains the small GPT of `moai_ckpt.tools.gpt` twice under torchrun, each time into a
fresh run directory:

1. the *uninterrupted* reference run;
2. the *recovered* run, with ``--max-restarts 3`` and a fault plan (`moai_ckpt.faults`) that
   SIGKILLs one rank at a step and phase (forward, backward, optimizer) drawn from ``seed``.
   torchrun sees the dead worker, stops the other one and starts both again; `fault_tolerant`
   restores the newest snapshot, replays the logged steps and trains on.

With ``local_every``, both runs also keep each rank's latest snapshot in a local tier (host
shared memory where there is ``/dev/shm``) every that many steps, and the restart resumes from it.

It then compares the two: the final parameter digest, the loss of every step, the steps replayed,
the completed steps lost, the wall times and the recovery time, and prints the phases of each
restart from its replay report (detection, process start, process group, setup, restore with its
tier, replay). Rank 0 of each launch appends one
JSON line per event to ``progress.jsonl`` (which the demo tails for its status line) and writes
``result.json`` at the end; the workers' output goes to ``workers.log``.

The GPT ships inside the package, so an installed wheel runs the demo from any directory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console, JustifyMethod
from rich.markup import escape
from rich.table import Table

from moai_ckpt import faults
from moai_ckpt.errors import DemoError
from moai_ckpt.run.options import ENV_PREFIX
from moai_ckpt.tools.restarts import phases_table, read_phases

GPT_MODULE = "moai_ckpt.tools.gpt"  # run by torchrun as a module: it ships in the package
PHASES = ("forward", "backward", "optimizer")
MARKER = "demo.json"


@dataclass(frozen=True)
class DemoOptions:
    """What `run_demo` does.

    Args:
        dir: parent directory of the demo's run directories.
        steps: global training steps of each run.
        seed: seeds the training run and picks the killed rank, step and phase.
        ranks: worker processes (torchrun ``--nproc-per-node``).
        keep: keep earlier demos' directories under ``dir``.
        snapshot_every: steps between snapshots (default: a quarter of ``steps``).
        local_every: steps between snapshots to a local tier in host memory (None: no local tier).
        batch_size: global batch size.
        timeout_s: bound on each torchrun launch.
    """

    dir: str = "runs/demo"
    steps: int = 200
    seed: int = 0
    ranks: int = 2
    keep: bool = False
    snapshot_every: int | None = None
    local_every: int | None = None
    batch_size: int = 16
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.steps < 8:
            raise ValueError(f"steps must be at least 8 (got {self.steps}): the kill needs a snapshot before it")
        if self.ranks < 1:
            raise ValueError(f"ranks must be at least 1 (got {self.ranks})")
        if self.batch_size < self.ranks:
            raise ValueError(f"batch_size ({self.batch_size}) must be at least ranks ({self.ranks})")
        if self.snapshot_every is not None and not 1 <= self.snapshot_every <= self.steps // 2:
            raise ValueError(f"snapshot_every must be between 1 and steps / 2 (got {self.snapshot_every})")
        if self.local_every is not None and self.local_every < 1:
            raise ValueError(f"local_every must be at least 1 (got {self.local_every})")

    @property
    def every(self) -> int:
        """Steps between snapshots."""
        return self.snapshot_every or max(2, self.steps // 4)


@dataclass(frozen=True)
class KillPlan:
    """Which rank dies (SIGKILL), in which step and phase."""

    step: int
    phase: str
    rank: int

    @classmethod
    def draw(cls, options: DemoOptions) -> KillPlan:
        """A kill after the first snapshot, before the last step, not right after a snapshot (so steps replay)."""
        rng = random.Random(options.seed)
        steps = [s for s in range(options.every + 2, options.steps - 1) if (s - 1) % options.every]
        return cls(step=rng.choice(steps), phase=rng.choice(PHASES), rank=rng.randrange(options.ranks))

    def fault_plan(self, once: Path) -> str:
        """The ``MOAI_CKPT_FAULTS`` value: fire once (the ``once`` file), so the restarted workers live."""
        fault = {"at": self.phase, "step": self.step, "rank": self.rank, "action": "kill", "once": str(once)}
        return json.dumps([fault])


@dataclass
class Launch:
    """One torchrun launch: where it ran, how it ended and what rank 0 reported."""

    name: str
    root: Path
    returncode: int = 0
    wall_s: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def storage(self) -> Path:
        """The run directory `fault_tolerant` writes (snapshots, log)."""
        return self.root / "run"

    @property
    def scratch(self) -> Path:
        """The demo's files of this launch: progress, result, workers' output, the kill's once file."""
        return self.root / "scratch"

    def losses(self, *, attempt: int | None = None, replayed: bool | None = None) -> dict[int, float]:
        """Step -> loss of the steps rank 0 reported, optionally of one attempt and kind (live or replayed)."""
        return {
            e["step"]: e["loss"]
            for e in self.events
            if e["event"] == "step"
            and (attempt is None or e["attempt"] == attempt)
            and (replayed is None or e["replayed"] == replayed)
        }

    def event(self, name: str, attempt: int) -> dict[str, Any] | None:
        """The first event ``name`` of ``attempt``, if any."""
        return next((e for e in self.events if e["event"] == name and e["attempt"] == attempt), None)


@dataclass(frozen=True)
class StepRow:
    """One step of the comparison."""

    step: int
    reference: float | None
    recovered: float | None
    how: str  # "live", "replayed" or "restarted" (live after the restart)
    equal: bool


@dataclass
class Comparison:
    """The recovered run against the uninterrupted one."""

    options: DemoOptions
    kill: KillPlan
    reference: Launch
    recovered: Launch
    fired: dict[str, Any] | None  # what the fault's once file says: the step and rank it fired on
    rows: list[StepRow]
    restarts: int
    restored_step: int | None
    replayed: int
    lost: list[int]  # completed steps run live again after the restart
    recovery: dict[str, float]
    phases: list[dict[str, Any]] = field(default_factory=list)  # each restart's phases (its replay report)

    @property
    def digest_equal(self) -> bool:
        """Both runs ended with the same parameter digest."""
        digest = self.reference.result.get("digest")
        return digest is not None and digest == self.recovered.result.get("digest")

    @property
    def equal_steps(self) -> int:
        """Steps whose every recorded loss in the recovered run equals the uninterrupted run's."""
        return sum(r.equal for r in self.rows)

    @property
    def bitwise_equal(self) -> bool:
        """The fault fired, the workers restarted, and parameters and every step's loss are bitwise equal."""
        return (
            self.fired is not None
            and self.restarts >= 1
            and self.digest_equal
            and self.equal_steps == self.options.steps
        )

    def as_json(self) -> dict[str, Any]:
        """A JSON-able summary (written to ``comparison.json``)."""
        return {
            "bitwise_equal": self.bitwise_equal,
            "digest_equal": self.digest_equal,
            "digests": {
                "reference": self.reference.result.get("digest"),
                "recovered": self.recovered.result.get("digest"),
            },
            "equal_steps": self.equal_steps,
            "steps": self.options.steps,
            "kill": asdict(self.kill),
            "fired": self.fired,
            "restarts": self.restarts,
            "restored_step": self.restored_step,
            "replayed": self.replayed,
            "lost_steps": self.lost,
            "wall_s": {"reference": self.reference.wall_s, "recovered": self.recovered.wall_s},
            "recovery_s": self.recovery,
            "restart_phases": self.phases,
            "unequal_steps": [r.step for r in self.rows if not r.equal],
        }


# -- running ------------------------------------------------------------------------------------


def run_demo(options: DemoOptions, console: Console) -> Comparison:
    """Run the uninterrupted and the recovered training, compare them and print the comparison.

    Raises:
        DemoError: a torchrun launch failed or timed out.
    """
    root = _demo_dir(options)
    kill = KillPlan.draw(options)
    (root / MARKER).write_text(json.dumps({"options": asdict(options), "kill": asdict(kill)}, indent=1) + "\n")
    console.print(
        f"[bold]moai-ckpt demo[/] in {escape(str(root))}: a {options.steps}-step GPT on {options.ranks} ranks"
    )
    console.print(
        f"seed {options.seed}: rank {kill.rank} will be SIGKILLed in the [bold]{kill.phase}[/] pass of step "
        f"{kill.step}; snapshots every {options.every} steps"
        + (f", to the local tier every {options.local_every}" if options.local_every else "")
    )

    reference = Launch("uninterrupted", root / "reference")
    recovered = Launch("recovered", root / "recovered")
    once = recovered.scratch / "kill.once"
    try:
        _launch(reference, options, None, console)
        console.print(f"[green]✓[/] uninterrupted run: {options.steps} steps in {reference.wall_s:.1f} s")
        _launch(recovered, options, (kill, once), console)
        console.print(f"[green]✓[/] recovered run: {options.steps} steps in {recovered.wall_s:.1f} s")
    finally:
        for launch in (reference, recovered):  # host memory is not kept for a finished demo
            shutil.rmtree(_local_tier(launch), ignore_errors=True)

    comparison = compare(options, kill, reference, recovered, _read_json(once))
    (root / "comparison.json").write_text(json.dumps(comparison.as_json(), indent=1) + "\n")
    render(comparison, console)
    return comparison


def _demo_dir(options: DemoOptions) -> Path:
    """A fresh directory for this demo; earlier demos' directories go unless ``keep``."""
    parent = Path(options.dir)
    if parent.is_dir() and not options.keep:
        for old in parent.iterdir():
            if (old / MARKER).is_file():  # only what a demo made
                shutil.rmtree(old)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root = parent / f"{stamp}-seed{options.seed}"
    for n in range(1, 100):
        if not root.exists():
            break
        root = parent / f"{stamp}-seed{options.seed}-{n}"
    root.mkdir(parents=True)
    return root


def _launch(launch: Launch, options: DemoOptions, kill: tuple[KillPlan, Path] | None, console: Console) -> Launch:
    """Run the example under torchrun into ``launch.root``; fill in how it ended."""
    launch.scratch.mkdir(parents=True)
    log_path = launch.scratch / "workers.log"
    watcher = _Watcher(launch, options, kill, console)
    started = time.monotonic()
    with (
        open(log_path, "wb") as log,
        _process(_torchrun_command(launch, options, kill), _environment(launch, options, kill), log) as proc,
        console.status(watcher.status()) as status,
    ):
        while proc.poll() is None:
            if time.monotonic() - started > options.timeout_s:
                raise DemoError(f"the {launch.name} run took longer than {options.timeout_s:.0f} s; see {log_path}")
            time.sleep(0.2)
            watcher.poll()
            status.update(watcher.status())
    launch.wall_s = time.monotonic() - started
    launch.returncode = proc.returncode
    watcher.poll()
    launch.result = _read_json(launch.scratch / "result.json") or {}
    if launch.returncode != 0 or not launch.result:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        raise DemoError(
            f"the {launch.name} run failed (torchrun exit code {launch.returncode}); the end of {log_path}:\n"
            + "\n".join(tail)
        )
    return launch


def _torchrun_command(launch: Launch, options: DemoOptions, kill: tuple[KillPlan, Path] | None) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={options.ranks}",
        f"--max-restarts={3 if kill else 0}", "-m", GPT_MODULE,
        "--steps", str(options.steps), "--seed", str(options.seed),
        "--storage", str(launch.storage),
        "--result", str(launch.scratch / "result.json"), "--progress", str(launch.scratch / "progress.jsonl"),
        "--kwargs", json.dumps({"batch_size": options.batch_size}),
    ]  # fmt: skip


def _environment(launch: Launch, options: DemoOptions, kill: tuple[KillPlan, Path] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        GPT_DEMO_SNAPSHOT_EVERY=str(options.every),
        # torchrun's rendezvous store, shared with the workers, keeps the first attempt's gloo
        # addresses, and restarted workers hang connecting to them (pytorch/pytorch#135712)
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
    )
    if kill is not None:
        env[faults.ENV] = kill[0].fault_plan(kill[1])
    if options.local_every is not None:
        env[f"{ENV_PREFIX}LOCAL_TIER"] = str(_local_tier(launch))
        env[f"{ENV_PREFIX}LOCAL_EVERY"] = str(options.local_every)
    return env


def _local_tier(launch: Launch) -> Path:
    """Host shared memory where there is some, else the launch's scratch directory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm / f"moai-demo-{launch.root.parent.name}-{launch.name}"
    return launch.scratch / "local-tier"


@contextmanager
def _process(cmd: list[str], env: dict[str, str], log: Any) -> Iterator[subprocess.Popen[bytes]]:
    """torchrun in a session of its own, stopped with its workers if the demo stops early."""
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # torchrun passes it on to its workers
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


class _Watcher:
    """Follows a launch through rank 0's progress file: a status line, and a line per milestone."""

    def __init__(
        self, launch: Launch, options: DemoOptions, kill: tuple[KillPlan, Path] | None, console: Console
    ) -> None:
        self.launch = launch
        self.options = options
        self.once = kill[1] if kill else None
        self.console = console
        self.path = launch.scratch / "progress.jsonl"
        self.offset = 0
        self.started = time.monotonic()
        self.killed = False

    def poll(self) -> None:
        if self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                f.seek(self.offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind("\n") + 1]  # a line being written waits for the next poll
            self.offset += len(complete.encode())
            for line in complete.splitlines():
                self.launch.events.append(json.loads(line))
                self._announce(self.launch.events[-1])
        if self.once is not None and not self.killed and self.once.exists():
            self.killed = True
            fired = _read_json(self.once) or {}
            self.console.print(
                f"[red]✗[/] rank {fired.get('rank')} SIGKILLed in the {fired.get('at')} pass of step "
                f"{fired.get('step')}; {self._restart_text()}"
            )

    def _restart_text(self) -> str:
        if self.options.ranks == 1:
            return "torchrun starts it again"
        return (
            "torchrun stops the other worker and restarts both" if self.options.ranks == 2 else "torchrun restarts all"
        )

    def _announce(self, event: dict[str, Any]) -> None:
        if event["attempt"] == 0:
            return
        if event["event"] == "start":
            self.console.print(f"[yellow]↻[/] workers restarted (restart {event['attempt']} of torchrun)")
        elif event["event"] == "resume":
            self.console.print(f"  restored the snapshot of step {event['step']}; replaying the logged steps")
        elif event["event"] == "live":
            resume = self.launch.event("resume", event["attempt"])
            replayed = event["step"] - 1 - (resume["step"] if resume else 0)
            self.console.print(
                f"  replayed {replayed} steps, each matching its logged digests; live again from step {event['step']}"
            )

    def status(self) -> str:
        """One line: what the launch is doing now."""
        elapsed = f"{time.monotonic() - self.started:.0f} s"
        events = self.launch.events
        last = events[-1] if events else None
        steps = [e for e in events if e["event"] == "step"]
        if self.killed and (last is None or last["attempt"] == 0):
            doing = "a worker died; torchrun is restarting the workers"
        elif last is None:
            n = self.options.ranks
            doing = f"starting {n} worker{'s' if n > 1 else ''} under torchrun"
        elif last["event"] == "start":
            doing = "restoring the newest snapshot" if last["attempt"] else "taking the initial snapshot"
        elif last["event"] == "resume" and last["attempt"]:
            doing = f"replaying the steps logged after step {last['step']}"
        elif steps:
            latest = steps[-1]
            how = "replaying" if latest["replayed"] else "training"
            doing = f"{how} step {latest['step']}/{self.options.steps} · loss {latest['loss']:.4f}"
        else:
            doing = "running"
        return f"{self.launch.name} run: {doing} · {elapsed}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- comparing ----------------------------------------------------------------------------------


def compare(
    options: DemoOptions, kill: KillPlan, reference: Launch, recovered: Launch, fired: dict[str, Any] | None
) -> Comparison:
    """Set the recovered launch against the reference, step by step."""
    expected = reference.losses()
    attempts = sorted({e["attempt"] for e in recovered.events})
    last = attempts[-1] if attempts else 0
    before = recovered.losses(attempt=0)  # steps completed before the kill
    replayed = recovered.losses(attempt=last, replayed=True) if last else {}
    after = recovered.losses(attempt=last, replayed=False) if last else {}
    rows = []
    for step in range(1, options.steps + 1):
        values = [v[step] for v in (before, replayed, after) if step in v]
        how = "restarted" if step in after else "replayed" if step in replayed else "live"
        ref = expected.get(step)
        equal = bool(values) and ref is not None and all(v == ref for v in values)
        rows.append(StepRow(step, ref, values[-1] if values else None, how, equal))
    resume = recovered.event("resume", last) if last else None
    return Comparison(
        options=options,
        kill=kill,
        reference=reference,
        recovered=recovered,
        fired=fired,
        rows=rows,
        restarts=int(recovered.result.get("restart_count", 0)),
        restored_step=None if resume is None else int(resume["step"]),
        replayed=int(recovered.result.get("replayed", 0)),
        lost=sorted(set(before) & set(after)),
        recovery=_recovery(recovered, fired, last),
        phases=read_phases(recovered.storage),
    )


def _recovery(recovered: Launch, fired: dict[str, Any] | None, attempt: int) -> dict[str, float]:
    """Seconds from the kill to: the workers running again, the snapshot restored, live training again."""
    once = recovered.scratch / "kill.once"
    marks = {name: recovered.event(name, attempt) for name in ("start", "resume", "live")}
    if fired is None or not once.exists() or attempt == 0 or any(m is None for m in marks.values()):
        return {}
    killed = once.stat().st_mtime
    return {name: float(m["t"]) - killed for name, m in marks.items() if m is not None}


# -- showing ------------------------------------------------------------------------------------


def render(c: Comparison, console: Console) -> None:
    """Print the per-step table, the summary table and the verdict."""
    console.print(_steps_table(c))
    console.print(_summary_table(c))
    if c.phases:
        console.print(phases_table(c.phases))
    if c.bitwise_equal:
        console.print("[bold green]bitwise equal[/]: same parameters and losses as the uninterrupted run")
    elif c.fired is None or c.restarts < 1:
        console.print("[bold red]the planned kill never happened[/]: there was nothing to recover")
    else:
        console.print("[bold red]runs differ[/]: the recovered run is not bitwise the uninterrupted one")


def _shown_steps(c: Comparison) -> list[int]:
    """The steps worth a row: the start, the restored snapshot, around the kill, the end."""
    picks = {1, c.options.steps, c.kill.step - 2, c.kill.step - 1, c.kill.step, c.kill.step + 1}
    if c.restored_step is not None:
        picks |= {c.restored_step, c.restored_step + 1}
    picks |= {r.step for r in c.rows if not r.equal}
    return sorted(s for s in picks if 1 <= s <= c.options.steps)


def _steps_table(c: Comparison) -> Table:
    table = Table(title="loss per step (mean over ranks)", title_justify="left")
    table.add_column("step", justify="right")
    table.add_column("uninterrupted", justify="right")
    table.add_column("recovered", justify="right")
    table.add_column("recovered run", style="dim")
    table.add_column("equal")
    how = {
        "live": "live",
        "replayed": "replayed from the log",
        "restarted": "live, after the restart",
    }
    killed = (c.fired or {}).get("step", c.kill.step)
    previous = 0
    for step in _shown_steps(c):
        if step > previous + 1:
            table.add_row("⋮", "", "", "", "")
        row = c.rows[step - 1]
        label = how[row.how] + (" · killed here" if step == killed else "")
        table.add_row(
            str(step), _loss(row.reference), _loss(row.recovered), label, "[green]yes[/]" if row.equal else "[red]NO[/]"
        )
        previous = step
    return table


def _summary_table(c: Comparison) -> Table:
    table = Table(title="recovered vs uninterrupted", title_justify="left")
    columns: list[tuple[str, JustifyMethod]] = [("", "left"), ("uninterrupted", "right"), ("recovered", "right")]
    for name, justify in [*columns, ("", "left")]:
        table.add_column(name, justify=justify)
    ref, rec = c.reference.result.get("digest", ""), c.recovered.result.get("digest", "")
    table.add_row("final parameter digest (sha256)", ref[:16], rec[:16], _check(c.digest_equal, "equal", "DIFFER"))
    equal = f"{c.equal_steps}/{c.options.steps} equal"
    table.add_row("loss at every step", "", "", _check(c.equal_steps == c.options.steps, equal, equal))
    fired = c.fired or {}
    killed = f"rank {fired.get('rank')}, {fired.get('at')} of step {fired.get('step')}" if c.fired else "none"
    table.add_row("SIGKILL", "-", killed, "" if c.fired else "[red]no kill[/]")
    table.add_row("torchrun restarts", "0", str(c.restarts), "")
    table.add_row("snapshot restored", "-", "-" if c.restored_step is None else f"step {c.restored_step}", "")
    span = (
        f" ({c.restored_step + 1}-{c.restored_step + c.replayed})" if c.replayed and c.restored_step is not None else ""
    )
    table.add_row("steps replayed from the log", "-", f"{c.replayed}{span}", "")
    table.add_row("completed steps lost", "-", str(len(c.lost)), _check(not c.lost, "none", f"steps {c.lost}"))
    table.add_row("log policy", "", "log_sync", "each step's record durable before the next step starts")
    extra = c.recovered.wall_s - c.reference.wall_s
    table.add_row("wall time", f"{c.reference.wall_s:.1f} s", f"{c.recovered.wall_s:.1f} s", f"{extra:+.1f} s")
    r = c.recovery
    if r:
        table.add_row("recovery: kill to live training", "-", f"{r['live']:.1f} s", "")
        table.add_row("  workers restarted", "-", f"{r['start']:.1f} s", "torchrun, new processes")
        table.add_row("  snapshot restored", "-", f"{r['resume'] - r['start']:.1f} s", "")
        table.add_row("  logged steps replayed", "-", f"{r['live'] - r['resume']:.1f} s", "")
    return table


def _check(ok: bool, good: str, bad: str) -> str:
    return f"[green]{good}[/]" if ok else f"[red]{bad}[/]"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.8f}"
