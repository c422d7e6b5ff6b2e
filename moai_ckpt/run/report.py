"""The end of a replay or restart: its report sealed, summed up in the log, and written under ``reports/``.

A restart's report holds its phases (`replay.check.RecoveryPhases`): detection, process start,
process group, setup, restore (which tier, how many bytes) and replay (how many steps).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from moai_ckpt.errors import MoaiCkptError
from moai_ckpt.layout import replay_report_key
from moai_ckpt.storage import Storage
from replay.check import RecoveryPhases, ReplayReport, StepCheck

log = logging.getLogger("moai_ckpt.run")

__all__ = ["announce", "describe", "phases", "seal", "write"]


def seal(report: ReplayReport, checks: Iterable[StepCheck], replay_s: float, rng_skipped: Iterable[str]) -> None:
    """Fill in what the replay checked: the steps, how long it took, the generators it could not set."""
    report.steps = list(checks)
    report.last_step = report.base_step + len(report.steps)
    report.replay_s = replay_s
    report.rng_not_restored = sorted(rng_skipped)


def announce(report: ReplayReport) -> None:
    """One line in the log: every step bitwise equal, or the largest drift on a changed placement."""
    if report.strict:
        log.info("replayed %d steps in %.2f s: every step bitwise equal to the log", report.replayed, report.replay_s)
        return
    drift = report.max_drift()
    log.warning(
        "replayed %d steps on a changed placement (%s) in %.2f s; largest drift: loss %.3g, "
        "grad norm %.3g, parameter norm %.3g (relative)",
        report.replayed,
        "; ".join(report.placement_changes),
        report.replay_s,
        drift["loss_rel"],
        drift["grad_norm_rel"],
        drift["state_rel"],
    )


def phases(recovery: RecoveryPhases) -> None:
    """One line in the log: where the restart's time went."""
    log.info("restart: %s", describe(recovery))


def describe(recovery: RecoveryPhases) -> str:
    """The phases of a restart in one line (unmeasured ones left out)."""

    def seconds(value: float | None) -> str | None:
        return None if value is None else f"{value:.2f} s"

    parts = [
        ("detection", seconds(recovery.detection_s)),
        ("process start", seconds(recovery.start_s)),
        ("process group", seconds(recovery.process_group_s)),
        ("setup", seconds(recovery.setup_s)),
        (
            "restore",
            f"{recovery.restore_s:.2f} s from the {recovery.restore_tier} tier ({recovery.restore_bytes / 1e6:.1f} MB)",
        ),
        ("replay", f"{recovery.replayed_steps} steps in {recovery.replay_s:.2f} s"),
        ("start to live", seconds(recovery.total_s)),
    ]
    return "; ".join(f"{name} {value}" for name, value in parts if value is not None)


def write(storage: Storage, report: ReplayReport) -> None:
    """Keep the report in the run directory (a failure is worth a warning, not the run)."""
    if not report.steps and report.recovery is None:
        return
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    key = replay_report_key(stamp, report.base_step)
    try:
        storage.write(key, report.model_dump_json(indent=1).encode())
    except MoaiCkptError as exc:
        log.warning("could not write the replay report %s: %s", key, exc)
