"""The chaos harness: run a training job with faults injected on a seeded schedule and prove that
it ends as the fault-free run does.

    from moai_ckpt.tools.chaos import Scenario, run_trials
    summary = run_trials(Scenario.load("smoke"), "chaos_out", seed=0, trials=3)
    assert all(t.ok for t in summary.trials)

From the command line: ``moai-ckpt chaos run smoke --trials 3``.
"""

from __future__ import annotations

import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console

from moai_ckpt.errors import ChaosError
from moai_ckpt.tools.chaos.oracle import Verdict, judge
from moai_ckpt.tools.chaos.report import (
    Summary,
    TrialReport,
    checks_table,
    draw_timeline,
    faults_table,
    restarts_table,
    write,
)
from moai_ckpt.tools.chaos.runner import HANDOFF, RunOutcome, Trial
from moai_ckpt.tools.chaos.scenario import BUILTIN, DEMO_ENTRYPOINT, KINDS, PHASES, Fault, Scenario

__all__ = [
    "BUILTIN",
    "KINDS",
    "PHASES",
    "ChaosError",
    "Fault",
    "RunOutcome",
    "Scenario",
    "Summary",
    "TrialReport",
    "Verdict",
    "run_trial",
    "run_trials",
]


def _identity(scenario: Scenario) -> dict[str, object]:
    """The scenario, as two machines compare it (the bundled demo by its role, as earlier releases named it)."""
    fields = scenario.model_dump(mode="json")
    if fields["entrypoint"] == DEMO_ENTRYPOINT:
        fields["entrypoint"] = "demo"
    return fields


def _reference(scenario: Scenario, out_dir: Path, quiet: bool) -> RunOutcome:
    """The fault-free run. A handed-off trial is judged against the reference its first machine ran."""
    finished = out_dir / "reference" / "finished.json"
    pending = any(out_dir.glob(f"seed-*/faulty/{HANDOFF}")) and finished.exists()
    if pending and json.loads(finished.read_text())["scenario"] == _identity(scenario):
        run_dir = out_dir / "reference" / "run"
        return RunOutcome(run_dir=run_dir, storage=str(run_dir), finished=True)
    reference = Trial(scenario, out_dir, seed=0, quiet=quiet).run("reference", [])
    if not reference.finished:
        logs = [a.log for a in reference.attempts]
        raise ChaosError(f"the fault-free reference run did not finish; its output: {logs}")
    finished.write_text(json.dumps({"scenario": _identity(scenario)}))
    return reference


def run_trial(
    scenario: Scenario, out_dir: str | Path, seed: int, *, reference: RunOutcome | None = None, quiet: bool = False
) -> TrialReport:
    """One trial: the reference (unless given), then the faulty run, then the checks."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if reference is None:
        reference = _reference(scenario, out, quiet)
    trial_dir = out / f"seed-{seed}"
    if not (trial_dir / "faulty" / HANDOFF).exists():  # else: continue what another machine began
        shutil.rmtree(trial_dir, ignore_errors=True)
    drawn = scenario.draw(seed)
    if not quiet:
        print(f"seed {seed}: " + "; ".join(f.describe() for f in drawn), file=sys.stderr, flush=True)
    faulty = Trial(scenario, trial_dir, seed, quiet=quiet).run("faulty", drawn)
    report = TrialReport(scenario, seed, reference, faulty, judge(scenario, reference, faulty))
    report.timeline = draw_timeline(report, trial_dir / "timeline.png")
    return report


def run_trials(
    scenario: Scenario,
    out_dir: str | Path,
    *,
    seed: int = 0,
    trials: int = 1,
    console: Console | None = None,
    random_faults: int | None = None,
    jobs: int = 1,
) -> Summary:
    """``trials`` trials with seeds ``seed``, ``seed + 1``, ... sharing one reference run.

    With ``random_faults`` each trial draws that many faults of random kinds (its own seed).
    ``jobs`` trials run at once (each is its own set of processes; recovery times grow with the
    load this puts on the machine).
    """
    console = console or Console(stderr=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    quiet = trials > 1
    with console.status("reference run (no faults)"):
        reference = _reference(scenario, out, quiet=True)
    summary = Summary(scenario)
    seeds = [seed + i for i in range(trials)]

    def one(s: int) -> TrialReport:
        trial_scenario = scenario.with_random_faults(random_faults, s) if random_faults else scenario
        return run_trial(trial_scenario, out, s, reference=reference, quiet=quiet)

    with console.status(f"{trials} trial(s), {min(jobs, trials)} at a time"), ThreadPoolExecutor(jobs) as pool:
        for done, report in enumerate(pool.map(one, seeds), 1):
            summary.trials.append(report)
            mark = "[green]ok[/]" if report.ok else "[bold red]FAILED[/]"
            faults = ", ".join(r.fault.describe() for r in report.faulty.faults)
            console.print(f"trial {done}/{trials}, seed {report.seed}: {mark}  {faults}")
            if trials == 1 or not report.ok:
                console.print(faults_table(report))
                console.print(checks_table(report))
                console.print(restarts_table(report))
    write(summary, out, console)
    return summary
