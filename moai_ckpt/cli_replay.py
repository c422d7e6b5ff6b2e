"""``moai-ckpt restore`` and ``moai-ckpt replay``: snapshot + op-stream log, replayed offline.

Both re-run the run's training function in a session (`moai_ckpt.session.Session`): it restores
the newest snapshot at or before the target, replays the logged steps with their digests
checked, and stops at the target step. ``restore`` then commits the state there as a new
snapshot that a relaunch starts from; ``replay --verify`` writes nothing and reports determinism
step by step. When the target step is a snapshot itself nothing is replayed and no code runs:
``restore`` verifies the snapshot and copies it (``--to``) from its data alone.

Storage is untrusted (docs/security.md): the function to re-run is the one the user names
(``--entrypoint``), or the one ``run.json`` records when the user trusts it (``--trust-run-json``,
or a confirmation on a terminal). `choose_code` makes that decision, in one place.
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
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moai_ckpt import session as sessions
from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.cli import (
    MAX_STEP,
    JsonOpt,
    StorageOpt,
    UrlArg,
    _command,
    _echo_json,
    _open,
    _storage_options,
    _table,
    err,
    out,
    shown_url,
)
from moai_ckpt.entry import (
    CALL_ENV,
    NOT_RECORDED,
    EntrypointError,
    RecordedCall,
    check_entrypoint,
    describe,
    parse_recorded,
)
from moai_ckpt.entry import not_recorded as markers_in
from moai_ckpt.errors import ChecksumError, CorruptSnapshotError, MoaiCkptError, SnapshotNotFoundError
from moai_ckpt.format import RunInfo
from moai_ckpt.layout import RUN_INFO
from moai_ckpt.session import Session
from replay.check import ReplayReport, StepCheck
from replay.log import Placement, records_after

EntryOpt = Annotated[
    str | None,
    typer.Option(
        "--entrypoint",
        "-e",
        metavar="MODULE:FUNCTION",
        help="The fault_tolerant training function to re-run (module:function or file.py:function), called with "
        "the --kwarg arguments only (and run.json's with --trust-run-json). The standard library is refused.",
    ),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-run-json",
        help="Run the training function run.json records, with its recorded arguments, without asking. "
        "Only for storage that nobody else can write: run.json is not authenticated.",
    ),
]
KwargOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--kwarg",
        metavar="NAME=VALUE",
        help="A keyword argument for the training function, repeatable; VALUE is JSON when it parses. "
        "Supplies the arguments run.json does not record (secret-looking ones).",
    ),
]
KwargEnvOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--kwarg-env",
        metavar="NAME=VARIABLE",
        help="A keyword argument for the training function taken from an environment variable (a string), "
        "repeatable: keeps secrets such as tokens off the command line.",
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
    int | None,
    typer.Option("--step", "-s", min=0, max=MAX_STEP, help="The step to reach (default: the last logged step)."),
]


class ReplayPlan:
    """What a session will do, read from the run directory before anything runs."""

    def __init__(self, url: str, storage_option: list[str] | None, step: int | None) -> None:
        self.storage_option = storage_option
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
            self.url = ckpt.url

    @property
    def needs_code(self) -> bool:
        """Whether steps must be replayed (by the training function) to reach the target."""
        return self.target > self.base

    def recorded(self) -> RecordedCall | None:
        """The call ``run.json`` records: data to show and, if the user trusts it, to use."""
        with _open(self.url, self.storage_option) as ckpt:
            if not ckpt.storage.exists(RUN_INFO):
                return None
            data = ckpt.storage.read_record(RUN_INFO)
        try:
            info = RunInfo.model_validate_json(data)
        except ValidationError as exc:
            message = f"run.json does not validate: {exc.errors()[0]['msg']}"
            raise CorruptSnapshotError(message, url=self.url, key=RUN_INFO) from None
        return parse_recorded(info.entry, self.url)


# -- which code runs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeChoice:
    """What the user said about the code a session may run."""

    entrypoint: str | None = None
    trust_run_json: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    call_from_env: bool = False  # --entrypoint's arguments are in $MOAI_CKPT_CALL (a run's own capture)

    @classmethod
    def of(
        cls,
        entrypoint: str | None,
        trust: bool,
        kwarg: list[str] | None,
        kwarg_env: list[str] | None = None,
        call_from_env: bool = False,
    ) -> CodeChoice:
        if call_from_env and entrypoint is None:
            raise typer.BadParameter("needs --entrypoint", param_hint="'--call-from-env'")
        if entrypoint is not None:
            check_entrypoint(entrypoint)  # refused before anything else happens
        pairs = _storage_options(kwarg, "'--kwarg'")  # the same NAME=VALUE syntax as -o
        for name, variable in _storage_options(kwarg_env, "'--kwarg-env'").items():
            if not isinstance(variable, str) or variable not in os.environ:
                raise typer.BadParameter(f"environment variable {variable!r} is not set", param_hint="'--kwarg-env'")
            pairs[name] = os.environ[variable]
        return cls(entrypoint, trust, pairs, call_from_env)


@dataclass(frozen=True)
class Code:
    """The training function a session runs, with its arguments."""

    function: str
    args: list[Any]
    kwargs: dict[str, Any]
    recorded: bool  # named by run.json (and trusted): it must be a fault_tolerant function


def choose_code(plan: ReplayPlan, choice: CodeChoice) -> Code:
    """The function to re-run and its arguments, as the user allowed; nothing runs here.

    ``--entrypoint`` names the function (called with ``--kwarg``s, or with run.json's recorded
    arguments under ``--trust-run-json``). Without it, run.json's function runs only under
    ``--trust-run-json`` or once confirmed on a terminal. The standard library is always refused.

    Raises:
        EntrypointError: nothing to run, a refused function, a recorded function the user did not
            allow, or arguments run.json did not record and no ``--kwarg`` supplies.
    """
    if choice.entrypoint is not None:
        if choice.call_from_env:
            given = json.loads(os.environ.get(CALL_ENV, "{}"))
            args, kwargs = list(given.get("args") or []), dict(given.get("kwargs") or {})
        elif choice.trust_run_json:
            recorded = plan.recorded()
            args, kwargs = (list(recorded.args or []), dict(recorded.kwargs or {})) if recorded else ([], {})
        else:
            args, kwargs = [], {}
        return Code(choice.entrypoint, *_with_kwargs(choice.entrypoint, args, kwargs, choice.kwargs, plan), False)
    recorded = plan.recorded()
    if recorded is None or not recorded.function:
        raise EntrypointError(
            "run.json names no training function (the run was not made by fault_tolerant, or its function "
            "cannot be named by another process); pass --entrypoint module:function",
            url=plan.url,
        )
    function = recorded.function
    try:
        check_entrypoint(function)
    except EntrypointError as exc:
        raise EntrypointError(
            f"run.json names {describe(function)}, which is refused ({str(exc).split(': ', 1)[-1]}); "
            "pass --entrypoint with your training function",
            url=plan.url,
        ) from None
    args, kwargs = list(recorded.args or []), dict(recorded.kwargs or {})
    if not choice.trust_run_json and not sys.stdin.isatty():
        raise EntrypointError(
            f"run.json names the training function {describe(function)} with {_call_text(args, kwargs)}; "
            "code named by storage runs only when you allow it: pass --entrypoint "
            f"{describe(function)[1:-1]} (and its arguments with --kwarg NAME=VALUE), or --trust-run-json if "
            "nobody else can write this run directory, or run on a terminal to confirm",
            url=plan.url,
        )
    args, kwargs = _with_kwargs(function, args, kwargs, choice.kwargs, plan)
    if not choice.trust_run_json:
        _confirm(plan, function, recorded)
    return Code(function, args, kwargs, True)


def _call_text(args: list[Any], kwargs: dict[str, Any]) -> str:
    parts = ([f"args {describe(args, 150)}"] if args else []) + ([f"kwargs {describe(kwargs, 250)}"] if kwargs else [])
    return " and ".join(parts) or "no arguments"


def _with_kwargs(
    function: str, args: list[Any], kwargs: dict[str, Any], given: dict[str, Any], plan: ReplayPlan
) -> tuple[list[Any], dict[str, Any]]:
    """Fill the arguments run.json did not record from ``--kwarg``s; refuse to call with a gap."""
    extra = dict(given)
    filled = []
    for value in args:  # a positional argument that was not recorded, supplied by name
        name = value.get(NOT_RECORDED) if isinstance(value, dict) else None
        filled.append(extra.pop(name) if isinstance(name, str) and name in extra else value)
    kwargs = {**kwargs, **extra}
    missing = markers_in(filled) + markers_in(kwargs)
    if missing:
        names = ", ".join(describe(m) for m in missing[:8])
        raise EntrypointError(
            f"run.json does not record the argument(s) {names} of {describe(function)} (secret-looking, not JSON, "
            "or left out by record_args): pass them with --kwarg NAME=VALUE or --kwarg-env NAME=VARIABLE "
            "(for a nested one, the whole argument)",
            url=plan.url,
        )
    return filled, kwargs


def _confirm(plan: ReplayPlan, function: str, recorded: RecordedCall) -> None:
    """Ask on the terminal whether to run the function run.json names (default: no)."""
    target = function.rpartition(":")[0]
    where = ("file", os.path.abspath(target)) if target.endswith(".py") else ("module", target)
    lines = [
        f"run.json of {shown_url(plan.url)} names the training function to re-run:",
        f"  function:  {describe(function)}",
        f"  {where[0]}:{' ' * (10 - len(where[0]))}{describe(where[1])}",
        f"  args:      {describe(recorded.args or [], 500)}",
        f"  kwargs:    {describe(recorded.kwargs or {}, 500)}",
        "Anyone who can write this run directory can change run.json.",
    ]
    typer.echo("\n".join(lines), err=True)
    try:
        yes = typer.confirm("Run this function?", default=False, err=True)
    except typer.Abort:  # end of input: no
        yes = False
    if not yes:
        raise EntrypointError(
            "not run: the training function run.json names was not confirmed; pass --entrypoint to name your own",
            url=plan.url,
        )


# -- running a session -----------------------------------------------------------------------------


def _run_session(plan: ReplayPlan, code: Code, session: Session, world_size: int, device: str | None) -> ReplayReport:
    """Run the training function under ``session``: in this process, or on ``world_size`` ranks."""
    env = dict(session.to_env())
    if device is not None:
        if device not in ("cpu", "cuda"):
            raise typer.BadParameter("expected cpu or cuda", param_hint="'--device'")
        env[sessions.DEVICE_ENV] = device
    with tempfile.TemporaryDirectory(prefix="moai-session-") as scratch:
        report_path = os.path.join(scratch, "report.json")
        env[sessions.ENV] = session.model_copy(update={"report": report_path}).model_dump_json()
        if world_size == 1:
            _in_process(plan, code, env, session.mode)
        else:
            _with_torchrun(code, env, world_size)
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


def _in_process(plan: ReplayPlan, code: Code, env: dict[str, str], mode: str) -> None:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with _environment(env), Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(f"{mode}: replaying from step {plan.base}", total=plan.target - plan.base)
        sessions.on_progress(lambda step, target: progress.update(task, completed=step - plan.base))
        try:
            sessions.call(code.function, code.args, code.kwargs, recorded=code.recorded)
        finally:
            sessions.on_progress(None)


def _with_torchrun(code: Code, env: dict[str, str], world_size: int) -> None:
    # the arguments travel in the environment: a process list shows command lines to every user
    call = json.dumps({"args": code.args, "kwargs": code.kwargs, "recorded": code.recorded})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={world_size}",
        "-m",
        "moai_ckpt.session",
        code.function,
    ]
    err.print(f"starting {world_size} ranks with torchrun", style="dim")
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    result = subprocess.run(cmd, env={**os.environ, **env, CALL_ENV: call, "OMP_NUM_THREADS": threads})
    if result.returncode != 0:
        raise MoaiCkptError(f"the replay ranks failed (torchrun exit code {result.returncode}); see their output above")


# -- nothing to replay: from the data alone --------------------------------------------------------


def _restore_from_data(plan: ReplayPlan, to: str | None) -> ReplayReport:
    """The target is a snapshot: verify it and, with ``to``, copy it there (marker last). No code runs."""
    started = time.perf_counter()
    with _open(plan.url, plan.storage_option) as source:
        _verified(source, plan.base)
        checked = time.perf_counter() - started
        copied = time.perf_counter()
        if to is not None:
            # like the session's target: opened with default options (-o is for URL only)
            with Checkpointer(to, local=True) as target:
                if target.url != source.url:
                    _copy_snapshot(source, target, plan.base)
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


def _verified(ckpt: Checkpointer, step: int) -> None:
    report = ckpt.verify(step)
    if not report.ok:
        first = report.faults[0]
        raise ChecksumError(
            f"the snapshot fails verification ({len(report.faults)} fault(s), first: {first.message})",
            url=ckpt.url,
            step=step,
        )


def _copy_snapshot(source: Checkpointer, target: Checkpointer, step: int) -> None:
    """Copy a verified snapshot, fenced and verified (`Checkpointer.copy_snapshot`), and run.json."""
    target.copy_snapshot(source, step)
    if source.storage.exists(RUN_INFO) and not target.storage.exists(RUN_INFO):
        target.storage.write(RUN_INFO, source.storage.read_record(RUN_INFO))


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


def _announce(plan: ReplayPlan, code: Code, what: str) -> None:
    err.print(
        f"{what} {escape(shown_url(plan.url))}: snapshot {plan.base}, replaying steps {plan.base + 1}..{plan.target} "
        f"through {escape(describe(code.function))}" + (" (as run.json records it)" if code.recorded else ""),
        style="dim",
        soft_wrap=True,
    )


@_command("restore")
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
        _announce(plan, code, "restoring")
        session = Session(mode="restore", storage=url, step=plan.target, to=to, progress=True)
        report = _run_session(plan, code, session, world_size, device)
    else:
        err.print(f"step {plan.target} is a snapshot: nothing to replay, no training code runs", style="dim")
        report = _restore_from_data(plan, to)
    elapsed = time.perf_counter() - started
    where = shown_url(to or plan.url)
    if as_json:
        _echo_json({"report": json.loads(report.model_dump_json()), "elapsed_s": elapsed, "to": where})
        return
    out.print(_summary_table(report, plan, to or plan.url, "restore"))
    if report.steps and (not report.bitwise or report.replayed <= 12):
        out.print(_steps_table(report, report.strict))
    out.print(f"done in {elapsed:.2f} s; a relaunch on {escape(where)} starts at step {report.last_step + 1}")


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
    trust_run_json: TrustOpt = False,
    kwarg: KwargOpt = None,
    kwarg_env: KwargEnvOpt = None,
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
    choice = CodeChoice.of(entrypoint, trust_run_json, kwarg, kwarg_env)
    plan = ReplayPlan(url, storage_option, step)
    if not verify:
        _show_log(plan, storage_option, as_json)
        return
    if not plan.needs_code:
        _nothing_to_verify(plan, as_json)
        return
    code = choose_code(plan, choice)
    _announce(plan, code, "verifying")
    session = Session(mode="verify", storage=url, step=plan.target, progress=True)
    report = _run_session(plan, code, session, world_size, device)
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

        diff = capture_after_divergence(url, first_diverged.step, world_size, device, code, storage_option)
        if diff is not None:
            _print_diff(diff)
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
        _echo_json(json.loads(report.model_dump_json()))
        return
    out.print(f"nothing to verify: step {plan.target} is a snapshot, no logged step leads to it")


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
        where = escape(where)  # names read from storage: never markup
        samples = str(len(r.samples)) if r.samples is not None else ("batch" if r.batch else "-")
        table.add_row(str(r.step), samples, _fmt(r.digests.loss), _fmt(r.digests.grad_norm), _fmt(lr), where)
    out.print(table)
    if plan.problem:
        out.print(f"[yellow]the log is damaged:[/] {escape(plan.problem)}")
