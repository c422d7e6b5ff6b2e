"""What a chaos trial must show: the faulty run is the reference run, and every fault is accounted for.

- The final state (the snapshot of the last step) is bitwise equal to the reference's when the
  placement never changed, and within the scenario's tolerance otherwise (the difference is
  reported either way, naming every array and JSON entry that differs: `moai_ckpt.tools.chaos.diff`).
- The job is reproducible from its start: both runs logged the same inputs for step 1 (else the
  report says which generator or input differs and what to seed).
- Every step was logged, and every sample was consumed exactly once per epoch.
- No snapshot known to be corrupt was ever restored (the replay reports name what each restart
  restored).
- Every injected fault fired, was detected, and the job recovered from it.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.errors import MoaiCkptError
from moai_ckpt.layout import REPORTS, is_replay_report, parse_log_segment, quarantine_key, snapshot_step_of
from moai_ckpt.tools.chaos.diff import diff_final, first_step, unused_generators
from moai_ckpt.tools.chaos.runner import RunOutcome
from moai_ckpt.tools.chaos.scenario import PLACEMENT_KINDS, Scenario
from replay.log import history


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Verdict:
    checks: list[Check] = field(default_factory=list)
    max_rel_diff: float | None = None
    differing: list[str] = field(default_factory=list)  # every entry of the final state that differs
    restored: list[dict[str, Any]] = field(default_factory=list)  # what each restart restored and replayed

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, ok, detail))


def _replay_reports(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(p for p in (run_dir / REPORTS).glob("*") if is_replay_report(p.name)):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        data["_time"] = path.stat().st_mtime
        out.append(data)
    return out


def check_samples(run_dir: Path, steps: int, excused: set[int] | None = None) -> tuple[bool, str]:
    """Every step logged once; every sample consumed exactly once per epoch (from the log).

    ``excused``: steps whose records the harness itself destroyed at rest in a log the run no
    longer needed (a later snapshot covers them): they cannot be checked, and are reported.
    """
    excused = excused or set()
    with Checkpointer(str(run_dir), local=True) as ckpt:
        records = history(ckpt.storage)
        data = None
        latest = ckpt.latest_step()
        if latest is not None:
            objects = ckpt.manifest(latest).objects
            data = objects["_data"].tree if "_data" in objects else None
    missing = sorted(set(range(1, steps + 1)) - set(records) - excused)
    if missing:
        return False, f"steps never logged: {missing[:10]}"
    unverifiable = sorted(set(range(1, steps + 1)) - set(records))
    if data is None or any(r.samples is None for r in records.values()):
        return True, f"{steps} steps logged once each (batches not indexable: no sample check)"
    n, batch = int(data["num_samples"]), int(data["global_batch_size"])
    per_epoch = n // batch if data.get("drop_last", True) else -(-n // batch)
    for epoch_start in range(1, steps + 1, per_epoch):
        span = [s for s in range(epoch_start, min(epoch_start + per_epoch, steps + 1)) if s in records]
        seen = [i for s in span for i in records[s].samples or []]
        if len(seen) != len(set(seen)):
            dup = len(seen) - len(set(seen))
            return False, f"{dup} samples consumed twice in the epoch starting at step {epoch_start}"
    epochs = -(-steps // per_epoch)
    note = (
        f" ({len(unverifiable)} steps' records destroyed at rest, unverifiable: {unverifiable})" if unverifiable else ""
    )
    return (
        True,
        f"{steps - len(unverifiable)} steps logged once each; no sample twice in any of {epochs} epoch(s){note}",
    )


def _destroyed_at_rest(run_dir: Path, target: str) -> set[int]:
    """The steps a bit flip in the log segment ``target`` took away: its own records and every later
    one of the same log, since a reader trusts nothing past damage (the run may never need them:
    a newer snapshot covers them)."""
    folder, _, name = target.rpartition("/")
    parsed = parse_log_segment(name)
    if parsed is None:
        return set()
    names: list[str] = []
    for where in (run_dir / folder, run_dir / quarantine_key(folder)):  # a restart may move it
        with contextlib.suppress(OSError):
            names += os.listdir(where)
    ends = [p[1] for p in map(parse_log_segment, names) if p is not None]
    return set(range(parsed[0], max([parsed[1], *ends]) + 1))


def judge(scenario: Scenario, reference: RunOutcome, faulty: RunOutcome) -> Verdict:
    verdict = Verdict()
    steps = scenario.steps
    if faulty.handed_off:
        verdict.add("handed off", False, "stopped for another machine: run the same command with the same --out there")
        return verdict
    resized = any(r.fault.kind in PLACEMENT_KINDS and r.fired_at is not None for r in faulty.faults)
    verdict.add(
        "finished", faulty.finished, f"{len(faulty.attempts)} attempt(s), {faulty.ended - faulty.started:.1f} s"
    )
    if not (faulty.finished and reference.finished):
        return verdict
    try:
        unused = unused_generators(reference.run_dir, faulty.run_dir)
        final = diff_final(reference.run_dir, faulty.run_dir, steps, exact=not resized, unused=unused)
        start = first_step(reference.run_dir, faulty.run_dir, unused)
    except MoaiCkptError as exc:
        verdict.add("final state", False, f"could not read the final snapshots or logs: {exc}")
        return verdict
    # a job that differs from its reference before any fault is not a finding about moai-ckpt: said first
    verdict.add("reproducible from its start", start.reproducible, start.detail)
    verdict.differing = final.names()
    if resized:
        rel = final.rel_l2 if final.rel_l2 is not None else 0.0
        verdict.max_rel_diff = rel
        verdict.add(
            "final state within tolerance",
            rel <= scenario.tolerance,
            f"{final.describe()} (tolerance {scenario.tolerance:g})",
        )
    else:
        worst = final.worst
        verdict.max_rel_diff = worst.rel if worst is not None else 0.0
        verdict.add("final state bitwise equal", final.equal, final.describe())
    excused: set[int] = set()
    for record in faulty.faults:
        if record.fault.kind == "corrupt_log" and record.target:
            excused |= _destroyed_at_rest(faulty.run_dir, record.target)
    ok, detail = check_samples(faulty.run_dir, steps, excused)
    verdict.add("samples exactly once", ok, detail)
    _check_restores(verdict, faulty)
    _check_accounting(verdict, faulty)
    if faulty.unplanned_failures:
        storage = any(r.fault.kind.startswith("storage") for r in faulty.faults)
        verdict.add(
            "no unplanned failure",
            storage,  # a storage fault may stop a job beyond its retries: that is recovered, not a bug
            f"{faulty.unplanned_failures} attempt(s) ended without a planned fault"
            + (" (storage faults in play)" if storage else ""),
        )
    return verdict


def _check_restores(verdict: Verdict, faulty: RunOutcome) -> None:
    corrupted: dict[int, float] = {}
    for record in faulty.faults:
        step = snapshot_step_of(record.target) if record.target else None
        if step is not None and record.fired_at is not None:
            corrupted[step] = record.fired_at
    reports = _replay_reports(faulty.run_dir)
    with Checkpointer(str(faulty.run_dir), local=True) as ckpt:
        committed = set(ckpt.steps())
        torn = {s for s in committed if s not in corrupted and not ckpt.verify(s).snapshot_ok}
        # a corrupted snapshot the job later wrote anew (a snapshot taken while replaying over its
        # step replaces it): restoring the new one after it was written is sound
        rewritten = {
            s: datetime.fromisoformat(ckpt.marker(s).body.created).timestamp()
            for s in committed & set(corrupted)
            if ckpt.verify(s).snapshot_ok
        }
    rewritten = {s: t for s, t in rewritten.items() if t > corrupted[s]}
    bad = []
    for report in reports:
        base = int(report["base_step"])
        verdict.restored.append(
            {
                "base": base,
                "first": report["first_step"],
                "last": report["last_step"],
                "time": report["_time"],
                "phases": report.get("recovery"),  # where the restart's time went (replay.check.RecoveryPhases)
            }
        )
        if report.get("from_initial_state"):
            continue  # nothing was restored: the job rebuilt step 0 and replayed the log
        sound_again = base in rewritten and report["_time"] > rewritten[base]
        if (base in corrupted and report["_time"] > corrupted[base] and not sound_again) or base in torn:
            bad.append(base)
    detail = f"{len(reports)} restart(s) restored steps {sorted({r['base'] for r in verdict.restored})}"
    if corrupted or torn:
        detail += f"; corrupt at rest: {sorted(corrupted) + sorted(torn)}"
    verdict.add("no corrupt snapshot restored", not bad, detail if not bad else f"restored corrupt snapshot(s) {bad}")
    for record in faulty.faults:
        if record.fault.kind == "corrupt_chunk" and record.target:
            step = int(record.target.split("/")[1])
            later = [r for r in reports if r["_time"] > (record.fired_at or 0)]
            if later and later[0].get("from_initial_state"):
                record.detected = f"restore refused step {step} (checksum); rebuilt step 0 and replayed the log"
            elif later and later[0]["base_step"] != step:
                record.detected = f"restore refused step {step} (checksum); restored step {later[0]['base_step']}"
            else:
                record.detected = "NOT detected"
        elif record.fault.kind == "corrupt_marker" and record.target:
            step = int(record.target.split("/")[1])
            with Checkpointer(str(faulty.run_dir), local=True) as ckpt:
                status = next((e.status for e in ckpt.scan() if e.step == step), "gone")
            record.detected = f"marker fails its checksum: step {step} is not a snapshot ({status} now)"
        elif record.fault.kind == "corrupt_log" and record.target:
            logs = "".join(
                Path(a.log).read_text(errors="replace") for a in faulty.attempts if a.started > (record.fired_at or 0)
            )
            record.detected = (
                "the restart set the damaged segment aside"
                if "the log is damaged" in logs
                else "the restart dropped it as a torn tail (checksum) and ran the step again"
                if "dropped a torn log tail" in logs and record.target in logs
                else "NOT detected"
            )


def _check_accounting(verdict: Verdict, faulty: RunOutcome) -> None:
    missing = []
    for record in faulty.faults:
        fired = record.fired_at is not None or record.count == -1
        if not fired:
            missing.append(f"{record.fault.describe()}: never fired")
        elif not record.detected or "NOT" in record.detected:
            missing.append(f"{record.fault.describe()}: not detected")
        elif record.fault.kind not in ("storage_latency",) and record.recovered_at is None:
            missing.append(f"{record.fault.describe()}: no recovery seen")
    n = len(faulty.faults)
    verdict.add(
        "every fault accounted for",
        not missing,
        f"{n} fault(s): each fired, detected and recovered from" if not missing else "; ".join(missing),
    )
