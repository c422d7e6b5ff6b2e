"""``moai-ckpt plan``: the placement a job would get on a set of devices, explained.

The model's profile comes from the run directory (``plans/profile-*.json``, cached by an earlier
plan or a training job), or from ``--model MODULE:FUNCTION``: a function returning ``(model,
sample_micro_batch)`` (or ``(model, sample, layers)``), measured on this machine and cached in the
run directory when one is given, or only counted with ``--analytic`` (no timing: the layers run
on the meta device, so it works for models this machine cannot hold).

When the run directory's newest snapshot records a plan (a run placed by ``Run.place``), the
command shows the plan a restore onto ``--devices`` would use, against the recorded one: the
recorded plan when the devices are the same, else a new one made with the recorded options and
global batch from the recorded profile, exactly as the restoring job decides.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from moai_ckpt.cli.base import JsonOpt, StorageOpt, command, err, new_table, out, parse_pairs
from moai_ckpt.cli.terminal import print_table
from moai_ckpt.errors import ModelFunctionError, ProfileError
from moai_ckpt.layout import PLANS, SNAPSHOTS, parse_snapshot_dir
from moai_ckpt.storage import Storage, open_storage
from parallel.costmodel import (
    ModelProfile,
    analytic_profile,
    cached_or_measured,
    cached_profiles,
    human,
    load_profile,
    profile_model,
)
from parallel.inventory import Device, local_device, parse_devices
from parallel.plan import Plan
from parallel.planner import PlanOptions, make_plan
from parallel.replan import RecordedPlan, compare, recorded_plan, replan


def _load_function(spec: str) -> Any:
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ModelFunctionError(f"--model {spec!r}: write MODULE:FUNCTION or path/file.py:FUNCTION")
    try:
        if target.endswith(".py"):
            path = Path(target).resolve()
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            if module_spec is None or module_spec.loader is None:
                raise ModelFunctionError(f"--model: cannot load {target}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules.setdefault(path.stem, module)
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")  # the current directory, as `python -m` has it
            module = importlib.import_module(target)
    except (ImportError, OSError) as exc:
        raise ModelFunctionError(f"--model {spec!r}: cannot import {target}: {exc}") from exc
    function = getattr(module, name, None)
    if not callable(function):
        raise ModelFunctionError(f"--model {spec!r}: {target} has no function {name}")
    return function


def _model_profile(spec: str, url: str | None, storage_options: dict[str, Any], analytic: bool) -> ModelProfile:
    built = _load_function(spec)()
    if not isinstance(built, tuple) or len(built) not in (2, 3):
        raise ModelFunctionError(f"--model {spec!r} must return (model, sample) or (model, sample, layers)")
    model, sample, *rest = built
    layers = rest[0] if rest else None
    if analytic:
        return analytic_profile(model, sample, layers=layers)
    if url is None:
        return profile_model(model, sample, layers=layers)
    return cached_or_measured(open_storage(url, **storage_options), model, sample, layers=layers)


def _cached_profile(url: str, storage_options: dict[str, Any]) -> ModelProfile:
    storage = open_storage(url, **storage_options)
    keys = cached_profiles(storage)
    if not keys:
        raise ProfileError(
            "no model profile cached in the run directory: pass --model MODULE:FUNCTION to profile one",
            url=storage.url,
            key=f"{PLANS}/",
        )
    profiles = [load_profile(storage, key) for key in keys]
    return max(profiles, key=lambda p: (p.source == "measured", p.created))


def _recorded(url: str, storage_options: dict[str, Any]) -> tuple[Storage, RecordedPlan | None]:
    storage = open_storage(url, **storage_options)
    steps = [s for s in map(parse_snapshot_dir, storage.list_dirs(SNAPSHOTS)) if s is not None]
    return storage, recorded_plan(storage, steps)


def _recorded_profile(storage: Storage, recorded: RecordedPlan, storage_options: dict[str, Any]) -> ModelProfile:
    """The profile the recorded plan was made from, else the run directory's newest one."""
    if storage.exists(recorded.plan.profile):
        return load_profile(storage, recorded.plan.profile)
    return _cached_profile(storage.url, storage_options)


def _local_devices() -> list[Device]:
    import torch

    if torch.cuda.is_available():
        return [local_device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    return [local_device("cpu")]


def _stages_table(plan: Plan) -> Any:
    table = new_table(f"chosen: {escape(plan.summary())}")
    for name in ("stage", "layers", "first .. last", "devices", "per micro-batch", "memory / usable"):
        table.add_column(name)
    for s in plan.stages:
        table.add_row(
            str(s.index),
            f"{s.start}..{s.stop - 1} ({s.layers})",
            escape(f"{s.first_layer} .. {s.last_layer}"),
            escape(f"{s.device_type} x{len(s.devices)}: {', '.join(map(str, s.devices))}"),
            f"{s.seconds * 1e3:.2f} ms",
            f"{human(s.memory_bytes)} / {human(s.memory_available)}",
        )
    return table


@command("plan")
def plan_command(
    global_batch: Annotated[
        int | None,
        typer.Option(
            "--global-batch",
            "-b",
            min=1,
            help="Samples per optimizer step (kept exactly; default: the plan the run's snapshot records).",
        ),
    ] = None,
    url: Annotated[
        str | None, typer.Argument(help="Run directory whose cached model profile to use (and cache into).")
    ] = None,
    devices: Annotated[
        str | None,
        typer.Option("--devices", "-d", help="Devices to plan for, COUNTxTYPE[:MEMORY],... (default: this machine's)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", metavar="MODULE:FUNCTION", help="A function returning (model, sample micro-batch)."
        ),
    ] = None,
    analytic: Annotated[
        bool, typer.Option("--analytic", help="Count FLOPs and bytes on the meta device instead of timing.")
    ] = False,
    top: Annotated[int, typer.Option("--top", min=1, help="Candidates to show.")] = 8,
    memory_fraction: Annotated[
        float | None,
        typer.Option(
            "--memory-fraction", min=0.01, max=1.0, help="Share of device memory a plan may fill (default 0.9)."
        ),
    ] = None,
    as_json: JsonOpt = False,
    storage_option: StorageOpt = None,
) -> None:
    """Show the placement (data / pipeline degrees, stages, micro-batches) a job would get, and why.

    With a run directory whose snapshot records a plan: the plan a restore onto --devices would
    use, against the recorded one.
    """
    options = parse_pairs(storage_option)
    storage, recorded = _recorded(url, options) if url is not None else (None, None)
    if model is not None:
        profile = _model_profile(model, url, options, analytic)
    elif storage is not None and recorded is not None:
        profile = _recorded_profile(storage, recorded, options)
    elif url is not None:
        profile = _cached_profile(url, options)
    else:
        raise typer.BadParameter("give a run directory with a cached profile, or --model MODULE:FUNCTION")
    device_list = parse_devices(devices) if devices else _local_devices()
    if recorded is not None:
        planner = recorded.options
        if memory_fraction is not None:
            planner = planner.model_copy(update={"memory_fraction": memory_fraction})
        decision = replan(device_list, profile, global_batch or recorded.plan.global_batch, planner, recorded)
        plan = decision.plan
        if not as_json:
            err.print(f"the snapshot of step {recorded.step} records: {escape(recorded.plan.summary())}", style="dim")
            if decision.changed:
                print_table(compare(recorded.plan, plan, decision.reason))
            else:
                out.print(f"a restore on these devices keeps it ({escape(decision.reason)})")
            out.print()
    else:
        if global_batch is None:
            raise typer.BadParameter("needed unless the run directory's snapshot records a plan", param_hint="'-b'")
        plan = make_plan(device_list, profile, global_batch, PlanOptions(memory_fraction=memory_fraction or 0.9))
    if as_json:
        typer.echo(plan.model_dump_json(indent=2))
        return
    how = (
        "analytic (FLOPs and bytes counted, times from device figures)"
        if profile.source == "analytic"
        else f"measured on {profile.device.label} at micro-batch {profile.micro_batch}"
    )
    err.print(f"profile: {profile.num_layers} layers, {profile.params:,} parameters, {how}", style="dim")
    print_table(plan.explain(top), drop=("note", "bubble", "comm", "compute", "stages", "micro"))
    out.print()
    print_table(_stages_table(plan), drop=("first .. last",))
