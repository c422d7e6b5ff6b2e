"""Chaos reports: JSON for machines, a table for people, a timeline picture of each trial."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from moai_ckpt.tools.chaos.oracle import Verdict
from moai_ckpt.tools.chaos.runner import RunOutcome
from moai_ckpt.tools.chaos.scenario import Scenario
from moai_ckpt.tools.restarts import PHASES, phases_table


@dataclass
class TrialReport:
    """One trial: the faults as drawn, what happened to each, the checks."""

    scenario: Scenario
    seed: int
    reference: RunOutcome
    faulty: RunOutcome
    verdict: Verdict
    timeline: str | None = None

    @property
    def ok(self) -> bool:
        return self.verdict.ok

    def assert_ok(self) -> None:
        """Raise AssertionError listing the failed checks and the faults, if any check failed."""
        if self.ok:
            return
        failed = [f"{c.name}: {c.detail}" for c in self.verdict.checks if not c.ok]
        faults = [f"{r.fault.describe()} -> {r.detected or 'not detected'}" for r in self.faulty.faults]
        logs = [a.log for a in self.faulty.attempts]
        raise AssertionError(
            f"chaos trial (seed {self.seed}) failed: " + "; ".join(failed) + f". Faults: {faults}. Logs: {logs}"
        )

    def to_json(self) -> dict[str, Any]:
        t0 = self.faulty.started
        return {
            "scenario": self.scenario.name,
            "seed": self.seed,
            "ok": self.ok,
            "ranks": self.scenario.ranks,
            "steps": self.scenario.steps,
            "reference_s": self.reference.ended - self.reference.started,
            "faulty_s": self.faulty.ended - self.faulty.started,
            "attempts": [
                {
                    "number": a.number,
                    "world_size": a.world_size,
                    "start_s": a.started - t0,
                    "end_s": a.ended - t0,
                    "returncode": a.returncode,
                    "stalled": a.stalled,
                }
                for a in self.faulty.attempts
            ],
            "faults": [
                {
                    **r.fault.model_dump(exclude_none=True),
                    "description": r.fault.describe(),
                    "fired_s": None if r.fired_at is None else r.fired_at - t0,
                    "fired_step": r.fired_step,
                    "fired_rank": r.fired_rank,
                    "target": r.target,
                    "calls_hit": r.count if r.count >= 0 else None,
                    "detected": r.detected,
                    "recovery_s": r.recovery_s,
                }
                for r in self.faulty.faults
            ],
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.verdict.checks],
            "max_rel_diff": self.verdict.max_rel_diff,
            "differing": self.verdict.differing,
            "restored": [{**r, "time": r["time"] - t0} for r in self.verdict.restored],
            "progress": [[t - t0, s] for t, s in self.faulty.progress],
            "timeline": self.timeline,
        }


def faults_table(report: TrialReport) -> Table:
    table = Table(title=f"faults (seed {report.seed})", title_justify="left", box=box.SIMPLE_HEAD)
    for name, justify in (("fault", "left"), ("fired", "right"), ("detected by", "left"), ("recovery", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    t0 = report.faulty.started
    for r in report.faulty.faults:
        fired = "-" if r.fired_at is None else f"{r.fired_at - t0:.1f} s"
        if r.fired_step is not None:
            fired += f", step {r.fired_step}"
        if r.count > 0:
            fired += f", {r.count} calls"
        recovery = "-" if r.recovery_s is None else f"{r.recovery_s:.1f} s"
        detected = r.detected or "[red]not detected[/]"
        table.add_row(r.fault.describe(), fired, detected, recovery)
    return table


def restart_phases(report: TrialReport) -> list[dict[str, Any]]:
    """The phases of each restart of the faulty run that wrote a report, oldest first."""
    return [{"base": r["base"], **r["phases"]} for r in report.verdict.restored if isinstance(r.get("phases"), dict)]


def restarts_table(report: TrialReport) -> Table:
    """One row per restart of the trial: where its time went (`moai_ckpt.tools.restarts`)."""
    return phases_table(restart_phases(report))


def phase_medians(trials: list[TrialReport]) -> dict[str, Any]:
    """Over every restart of ``trials``: the median of each phase, the tiers restored from, the steps replayed."""
    phases = [p for t in trials for p in restart_phases(t)]
    out: dict[str, Any] = {"restarts": len(phases)}
    for _, key in PHASES:
        values = [p[key] for p in phases if p.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    tiers: dict[str, int] = {}
    for p in phases:
        tiers[str(p.get("restore_tier"))] = tiers.get(str(p.get("restore_tier")), 0) + 1
    out["tiers"] = tiers
    out["replayed_steps_max"] = max((int(p.get("replayed_steps", 0)) for p in phases), default=None)
    return out


def checks_table(report: TrialReport) -> Table:
    table = Table(title="checks", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("check")
    table.add_column("")
    table.add_column("detail")
    for c in report.verdict.checks:
        table.add_row(c.name, "[green]ok[/]" if c.ok else "[bold red]FAILED[/]", c.detail)
    return table


def draw_timeline(report: TrialReport, path: Path) -> str | None:
    """Steps over wall time, one colour per attempt; faults, restarts and replays marked."""
    try:  # the object API, not pyplot: trials may draw from several threads at once
        from matplotlib import colormaps
        from matplotlib.figure import Figure
    except ImportError:
        return None
    faulty, t0 = report.faulty, report.faulty.started
    fig = Figure(figsize=(10, 4.8), dpi=110)
    ax = fig.add_subplot()
    ref = report.reference
    ax.plot(
        [t - ref.started for t, _ in ref.progress],
        [s for _, s in ref.progress],
        color="0.75",
        lw=1.2,
        label="reference run",
    )
    colors = colormaps["tab10"]
    for i, attempt in enumerate(faulty.attempts):
        points = [(t - t0, s) for t, s in faulty.progress if attempt.started <= t <= attempt.ended + 0.5]
        label = f"attempt {attempt.number} ({attempt.world_size} rank{'s' if attempt.world_size > 1 else ''})"
        if points:
            ax.plot(
                [p[0] for p in points], [p[1] for p in points], ".-", ms=2.5, lw=1.2, color=colors(i % 10), label=label
            )
        ax.axvline(attempt.started - t0, color=colors(i % 10), lw=0.6, ls=":")
    for restored in report.verdict.restored:
        start = restored["time"] - t0
        ax.fill_betweenx(
            [restored["base"], restored["last"]], start - 0.15, start + 0.15, color="tab:purple", alpha=0.35
        )
        ax.annotate(
            f"restore {restored['base']}, replay to {restored['last']}",
            (start, restored["last"]),
            fontsize=7,
            color="tab:purple",
            xytext=(3, 3),
            textcoords="offset points",
        )
    top = max([s for _, s in faulty.progress] + [report.scenario.steps])
    for r in faulty.faults:
        if r.fired_at is None:
            continue
        x = r.fired_at - t0
        ax.axvline(x, color="tab:red", lw=0.9)
        label = r.fault.kind + (
            f" {r.recovery_s:.1f}s" if r.recovery_s is not None and r.fault.kind[:7] != "storage" else ""
        )
        ax.text(x, top * 1.02, label, rotation=90, fontsize=7, color="tab:red", va="bottom", ha="right")
    ax.set_xlabel("wall time of the faulty run (s)")
    ax.set_ylabel("last step logged")
    verdict = "all checks passed" if report.ok else "CHECKS FAILED"
    ax.set_title(f"chaos scenario '{report.scenario.name}', seed {report.seed}: {verdict}", fontsize=10)
    ax.set_ylim(0, top * 1.25)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.25)
    fig.tight_layout()
    fig.savefig(path)
    return str(path)


@dataclass
class Summary:
    """Many trials of one scenario."""

    scenario: Scenario
    trials: list[TrialReport] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        recoveries = self.recoveries()
        by_kind: dict[str, int] = {}
        for t in self.trials:
            for r in t.faulty.faults:
                by_kind[r.fault.kind] = by_kind.get(r.fault.kind, 0) + 1
        return {
            "scenario": self.scenario.name,
            "trials": len(self.trials),
            "passed": sum(t.ok for t in self.trials),
            "faults_by_kind": by_kind,
            "recovery_s": {
                "median": statistics.median(recoveries) if recoveries else None,
                "worst": max(recoveries) if recoveries else None,
                "count": len(recoveries),
            },
            "restart_phases": phase_medians(self.trials),
            "failed_seeds": [t.seed for t in self.trials if not t.ok],
            "results": [t.to_json() for t in self.trials],
        }

    def recoveries(self) -> list[float]:
        return [
            r.recovery_s
            for t in self.trials
            for r in t.faulty.faults
            if r.recovery_s is not None and not r.fault.kind.startswith("storage")
        ]

    def table(self) -> Table:
        data = self.to_json()
        table = Table(
            title=f"chaos: {self.scenario.name}", title_justify="left", box=box.SIMPLE_HEAD, show_header=False
        )
        table.add_column("")
        table.add_column("")
        passed = data["passed"] == data["trials"]
        table.add_row("trials passed", f"[{'green' if passed else 'red'}]{data['passed']}/{data['trials']}[/]")
        table.add_row("faults by kind", ", ".join(f"{k} {v}" for k, v in sorted(data["faults_by_kind"].items())))
        rec = data["recovery_s"]
        if rec["count"]:
            table.add_row(
                "recovery (restart to live)",
                f"median {rec['median']:.1f} s, worst {rec['worst']:.1f} s, {rec['count']} faults",
            )
        phases = data["restart_phases"]
        if phases["restarts"]:
            medians = ", ".join(f"{name} {phases[key]:.2f} s" for name, key in PHASES if phases.get(key) is not None)
            table.add_row(f"restart phases (median of {phases['restarts']})", medians)
            tiers = ", ".join(f"{tier} {n}" for tier, n in sorted(phases["tiers"].items()))
            table.add_row("restored from", f"{tiers}; at most {phases['replayed_steps_max']} steps replayed")
        if data["failed_seeds"]:
            table.add_row("failed seeds", ", ".join(map(str, data["failed_seeds"])))
        return table


def write(summary: Summary, out_dir: Path, console: Console) -> Path:
    path = out_dir / "report.json"
    path.write_text(json.dumps(summary.to_json(), indent=1))
    console.print(summary.table())
    return path
