"""The end of a replay: its report sealed, summed up in the log, and written under ``reports/``."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from moai_ckpt.errors import MoaiCkptError
from moai_ckpt.layout import replay_report_key
from moai_ckpt.storage import Storage
from replay.check import ReplayReport, StepCheck

log = logging.getLogger("moai_ckpt.run")

__all__ = ["announce", "seal", "write"]


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


def write(storage: Storage, report: ReplayReport) -> None:
    """Keep the report in the run directory (a failure is worth a warning, not the run)."""
    if not report.steps:
        return
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    key = replay_report_key(stamp, report.base_step)
    try:
        storage.write(key, report.model_dump_json(indent=1).encode())
    except MoaiCkptError as exc:
        log.warning("could not write the replay report %s: %s", key, exc)
