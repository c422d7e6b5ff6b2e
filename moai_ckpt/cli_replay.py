"""``moai-ckpt restore`` and ``moai-ckpt replay``: snapshot + op-stream log, replayed offline.

Both re-run the run's training function (named in ``run.json``, or ``--entrypoint``) in a
session (`moai_ckpt.session.Session`): it restores the newest snapshot at or before the target,
replays the logged steps with their digests checked, and stops at the target step. ``restore``
then commits the state there as a new snapshot that a relaunch starts from; ``replay --verify``
writes nothing and reports determinism step by step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moai_ckpt import session as sessions
from moai_ckpt.cli import JsonOpt, StorageOpt, UrlArg, _command, _echo_json, _open, _table, err, out
from moai_ckpt.errors import MoaiCkptError, SnapshotNotFoundError
from moai_ckpt.format import RUN_INFO, RunInfo
from moai_ckpt.session import EntrypointError, Session
from replay.check import ReplayReport, StepCheck
from replay.log import records_after

EntryOpt = Annotated[
    str | None,
    typer.Option(
        "--entrypoint",
        "-e",
        metavar="MODULE:FUNCTION",
        help="The fault_tolerant training function to re-run (default: the one run.json records); "
        "a module path or a file.py path.",
    ),
]
WorldOpt = Annotated[
    int, typer.Option("--world-size", "-w", min=1, help="Ranks to replay on (several: started with torchrun).")
]
DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", "-d", help="cpu or cuda: where run.device puts the model (default: cuda if present)."),
]
TargetOpt = Annotated[
    int | None, typer.Option("--step", "-s", min=0, help="The step to reach (default: the last logged step).")
]


class ReplayPlan:
    """What a session will do, read from the run directory before anything runs."""

    def __init__(self, url: str, storage_option: list[str] | None, step: int | None, entrypoint: str | None) -> None:
        with _open(url, storage_option) as ckpt:
            snapshots = [s for s in ckpt.steps() if step is None or s <= step]
            if not snapshots:
                raise SnapshotNotFoundError(
                    "no committed snapshot" + (f" at or before step {step}" if step is not None else ""), url=ckpt.url
                )
            self.base = snapshots[-1]
            contents = records_after(ckpt.storage, self.base)
            self.logged_last = contents.last_step
            self.problem = str(contents.corruption) if contents.corruption is not None else None
            self.target = self.logged_last if step is None else step
            if self.target > self.logged_last:
                raise SnapshotNotFoundError(
                    f"step {self.target} is past the end of the log after snapshot {self.base} "
                    f"(it ends at step {self.logged_last})",
                    url=ckpt.url,
                )
            info = RunInfo.model_validate_json(ckpt.storage.read(RUN_INFO)) if ckpt.storage.exists(RUN_INFO) else None
            self.url = ckpt.url
        entry = (info.entry if info is not None else None) or {}
        self.function: str | None = entrypoint or entry.get("function")
        self.args = entry.get("args") if not entrypoint else None
        self.kwargs = entry.get("kwargs") if not entrypoint else None
        self.cwd = entry.get("cwd")


def _run_session(plan: ReplayPlan, session: Session, world_size: int, device: str | None) -> ReplayReport:
    """Run the training function under ``session``: in this process, or on ``world_size`` ranks."""
    if not plan.function:
        raise EntrypointError(
            "run.json names no training function (the run was not made by fault_tolerant, or its function "
            "could not be located); pass --entrypoint module:function",
            url=plan.url,
        )
    env = dict(session.to_env())
    if device is not None:
        if device not in ("cpu", "cuda"):
            raise typer.BadParameter("expected cpu or cuda", param_hint="'--device'")
        env[sessions.DEVICE_ENV] = device
    with tempfile.TemporaryDirectory(prefix="moai-session-") as scratch:
        report_path = os.path.join(scratch, "report.json")
        env[sessions.ENV] = session.model_copy(update={"report": report_path}).model_dump_json()
        if world_size == 1:
            _in_process(plan, env, session.mode)
        else:
            _with_torchrun(plan, env, world_size)
        if not os.path.exists(report_path):
            raise MoaiCkptError("the training function returned without reaching the target step", url=plan.url)
        with open(report_path) as f:
            return ReplayReport.model_validate_json(f.read())


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _in_process(plan: ReplayPlan, env: dict[str, str], mode: str) -> None:
    assert plan.function is not None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with _environment(env), Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(f"{mode}: replaying from step {plan.base}", total=plan.target - plan.base)
        sessions.on_progress(lambda step, target: progress.update(task, completed=step - plan.base))
        try:
            sessions.call(plan.function, plan.args, plan.kwargs)
        finally:
            sessions.on_progress(None)


def _with_torchrun(plan: ReplayPlan, env: dict[str, str], world_size: int) -> None:
    assert plan.function is not None
    call = json.dumps({"args": plan.args, "kwargs": plan.kwargs})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={world_size}",
        "-m",
        "moai_ckpt.session",
        plan.function,
        call,
    ]
    err.print(f"starting {world_size} ranks with torchrun", style="dim")
    result = subprocess.run(cmd, env={**os.environ, **env, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if result.returncode != 0:
        raise MoaiCkptError(f"the replay ranks failed (torchrun exit code {result.returncode}); see their output above")


def _fmt(x: float | None, spec: str = ".6g") -> str:
    return "-" if x is None else format(x, spec)


def _verdict(check: StepCheck, strict: bool) -> str:
    if check.bitwise:
        return "[green]bitwise[/]"
    return f"[bold red]DIVERGED[/] ({check.first})" if strict else f"[yellow]drift[/] ({check.first})"


def _steps_table(report: ReplayReport, strict: bool, limit: int = 40) -> Any:
    table = _table(f"steps {report.first_step}..{report.last_step}: logged against replayed")
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
    table = _table(title, show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    bitwise = sum(1 for s in report.steps if s.bitwise)
    table.add_row("snapshot restored", f"step {report.base_step} ({report.restore_s:.2f} s)")
    span = f"{report.first_step}..{report.last_step}" if report.steps else "none"
    table.add_row("steps replayed", f"{report.replayed} (steps {span}) in {report.replay_s:.2f} s")
    if report.placement_changes:
        table.add_row("placement", "changed: " + "; ".join(report.placement_changes))
    drift = report.max_drift()
    checks = f"{bitwise}/{report.replayed} bitwise equal to the log"
    if not report.bitwise:
        checks += f"; largest drift: loss {drift['loss_rel']:.2e}, parameter norm {drift['state_rel']:.2e}"
    table.add_row("digest checks", checks)
    if report.rng_not_restored:
        table.add_row("RNG not restored", ", ".join(report.rng_not_restored))
    if plan.problem:
        table.add_row("log", f"[yellow]damaged[/]: {plan.problem}")
    if restored_to is not None:
        table.add_row("committed", f"snapshot of step {report.last_step} in {restored_to} ({report.snapshot_s:.2f} s)")
    return table


@_command("restore")
def restore_run(
    url: UrlArg,
    step: TargetOpt = None,
    to: Annotated[str | None, typer.Option("--to", help="Commit the restored state to this run directory.")] = None,
    world_size: WorldOpt = 1,
    device: DeviceOpt = None,
    entrypoint: EntryOpt = None,
    as_json: JsonOpt = False,
    storage_option: StorageOpt = None,
) -> None:
    """Materialize the state at the last logged step: snapshot + replay, committed as a snapshot.

    A relaunch of the job then starts from that step with nothing to replay.
    """
    started = time.perf_counter()
    plan = ReplayPlan(url, storage_option, step, entrypoint)
    err.print(
        f"restoring {plan.url}: snapshot {plan.base}, replaying steps {plan.base + 1}..{plan.target} "
        f"through {plan.function}",
        style="dim",
    )
    session = Session(mode="restore", storage=url, step=plan.target, to=to, progress=True)
    report = _run_session(plan, session, world_size, device)
    elapsed = time.perf_counter() - started
    if as_json:
        _echo_json({"report": json.loads(report.model_dump_json()), "elapsed_s": elapsed, "to": to or plan.url})
        return
    out.print(_summary_table(report, plan, to or plan.url, "restore"))
    if report.steps and (not report.bitwise or report.replayed <= 12):
        out.print(_steps_table(report, report.strict))
    out.print(f"done in {elapsed:.2f} s; a relaunch on {to or plan.url} starts at step {report.last_step + 1}")


@_command("replay")
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
    as_json: JsonOpt = False,
    storage_option: StorageOpt = None,
) -> None:
    """Show what a restart would replay, or (--verify) re-run it and compare every step with the log.

    Exit code 1 when a step differs on the placement and device type that wrote the log.
    """
    if ops:
        from moai_ckpt.cli_ops import replay_ops

        replay_ops(url, step, device, None, as_json, storage_option, save=save_capture)
        return
    plan = ReplayPlan(url, storage_option, step, entrypoint)
    if not verify:
        _show_log(plan, storage_option, as_json)
        return
    session = Session(mode="verify", storage=url, step=plan.target, progress=True)
    report = _run_session(plan, session, world_size, device)
    strict = not report.placement_changes
    if as_json:
        _echo_json(json.loads(report.model_dump_json()))
    else:
        out.print(_summary_table(report, plan, None, "replay --verify"))
        if report.steps:
            out.print(_steps_table(report, strict))
        first = report.first_divergence()
        if first is not None and strict:
            out.print(f"[bold red]non-deterministic:[/] {first.describe()}")
        elif report.steps:
            out.print("[green]deterministic:[/] every replayed step matches its record bitwise" if strict else "")
    first_diverged = report.first_divergence()
    if first_diverged is not None and not as_json:  # re-run that step under op capture: which op?
        from moai_ckpt.cli_ops import _print_diff, capture_after_divergence

        diff = capture_after_divergence(url, first_diverged.step, world_size, device, entrypoint, storage_option)
        if diff is not None:
            _print_diff(diff)
    if strict and not report.bitwise:
        raise typer.Exit(1)


def _show_log(plan: ReplayPlan, storage_option: list[str] | None, as_json: bool) -> None:
    with _open(plan.url, storage_option) as ckpt:
        contents = records_after(ckpt.storage, plan.base)
    records = [r for r in contents.records if r.step <= plan.target]
    if as_json:
        _echo_json(
            {
                "base_step": plan.base,
                "last_step": plan.target,
                "records": [json.loads(r.model_dump_json()) for r in records],
                "problem": plan.problem,
            }
        )
        return
    out.print(f"log after the snapshot of step {plan.base}: a restart replays {len(records)} steps", soft_wrap=True)
    table = _table("")
    for name in ("step", "samples", "loss", "grad norm", "lr", "placement"):
        table.add_column(name, justify="right" if name != "placement" else "left")
    for r in records:
        lr = next((v for k, v in sorted(r.hparams.items()) if k.endswith(".lr")), None)
        placement = contents.placement(r.step)
        where = f"{placement.world_size}x {placement.device_name or placement.device_type}" if placement else "-"
        samples = str(len(r.samples)) if r.samples is not None else ("batch" if r.batch else "-")
        table.add_row(str(r.step), samples, _fmt(r.digests.loss), _fmt(r.digests.grad_norm), _fmt(lr), where)
    out.print(table)
    if plan.problem:
        out.print(f"[yellow]the log is damaged:[/] {plan.problem}")
