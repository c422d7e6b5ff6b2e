"""``moai-ckpt capture``, ``moai-ckpt diff-ops`` and ``moai-ckpt replay --ops``: op-level capture.

``capture`` re-runs a logged step under op capture (through the restore session machinery, so
it needs the training function, allowed as for ``replay --verify``: ``--entrypoint``,
``--trust-run-json`` or a confirmation); ``diff-ops`` compares two captures of a step;
``replay --ops`` re-executes captures from their op stream alone. See docs/ops.md.
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import torch
import typer
from rich.markup import escape

from moai_ckpt.cli.base import (
    MAX_STEP,
    JsonOpt,
    StorageOpt,
    UrlArg,
    command,
    echo_json,
    err,
    new_table,
    open_run,
    out,
    shown_url,
)
from moai_ckpt.cli.code import CodeChoice, EntryOpt, KwargEnvOpt, KwargOpt, TrustOpt, choose_code
from moai_ckpt.cli.sessions import Code, DeviceOpt, ReplayPlan, WorldOpt, announce, run_session
from moai_ckpt.cli.terminal import print_table
from moai_ckpt.errors import MoaiCkptError, SnapshotNotFoundError
from moai_ckpt.opcapture import SOURCE_ENV
from moai_ckpt.run.resume import current_placement
from moai_ckpt.run.session import Session
from replay.check import ReplayReport
from replay.opdiff import DiffReport, diff_streams
from replay.opreplay import OpReplayReport, replay_captures
from replay.opstore import check_label, list_captures, read_capture, read_index

LabelOpt = Annotated[str | None, typer.Option("--label", help="Which capture of the step (default: the first made).")]


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


# -- capture ---------------------------------------------------------------------------------------


@command("capture")
def capture_command(
    url: UrlArg,
    step: Annotated[
        int | None,
        typer.Option("--step", "-s", min=1, max=MAX_STEP, help="The logged step to capture (omit to list captures)."),
    ] = None,
    world_size: WorldOpt = 1,
    device: DeviceOpt = None,
    entrypoint: EntryOpt = None,
    trust_run_json: TrustOpt = False,
    kwarg: KwargOpt = None,
    kwarg_env: KwargEnvOpt = None,
    call_from_env: Annotated[
        bool, typer.Option("--call-from-env", hidden=True, help="--entrypoint's arguments are in $MOAI_CKPT_CALL.")
    ] = False,
    source: Annotated[str, typer.Option("--source", hidden=True)] = "request",
    as_json: JsonOpt = False,
    storage_option: StorageOpt = None,
) -> None:
    """Re-run a logged step under op capture (or list the captures of a run).

    The step is reached like ``replay --verify`` does (snapshot before it, log replayed up to it);
    when the run already holds a capture of that step, the two are compared as ``diff-ops`` does.
    """
    if step is None:
        _list(url, storage_option, as_json)
        return
    choice = CodeChoice.of(entrypoint, trust_run_json, kwarg, kwarg_env, call_from_env)
    label, index, report, diff = capture_step(url, step, world_size, device, choice, source, storage_option)
    check = report.steps[-1] if report.steps else None
    if as_json:
        echo_json(
            {
                "step": step,
                "label": label,
                "ops": index.ops,
                "bitwise": check.bitwise if check else None,
                "diff": json.loads(diff.model_dump_json()) if diff else None,
            }
        )
        return
    out.print(f"captured step {step}: {index.ops} ops, {index.values} values, label {label}")
    if check is not None:
        out.print(f"log check of step {step}: {check.describe()}")
    if diff is not None:
        out.print(f"against the earlier capture {diff.label_a}:")
        print_diff(diff)


def capture_step(
    url: str,
    step: int,
    world_size: int,
    device: str | None,
    code: Code | CodeChoice,
    source: str,
    storage_option: list[str] | None,
) -> tuple[str, Any, ReplayReport, DiffReport | None]:
    """Run a capture session of ``step``: (label, index, session report, diff against an earlier capture).

    ``code`` is the function to run, or what the user allowed (`choose_code` decides).
    """
    plan = ReplayPlan(url, storage_option, step - 1)
    if step > plan.logged_last:
        raise SnapshotNotFoundError(f"step {step} is not in the log (it ends at step {plan.logged_last})", url=plan.url)
    plan.target = step
    if isinstance(code, CodeChoice):
        code = choose_code(plan, code)
    with open_run(url, storage_option) as ckpt:
        before = {r.label for r in list_captures(ckpt.storage, step)}
    announce(plan, code, f"capturing step {step} of")
    session = Session(mode="verify", storage=url, step=step, capture_ops=[step], progress=True)
    os.environ[SOURCE_ENV] = check_label(source)
    try:
        report: ReplayReport = run_session(plan, code, session, world_size, device)
    finally:
        os.environ.pop(SOURCE_ENV, None)
    with open_run(url, storage_option) as ckpt:
        refs = list_captures(ckpt.storage, step)
        new = [r for r in refs if r.label not in before and r.ranks]
        if not new:
            raise SnapshotNotFoundError(f"the session reached step {step} but wrote no capture", url=plan.url)
        label = new[-1].label
        index = read_index(ckpt.storage, step, label)
        earlier = [r for r in refs if r.label in before and 0 in r.ranks]
        diff = None
        if earlier:
            diff = diff_streams(
                read_capture(ckpt.storage, step, earlier[0].label, blobs=False), _stream(ckpt, step, label)
            )
    return label, index, report, diff


def capture_after_divergence(
    url: str, step: int, world_size: int, device: str | None, code: Code, storage_option: list[str] | None
) -> DiffReport | None:
    """``replay --verify`` found step ``step`` diverged: capture it here (with the function the
    verify ran) and diff it with the capture the run made of it, if any. Problems are printed, not
    raised (the divergence is the result)."""
    try:
        label, _, _, diff = capture_step(url, step, world_size, device, code, "divergence", storage_option)
    except MoaiCkptError as exc:
        err.print(f"could not capture the diverged step {step}: {escape(str(exc))}", style="yellow", soft_wrap=True)
        return None
    err.print(f"captured the diverged step {step} as {label}", style="dim")
    return diff


def _stream(ckpt: Any, step: int, label: str) -> Any:
    return read_capture(ckpt.storage, step, label, blobs=False)


def _list(url: str, storage_option: list[str] | None, as_json: bool) -> None:
    with open_run(url, storage_option) as ckpt:
        rows = []
        for ref in list_captures(ckpt.storage):
            info: dict[str, Any] = {
                "step": ref.step,
                "label": ref.label,
                "ranks": list(ref.ranks),
                "torn": list(ref.torn),
            }
            if 0 in ref.ranks:
                index = read_index(ckpt.storage, ref.step, ref.label)
                info.update(ops=index.ops, device=index.placement.device_name or index.placement.device_type)
            rows.append(info)
    if as_json:
        echo_json(rows)
        return
    table = new_table(f"op captures in {escape(shown_url(url))}")
    for name in ("step", "label", "ranks", "ops", "device"):
        table.add_column(name)
    for r in rows:
        ranks = ",".join(map(str, r["ranks"])) + (f" (torn: {r['torn']})" if r["torn"] else "")
        table.add_row(str(r["step"]), r["label"], ranks, str(r.get("ops", "-")), str(r.get("device", "-")))
    print_table(table)


# -- diff-ops --------------------------------------------------------------------------------------


def _pick(storage: Any, step: int | None, label: str | None, other: str | None, newest: bool) -> tuple[int, str]:
    refs = [r for r in list_captures(storage, step) if 0 in r.ranks and (label is None or r.label == label)]
    if other is not None:
        refs = [r for r in refs if r.label != other]
    if not refs:
        raise SnapshotNotFoundError(
            "no op capture"
            + (f" of step {step}" if step is not None else "")
            + (f" labelled {label}" if label else ""),
            url=storage.url,
        )
    ref = refs[-1] if newest else refs[0]
    return ref.step, ref.label


@command("diff-ops")
def diff_ops_command(
    a: Annotated[str, typer.Argument(help="Run directory of the first capture (the reference).")],
    b: Annotated[str, typer.Argument(help="Run directory of the second capture (may be the same run).")],
    step: Annotated[
        int | None, typer.Option("--step", "-s", min=1, help="The captured step (default: the first in A).")
    ] = None,
    label_a: Annotated[str | None, typer.Option("--label-a", help="A's capture (default: its first).")] = None,
    label_b: Annotated[str | None, typer.Option("--label-b", help="B's capture (default: its newest).")] = None,
    as_json: JsonOpt = False,
    storage_option: StorageOpt = None,
) -> None:
    """Find the first op whose inputs agree but whose outputs differ between two captures of a step.

    Exit code 0 when the two streams are identical, 1 when they differ.
    """
    with open_run(a, storage_option) as ca, open_run(b, storage_option) as cb:
        step_a, la = _pick(ca.storage, step, label_a, None, newest=False)
        same_run = ca.url == cb.url
        step_b, lb = _pick(cb.storage, step_a, label_b, la if same_run and label_b is None else None, newest=True)
        report = diff_streams(
            read_capture(ca.storage, step_a, la, blobs=False), read_capture(cb.storage, step_b, lb, blobs=False)
        )
    if as_json:
        echo_json(json.loads(report.model_dump_json()))
    else:
        print_diff(report)
    if not report.identical:
        raise typer.Exit(1)


def print_diff(report: DiffReport) -> None:
    table = new_table(
        f"step {report.step_a}: A {report.label_a} ({report.device_a}) vs B {report.label_b} ({report.device_b})",
        show_header=False,
    )
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row(
        "ops",
        f"A {report.ops_a}, B {report.ops_b}; aligned {report.aligned}; only in A {report.unaligned_a}, only in B {report.unaligned_b}",
    )
    if report.identical:
        table.add_row("verdict", "[green]identical[/]: every aligned op has the same input and output hashes")
        if report.unaligned_a or report.unaligned_b:
            table.add_row(
                "",
                "(ops only one stream has changed no aligned op's inputs or outputs: e.g. a sampler's permutation drawn again after a restore)",
            )
        print_table(table)
        return
    first = report.first
    if first is not None:
        table.add_row("first divergence", first.describe())
        for i, o in enumerate(first.outputs[:3]):
            table.add_row(
                f"  output {i}",
                f"{tuple(o.shape)} {o.dtype_a}/{o.dtype_b}: max abs {_fmt(o.max_abs)}, max rel {_fmt(o.max_rel)}, "
                f"norm rel {_fmt(o.norm_rel)} ({o.sampled} of {o.numel} elements)",
            )
        table.add_row(
            "after it", f"{report.later_diverged} of {report.later_aligned} aligned ops have different outputs"
        )
    if report.worst_op:
        table.add_row("largest norm drift", f"{report.worst_op} (rel {_fmt(report.worst_norm_rel)})")
    for d in report.independent[:5]:
        table.add_row("also diverges", d.describe())
    for name, (x, y, r) in report.results.items():
        table.add_row(name, f"A {_fmt(x, '.9g')}, B {_fmt(y, '.9g')} (rel {_fmt(r)})")
    if report.params_worst:
        table.add_row("parameters", f"most moved {report.params_worst} (norm rel {_fmt(report.params_max_norm_rel)})")
    print_table(table)


# -- replay --ops ----------------------------------------------------------------------------------


def replay_ops(
    url: str,
    step: int | None,
    device: str | None,
    label: str | None,
    as_json: bool,
    storage_option: list[str] | None,
    save: bool = False,
) -> None:
    """``moai-ckpt replay URL --ops``: re-execute every captured step (up to ``step``) from its op stream."""
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with open_run(url, storage_option) as ckpt:
        captures: dict[int, str] = {}
        for ref in list_captures(ckpt.storage):
            if 0 in ref.ranks and (step is None or ref.step <= step) and (label is None or ref.label == label):
                captures.setdefault(ref.step, ref.label)  # the first capture made of each step
        if not captures:
            raise SnapshotNotFoundError(
                "no op capture to replay" + (f" up to step {step}" if step else ""), url=ckpt.url
            )
        placement = None
        if save:
            placement = current_placement(1, target)
        report = replay_captures(ckpt, target, captures, save=placement)
    if as_json:
        echo_json(json.loads(report.model_dump_json()))
    else:
        _print_replay(report)
    if report.failed:
        raise typer.Exit(1)


def _print_replay(report: OpReplayReport) -> None:
    table = new_table(f"replay --ops on {report.device}: captured steps re-executed without the training code")
    for name in ("step", "ops", "captured on", "replayed on", "ops differing", "loss rel", "param norm rel", "check"):
        table.add_column(name, justify="left" if name in ("captured on", "replayed on", "check") else "right")
    for s in report.steps:
        c = s.check
        verdict = "[green]bitwise[/]" if s.ok else "[bold red]DIVERGED[/]" if s.strict else "[yellow]drift[/]"
        table.add_row(
            str(s.step),
            str(s.ops),
            s.device_captured,
            s.device_replayed,
            str(s.ops_differing),
            _fmt(c.loss_rel if c else None, ".2e"),
            _fmt(c.state_rel if c else None, ".2e"),
            verdict,
        )
    print_table(table)
    for s in report.steps:
        if s.first is not None:
            out.print(f"step {s.step}: first divergent op {s.first.describe()}", soft_wrap=True)
        if s.externals_differing:
            out.print(f"step {s.step}: inputs that differ from the capture: {', '.join(s.externals_differing[:5])}")
        if s.host_drift:
            out.print(f"step {s.step}: host values read back differ: {'; '.join(s.host_drift[:3])}")
        if s.check is not None and not s.check.bitwise:
            out.print(f"step {s.step}: {s.check.describe()}", soft_wrap=True)
        if s.note:
            out.print(f"step {s.step}: {s.note}")
        if s.saved_as:
            out.print(f"step {s.step}: stored as capture {s.saved_as} (moai-ckpt diff-ops URL URL --step {s.step})")
    for line in report.skipped:
        out.print(f"[yellow]skipped[/] {line}")
