"""``moai-ckpt restore`` and ``moai-ckpt replay``: snapshot + op-stream log, replayed offline.

Both re-run the run's training function in a session (`moai_ckpt.cli.sessions`). ``restore``
then commits the state at the target step as a new snapshot that a relaunch starts from;
``replay --verify`` writes nothing and reports determinism step by step; ``replay`` alone lists
what a restart would replay. When the target step is a snapshot itself nothing is replayed and
no code runs: ``restore`` verifies the snapshot and copies it (``--to``) from its data alone.
Which function runs is `moai_ckpt.cli.code`'s decision.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.markup import escape

from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.cli.base import JsonOpt, StorageOpt, UrlArg, command, echo_json, err, new_table, open_run, out, shown_url
from moai_ckpt.cli.code import CodeChoice, EntryOpt, KwargEnvOpt, KwargOpt, TrustOpt, choose_code
from moai_ckpt.cli.ops import capture_after_divergence, print_diff, replay_ops
from moai_ckpt.cli.sessions import DeviceOpt, ReplayPlan, TargetOpt, WorldOpt, announce, run_session
from moai_ckpt.cli.terminal import ProgressOpt, bytes_progress, print_table, snapshot_bytes
from moai_ckpt.errors import ChecksumError
from moai_ckpt.layout import RUN_INFO
from moai_ckpt.run.session import Session
from replay.check import ReplayReport, StepCheck
from replay.log import Placement, records_after

__all__ = ["replay_run", "restore_run"]

# -- nothing to replay: from the data alone --------------------------------------------------------


def _restore_from_data(plan: ReplayPlan, to: str | None, show: bool | None = None) -> ReplayReport:
    """The target is a snapshot: verify it and, with ``to``, copy it there (marker last). No code runs."""
    started = time.perf_counter()
    with open_run(plan.url, plan.storage_option) as source:
        _verified(source, plan.base, show)
        checked = time.perf_counter() - started
        copied = time.perf_counter()
        if to is not None:
            # like the session's target: opened with default options (-o is for URL only)
            with Checkpointer(to, local=True) as target:
                if target.url != source.url:
                    _copy_snapshot(source, target, plan.base, show)
    placement = Placement()
    return ReplayReport(
        base_step=plan.base,
        first_step=plan.base + 1,
        last_step=plan.base,
        logged_last_step=plan.logged_last,
        strict=True,
        placement_now=placement,
        log_problem=plan.problem,
        restore_s=checked,
        snapshot_s=time.perf_counter() - copied if to is not None else 0.0,
    )


def _verified(ckpt: Checkpointer, step: int, show: bool | None = None) -> None:
    with bytes_progress(f"verify step {step}", snapshot_bytes(ckpt, step), show) as advance:
        report = ckpt.verify(step, progress=advance)
    if not report.ok:
        first = report.faults[0]
        raise ChecksumError(
            f"the snapshot fails verification ({len(report.faults)} fault(s), first: {first.message})",
            url=ckpt.url,
            step=step,
        )


def _copy_snapshot(source: Checkpointer, target: Checkpointer, step: int, show: bool | None = None) -> None:
    """Copy a verified snapshot, fenced and verified (`Checkpointer.copy_snapshot`), and run.json."""
    with bytes_progress(f"copy step {step}", snapshot_bytes(source, step), show) as advance:
        target.copy_snapshot(source, step, progress=advance)
    if source.storage.exists(RUN_INFO) and not target.storage.exists(RUN_INFO):
        target.storage.write(RUN_INFO, source.storage.read_record(RUN_INFO))


def _fmt(x: float | None, spec: str = ".6g") -> str:
    return "-" if x is None else format(x, spec)


def _verdict(check: StepCheck, strict: bool) -> str:
    if check.bitwise:
        return "[green]bitwise[/]"
    return f"[bold red]DIVERGED[/] ({check.first})" if strict else f"[yellow]drift[/] ({check.first})"


def _steps_table(report: ReplayReport, strict: bool, limit: int = 40) -> Any:
    table = new_table(f"steps {report.first_step}..{report.last_step}: logged against replayed")
    for name in ("step", "loss logged", "loss replayed", "loss rel", "grad norm rel", "param norm rel"):
        table.add_column(name, justify="right")
    table.add_column("check")
    steps = report.steps
    shown = steps if len(steps) <= limit else [*steps[: limit // 2], *steps[-limit // 2 :]]
    for i, check in enumerate(shown):
        if len(steps) > limit and i == limit // 2:
            table.add_row("...", "", "", "", "", "", f"{len(steps) - limit} more")
        table.add_row(
            str(check.step),
            _fmt(check.loss_logged),
            _fmt(check.loss_replayed),
            _fmt(check.loss_rel, ".2e"),
            _fmt(check.grad_norm_rel, ".2e"),
            _fmt(check.state_rel, ".2e"),
            _verdict(check, strict),
        )
    return table


def _summary_table(report: ReplayReport, plan: ReplayPlan, restored_to: str | None, title: str) -> Any:
    table = new_table(title, show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    bitwise = sum(1 for s in report.steps if s.bitwise)
    table.add_row("snapshot restored", f"step {report.base_step} ({report.restore_s:.2f} s)")
    if not plan.needs_code:
        table.add_row("steps replayed", f"none: step {plan.target} is a snapshot (verified); no training code ran")
    else:
        span = f"{report.first_step}..{report.last_step}" if report.steps else "none"
        table.add_row("steps replayed", f"{report.replayed} (steps {span}) in {report.replay_s:.2f} s")
    if report.placement_changes:
        table.add_row("placement", "changed: " + "; ".join(report.placement_changes))
    drift = report.max_drift()
    if plan.needs_code:
        checks = f"{bitwise}/{report.replayed} bitwise equal to the log"
        if not report.bitwise:
            checks += f"; largest drift: loss {drift['loss_rel']:.2e}, parameter norm {drift['state_rel']:.2e}"
        table.add_row("digest checks", checks)
    if report.rng_not_restored:
        table.add_row("RNG not restored", ", ".join(report.rng_not_restored))
    if plan.problem:
        table.add_row("log", f"[yellow]damaged[/]: {escape(plan.problem)}")
    if restored_to is not None:
        where = escape(shown_url(restored_to))
        if plan.needs_code or restored_to != plan.url:
            table.add_row("committed", f"snapshot of step {report.last_step} in {where} ({report.snapshot_s:.2f} s)")
        else:
            table.add_row("committed", f"nothing new: the snapshot of step {report.last_step} is in {where}")
    return table


@command("restore")
def restore_run(
    url: UrlArg,
    step: TargetOpt = None,
    to: Annotated[str | None, typer.Option("--to", help="Commit the restored state to this run directory.")] = None,
    world_size: WorldOpt = 1,
    device: DeviceOpt = None,
    entrypoint: EntryOpt = None,
    trust_run_json: TrustOpt = False,
    kwarg: KwargOpt = None,
    kwarg_env: KwargEnvOpt = None,
    as_json: JsonOpt = False,
    show_progress: ProgressOpt = None,
    storage_option: StorageOpt = None,
) -> None:
    """Materialize the state at the last logged step: snapshot + replay, committed as a snapshot.

    A relaunch of the job then starts from that step with nothing to replay. When the step is a
    snapshot itself, nothing is replayed and no code runs: the snapshot is verified (and copied
    with --to).
    """
    started = time.perf_counter()
    choice = CodeChoice.of(entrypoint, trust_run_json, kwarg, kwarg_env)
    plan = ReplayPlan(url, storage_option, step)
    if plan.needs_code:
        code = choose_code(plan, choice)
        announce(plan, code, "restoring")
        session = Session(mode="restore", storage=url, step=plan.target, to=to, progress=True)
        report = run_session(plan, code, session, world_size, device, show_progress)
    else:
        err.print(f"step {plan.target} is a snapshot: nothing to replay, no training code runs", style="dim")
        report = _restore_from_data(plan, to, show_progress)
    elapsed = time.perf_counter() - started
    where = shown_url(to or plan.url)
    if as_json:
        echo_json({"report": json.loads(report.model_dump_json()), "elapsed_s": elapsed, "to": where})
        return
    print_table(_summary_table(report, plan, to or plan.url, "restore"))
    if report.steps and (not report.bitwise or report.replayed <= 12):
        print_table(_steps_table(report, report.strict))
    out.print(f"done in {elapsed:.2f} s; a relaunch on {escape(where)} starts at step {report.last_step + 1}")


@command("replay")
def replay_run(
    url: UrlArg,
    verify: Annotated[
        bool, typer.Option("--verify", help="Re-run the logged steps and report determinism per step.")
    ] = False,
    ops: Annotated[
        bool, typer.Option("--ops", help="Re-execute the captured steps from their op stream, without the code.")
    ] = False,
    save_capture: Annotated[
        bool, typer.Option("--save-capture", help="With --ops: store each replayed step as a capture, for diff-ops.")
    ] = False,
    step: TargetOpt = None,
    world_size: WorldOpt = 1,
    device: DeviceOpt = None,
    entrypoint: EntryOpt = None,
    trust_run_json: TrustOpt = False,
    kwarg: KwargOpt = None,
    kwarg_env: KwargEnvOpt = None,
    as_json: JsonOpt = False,
    show_progress: ProgressOpt = None,
    storage_option: StorageOpt = None,
) -> None:
    """Show what a restart would replay, or (--verify) re-run it and compare every step with the log.

    Exit code 1 when a step differs on the placement and device type that wrote the log.
    """
    if ops:
        replay_ops(url, step, device, None, as_json, storage_option, save=save_capture)
        return
    choice = CodeChoice.of(entrypoint, trust_run_json, kwarg, kwarg_env)
    plan = ReplayPlan(url, storage_option, step)
    if not verify:
        _show_log(plan, storage_option, as_json)
        return
    if not plan.needs_code:
        _nothing_to_verify(plan, as_json)
        return
    code = choose_code(plan, choice)
    announce(plan, code, "verifying")
    session = Session(mode="verify", storage=url, step=plan.target, progress=True)
    report = run_session(plan, code, session, world_size, device, show_progress)
    strict = not report.placement_changes
    if as_json:
        echo_json(json.loads(report.model_dump_json()))
    else:
        print_table(_summary_table(report, plan, None, "replay --verify"))
        if report.steps:
            print_table(_steps_table(report, strict))
        first = report.first_divergence()
        if first is not None and strict:
            out.print(f"[bold red]non-deterministic:[/] {first.describe()}")
        elif report.steps:
            out.print("[green]deterministic:[/] every replayed step matches its record bitwise" if strict else "")
    first_diverged = report.first_divergence()
    if first_diverged is not None and not as_json:  # re-run that step under op capture: which op?
        diff = capture_after_divergence(url, first_diverged.step, world_size, device, code, storage_option)
        if diff is not None:
            print_diff(diff)
    if strict and not report.bitwise:
        raise typer.Exit(1)


def _nothing_to_verify(plan: ReplayPlan, as_json: bool) -> None:
    """``replay --verify`` of a step that is a snapshot: no step to re-run, no code runs."""
    if as_json:
        report = ReplayReport(
            base_step=plan.base,
            first_step=plan.base + 1,
            last_step=plan.base,
            logged_last_step=plan.logged_last,
            strict=True,
            placement_now=Placement(),
            log_problem=plan.problem,
        )
        echo_json(json.loads(report.model_dump_json()))
        return
    out.print(f"nothing to verify: step {plan.target} is a snapshot, no logged step leads to it")


def _show_log(plan: ReplayPlan, storage_option: list[str] | None, as_json: bool) -> None:
    with open_run(plan.url, storage_option) as ckpt:
        contents = records_after(ckpt.storage, plan.base)
    records = [r for r in contents.records if r.step <= plan.target]
    if as_json:
        echo_json(
            {
                "base_step": plan.base,
                "last_step": plan.target,
                "records": [json.loads(r.model_dump_json()) for r in records],
                "problem": plan.problem,
            }
        )
        return
    out.print(f"log after the snapshot of step {plan.base}: a restart replays {len(records)} steps", soft_wrap=True)
    table = new_table("")
    for name in ("step", "samples", "loss", "grad norm", "lr", "placement"):
        table.add_column(name, justify="right" if name != "placement" else "left")
    for r in records:
        lr = next((v for k, v in sorted(r.hparams.items()) if k.endswith(".lr")), None)
        placement = contents.placement(r.step)
        where = f"{placement.world_size}x {placement.device_name or placement.device_type}" if placement else "-"
        where = escape(where)  # names read from storage: never markup
        samples = str(len(r.samples)) if r.samples is not None else ("batch" if r.batch else "-")
        table.add_row(str(r.step), samples, _fmt(r.digests.loss), _fmt(r.digests.grad_norm), _fmt(lr), where)
    print_table(table)
    if plan.problem:
        out.print(f"[yellow]the log is damaged:[/] {escape(plan.problem)}")
