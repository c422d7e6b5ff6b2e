"""The workload zoo: training scripts written as users write them (tests/workloads/), each SIGKILLed
from outside at 3 seeded points and restarted, end bitwise equal to an uninterrupted run.

Each workload prints ``zoo step N rank R pid P loss HEX`` per step and, at its end, writes the
sha256 of every entry of its full final state (model parameters and buffers, optimizer,
scheduler, scaler, EMA copy, data position, carried hidden state, RNGs), computed by the script
itself, not by moai-ckpt (`tests/workloads/zoo_result.py`). The test kills a process once a
drawn step has been printed, plus a drawn delay: one worker of a torchrun job (torchrun restarts
them), or the only process of a plain job (the test starts it again, as a user or a scheduler
would). Whatever the kills hit (a forward pass, a snapshot, a log write, a replay), the checks
are the same: every entry's digest equals the uninterrupted run's, and every loss printed for
every step, live or replayed, in any attempt, equals the uninterrupted run's loss of that step.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

pytestmark = [pytest.mark.workloads, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
WORKLOADS_DIR = ROOT / "tests" / "workloads"
KILLS = 3
RUN_TIMEOUT_S = 300.0
_LINE = re.compile(r"^zoo step (\d+) rank (\d+) pid (\d+) loss (\S+)$")


@dataclass(frozen=True)
class Workload:
    """A script of tests/workloads/ and how it is launched."""

    script: str
    snapshot_every: int  # as the script's @fault_tolerant says
    ranks: int = 1
    steps: int = 30

    def command(self, run_dir: Path, out: Path, restarts: int) -> list[str]:
        args = [str(WORKLOADS_DIR / self.script), "--run-dir", str(run_dir), "--steps", str(self.steps)]
        args += ["--out", str(out)]
        if self.ranks == 1:
            return [sys.executable, *args]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.ranks}"]
        return [*launcher, f"--max-restarts={restarts}", *args]


WORKLOADS = {
    "cnn_ddp": Workload("cnn_ddp.py", 7, ranks=2),
    "hf_causal_lm": Workload("hf_causal_lm.py", 8),
    "lstm_tbptt": Workload("lstm_tbptt.py", 9, steps=40),
    "bf16_autocast": Workload("bf16_autocast.py", 6),
    "ema": Workload("ema.py", 7),
    "compiled": Workload("compiled.py", 7),
    "fsdp2": Workload("fsdp2.py", 7, ranks=2),
    "stateful_loader": Workload("stateful_loader.py", 7),
}


@dataclass
class Kill:
    """One SIGKILL the test sent: after which printed step, how long after, to which process."""

    after_step: int
    delay_s: float
    rank: int
    pid: int
    landed: bool = False


@dataclass
class Outcome:
    """What a run of a workload printed and wrote, over all its attempts."""

    results: dict[int, dict[str, Any]]  # rank -> the script's final JSON
    losses: dict[tuple[int, int], list[str]]  # (rank, step) -> every loss printed for it
    kills: list[Kill] = field(default_factory=list)
    launches: int = 0
    logs: list[Path] = field(default_factory=list)

    def log_tail(self, chars: int = 4000) -> str:
        text = "".join(p.read_text(errors="replace") for p in self.logs if p.exists())
        return text[-chars:]


def kill_plan(workload: Workload, seed: int) -> list[tuple[int, float, int]]:
    """`KILLS` (step, delay in seconds, rank) to kill at, drawn from the seed.

    Steps fall between the third step and the sixth-last, and never on a scheduled snapshot's step
    or the step after it: each kill lands mid-way between snapshots, so the restart restores a
    snapshot taken after training began (when one was due) and replays the steps since.
    """
    rng = random.Random(f"{workload.script}/{seed}")
    every = workload.snapshot_every
    candidates = [s for s in range(3, workload.steps - 5) if s % every not in (0, 1)]
    steps = sorted(rng.sample(candidates, KILLS))
    return [(s, rng.uniform(0.0, 0.03), rng.randrange(workload.ranks)) for s in steps]


def _environment() -> dict[str, str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    # torchrun's restarted gloo workers otherwise read the killed generation's addresses from the
    # shared rendezvous store and fail to connect (pytorch#135712; docs/demo.md says the same to users)
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    env.pop("MOAI_CKPT_FAULTS", None)
    return env


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


class Supervisor:
    """Runs a workload to its end and sends it the planned kills, from outside.

    A kill is sent once the job has printed a step at or after the planned one (from a process
    not yet killed), after the planned delay. A plain job killed this way is started again with
    the same command, as a user or a scheduler would; a torchrun job restarts its workers itself.
    """

    def __init__(self, workload: Workload, root: Path, plan: list[tuple[int, float, int]]) -> None:
        self.workload, self.root, self.plan = workload, root, list(plan)
        self.out = root / "result"
        self.outcome = Outcome(results={}, losses={})
        self.dead: set[int] = set()  # pids killed, or of the generation a kill tore down
        self.live: dict[int, int] = {}  # rank -> pid of the newest process seen printing for it
        self.deadline = time.monotonic() + RUN_TIMEOUT_S

    def run(self) -> Outcome:
        while True:
            code, killed = self._attempt()
            if code == 0:
                break
            if not (self.workload.ranks == 1 and killed and code == -signal.SIGKILL):
                raise AssertionError(f"{self.workload.script} exited with {code}: {self.outcome.log_tail()}")
        for rank in range(self.workload.ranks):
            with open(f"{self.out}.rank{rank}.json") as f:
                self.outcome.results[rank] = json.load(f)
        return self.outcome

    def _attempt(self) -> tuple[int, bool]:
        """One launch, read line by line: (its exit code, whether a kill was sent to it)."""
        log_path = self.root / f"attempt-{self.outcome.launches}.log"
        self.outcome.logs.append(log_path)
        self.outcome.launches += 1
        command = self.workload.command(self.root / "run", self.out, restarts=KILLS)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=WORKLOADS_DIR, env=_environment()
            )
            assert proc.stdout is not None
            lines: queue.Queue[str | None] = queue.Queue()
            threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
            killed = False
            for line in self._lines(proc, lines):
                killed = self._on_line(line) or killed
            return proc.wait(timeout=max(1.0, self.deadline - time.monotonic())), killed

    def _lines(self, proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> Iterator[str]:
        """The process's output lines until it ends (or, past the deadline, an error)."""
        quiet_since: float | None = None
        while time.monotonic() < self.deadline:
            try:
                line = lines.get(timeout=0.05)
            except queue.Empty:
                # a killed process's children (data loader workers) may hold the pipe open a while:
                # once it has exited and nothing more comes, its output is all read
                if proc.poll() is not None:
                    quiet_since = quiet_since or time.monotonic()
                    if time.monotonic() - quiet_since > 0.5:
                        return
                continue
            if line is None:
                return
            quiet_since = None
            yield line
        proc.kill()
        raise AssertionError(f"{self.workload.script} did not finish in {RUN_TIMEOUT_S} s: {self.outcome.log_tail()}")

    def _on_line(self, line: str) -> bool:
        """Note a progress line's loss; send the next kill if it is due. Whether a kill was sent."""
        match = _LINE.match(line)
        if match is None:
            return False
        step, rank, pid, loss = int(match[1]), int(match[2]), int(match[3]), match[4]
        self.outcome.losses.setdefault((rank, step), []).append(loss)
        if pid in self.dead:
            return False
        self.live[rank] = pid
        if not self.plan or step < self.plan[0][0] or self.plan[0][2] not in self.live:
            return False
        _, delay, target = self.plan.pop(0)
        time.sleep(delay)
        kill = Kill(step, delay, target, self.live[target])
        try:
            os.kill(kill.pid, signal.SIGKILL)
            kill.landed = True
        except ProcessLookupError:
            pass  # it had already exited: the job ended before the kill
        self.outcome.kills.append(kill)
        self.dead.update(self.live.values())  # torchrun tears the whole generation down
        self.live.clear()
        return True


def run_workload(workload: Workload, root: Path, seed: int | None = None) -> Outcome:
    """Run ``workload`` to its end; with a ``seed``, SIGKILL it at `KILLS` drawn points on the way."""
    return Supervisor(workload, root, kill_plan(workload, seed) if seed is not None else []).run()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Future[Outcome]]]:
    """The uninterrupted run of a workload, started once per module and shared.

    It runs in the background (a `Future`), beside the killed run: on a 2-core machine the two
    single-process runs then take about the time of one.
    """
    started: dict[str, Future[Outcome]] = {}
    with ThreadPoolExecutor(max_workers=2) as pool:

        def get(name: str) -> Future[Outcome]:
            if name not in started:
                root = tmp_path_factory.mktemp(f"{name}-reference")
                started[name] = pool.submit(run_workload, WORKLOADS[name], root)
            return started[name]

        yield get


def differing_entries(expected: dict[str, str], got: dict[str, str]) -> list[str]:
    """Entries whose digests differ, plus those only one side has (marked)."""
    out = [k for k in expected if k in got and got[k] != expected[k]]
    out += [f"{k} (missing)" for k in expected if k not in got]
    out += [f"{k} (extra)" for k in got if k not in expected]
    return sorted(out)


class RunsDiffer(AssertionError):
    """A killed and restarted run did not end as the uninterrupted one."""


def assert_same_run(name: str, reference: Outcome, faulty: Outcome) -> None:
    """Every entry of every rank's final state, and every loss of every step, as in the reference."""
    problems = []
    for rank, expected in reference.results.items():
        differ = differing_entries(expected["digests"], faulty.results[rank]["digests"])
        if differ:
            problems.append(f"rank {rank}: {len(differ)} of {len(expected['digests'])} state entries differ: {differ}")
    if set(faulty.losses) != set(reference.losses):
        problems.append(f"steps never printed: {sorted(set(reference.losses) - set(faulty.losses))}")
    wrong = sorted(key for key, values in faulty.losses.items() if any(v != reference.losses[key][0] for v in values))
    if wrong:
        problems.append(f"losses differ at (rank, step) {wrong}")
    if problems:
        kills = [(k.after_step, k.rank) for k in faulty.kills]
        raise RunsDiffer(f"{name}, killed after (step, rank) {kills}, differs from the uninterrupted run: {problems}")


# known failures, each with the change that fixes it; strict: once fixed, the mark must go
EXPECTED_FAILURES: dict[str, str] = {}  # workload -> why it cannot end bitwise equal yet


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(reason=EXPECTED_FAILURES[name], raises=RunsDiffer, strict=True))
        if name in EXPECTED_FAILURES
        else name
        for name in WORKLOADS
    ],
)
def test_a_workload_killed_three_times_ends_bitwise_equal(
    name: str, reference: Callable[[str], Future[Outcome]], tmp_path: Path
) -> None:
    running = reference(name)
    faulty = run_workload(WORKLOADS[name], tmp_path, seed=0)
    ref = running.result(timeout=RUN_TIMEOUT_S)
    assert len(ref.losses) == WORKLOADS[name].steps * WORKLOADS[name].ranks
    assert all(len(v) == 1 for v in ref.losses.values())  # one line per step and rank, nothing lost
    assert len(faulty.kills) == KILLS and all(k.landed for k in faulty.kills), faulty.kills
    assert_same_run(name, ref, faulty)


def test_the_comparison_names_a_differing_entry_and_a_differing_loss() -> None:
    """The check itself: one entry's digest or one replayed loss off is a failure that names it."""
    reference = Outcome(
        results={0: {"digests": {"model/w": "a", "optim/state/0/exp_avg": "b"}}}, losses={(0, 1): ["1"]}
    )
    faulty = Outcome(results={0: {"digests": {"model/w": "a", "optim/state/0/exp_avg": "c"}}}, losses={(0, 1): ["1"]})
    with pytest.raises(RunsDiffer, match=r"1 of 2 state entries differ: \['optim/state/0/exp_avg'\]"):
        assert_same_run("planted", reference, faulty)
    faulty = Outcome(results=reference.results, losses={(0, 1): ["1", "2"]})  # replayed with another loss
    with pytest.raises(RunsDiffer, match=r"losses differ at \(rank, step\) \[\(0, 1\)\]"):
        assert_same_run("planted", reference, faulty)
    assert_same_run("same", reference, Outcome(results=reference.results, losses={(0, 1): ["1", "1"]}))
