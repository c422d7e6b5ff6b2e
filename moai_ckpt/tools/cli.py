"""``moai-ckpt chaos`` and ``moai-ckpt demo``: the tools' commands.

``chaos`` runs a training job with faults on a seeded schedule and checks the result:

    moai-ckpt chaos list
    moai-ckpt chaos run smoke --trials 3 --seed 0 --out runs/chaos
    moai-ckpt chaos run my_scenario.json
    moai-ckpt chaos run smoke --random-faults 4 --trials 50      # each trial draws 4 faults
    moai-ckpt chaos run smoke --entrypoint train.py:train --storage-kwarg run_dir   # your job, smoke's faults

Exit code 0 when every trial passes every check, 1 otherwise. ``demo`` trains a small GPT under
torchrun, SIGKILLs a rank mid-step and compares the recovered run bitwise (`moai_ckpt.tools.demo`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from moai_ckpt.cli.base import JsonOpt, command, echo_json, err, new_table, out, register
from moai_ckpt.cli.terminal import print_table

chaos_app = typer.Typer(
    name="chaos",
    help="Chaos testing: inject faults into a training job and prove it ends as the fault-free run does.",
    no_args_is_help=True,
)


@command("list")
def list_scenarios(as_json: JsonOpt = False) -> None:
    """The built-in scenarios and the fault kinds a scenario can name."""
    from moai_ckpt.tools.chaos import BUILTIN, KINDS

    if as_json:
        echo_json({"scenarios": [s.model_dump(mode="json") for s in BUILTIN.values()], "fault_kinds": list(KINDS)})
        return

    table: Table = new_table("built-in scenarios")
    for name in ("scenario", "ranks", "steps", "faults", "what it shows"):
        table.add_column(name)
    for s in BUILTIN.values():
        table.add_row(s.name, str(s.ranks), str(s.steps), ", ".join(f.kind for f in s.faults), s.description)
    print_table(table)
    out.print("fault kinds: " + ", ".join(KINDS), soft_wrap=True)


@command("run")
def run_scenario(
    scenario: Annotated[str, typer.Argument(help="A built-in scenario's name, or a scenario file (JSON).")],
    trials: Annotated[int, typer.Option("--trials", "-n", min=1, help="Trials, with seeds seed, seed+1, ...")] = 1,
    seed: Annotated[int, typer.Option("--seed", "-s", help="The first trial's seed.")] = 0,
    out_dir: Annotated[str, typer.Option("--out", "-o", help="Where runs, logs and reports go.")] = "runs/chaos",
    random_faults: Annotated[
        int | None, typer.Option("--random-faults", min=1, help="Each trial draws this many faults of random kinds.")
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=4, help="Override the scenario's step count.")] = None,
    ranks: Annotated[int | None, typer.Option("--ranks", min=1, help="Override the scenario's rank count.")] = None,
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", min=1, help="Trials run at once (each uses `ranks` processes).")
    ] = 1,
    entrypoint: Annotated[
        str | None,
        typer.Option(
            "--entrypoint", help="Run this fault_tolerant function (module:function or file.py:function) instead."
        ),
    ] = None,
    kwargs: Annotated[
        str | None,
        typer.Option("--kwargs", help='Its JSON keyword arguments (default with --entrypoint: {"steps": STEPS}).'),
    ] = None,
    storage_kwarg: Annotated[
        str | None, typer.Option("--storage-kwarg", help="The keyword argument that takes the run directory.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a scenario: a fault-free reference, then trials with faults, each checked against it.

    Exit status: 0 every trial passed, 1 a check failed, 2 the harness could not run, 3 handed off
    (a ``handoff`` fault: continue on the other machine with the same command).
    """
    from moai_ckpt.tools.chaos import ChaosError, Scenario, run_trials

    try:
        chosen = Scenario.load(scenario)
        update: dict[str, object] = _job_update(chosen.steps, entrypoint, kwargs, storage_kwarg)
        if update:
            chosen = Scenario.model_validate({**chosen.model_dump(), **update})
            update = {}
        if steps is not None:
            update["steps"] = steps
            update["kwargs"] = {**chosen.kwargs, "steps": steps}
        if ranks is not None:
            update["ranks"] = ranks
        if update:
            chosen = Scenario.model_validate({**chosen.model_dump(), **update})
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="SCENARIO") from exc
    try:
        summary = run_trials(
            chosen, out_dir, seed=seed, trials=trials, random_faults=random_faults, console=err, jobs=jobs
        )
    except ChaosError as exc:
        err.print(f"error: {exc}", style="bold red", soft_wrap=True)
        raise typer.Exit(2) from exc
    handed = [t.seed for t in summary.trials if t.faulty.handed_off]
    if handed:
        out.print(
            f"handed off (seeds {handed}): copy {out_dir} to the other machine and run the same command there "
            "(same scenario, seed and --out); it continues the runs and judges them against this reference"
        )
        raise typer.Exit(3)
    if as_json:  # the report the run wrote, as it is
        echo_json(json.loads((Path(out_dir) / "report.json").read_text()))
    else:
        out.print(f"report: {out_dir}/report.json; timelines: {out_dir}/seed-*/timeline.png")
    raise typer.Exit(0 if all(t.ok for t in summary.trials) else 1)


def _job_update(steps: int, entrypoint: str | None, kwargs: str | None, storage_kwarg: str | None) -> dict[str, object]:
    """The scenario fields that ``--entrypoint``, ``--kwargs`` and ``--storage-kwarg`` set."""
    update: dict[str, object] = {}
    if entrypoint is not None:
        update["entrypoint"] = entrypoint
        update["kwargs"] = {"steps": steps}  # the demo's other arguments mean nothing to another job
    if kwargs is not None:
        try:
            parsed = json.loads(kwargs)
        except ValueError as exc:
            raise ValueError(f"--kwargs is not JSON: {exc}") from exc
        if not isinstance(parsed, dict):
            raise ValueError("--kwargs must be a JSON object of keyword arguments")
        update["kwargs"] = parsed
    if storage_kwarg is not None:
        update["storage_kwarg"] = storage_kwarg
    return update


register(chaos_app, list_scenarios, run_scenario)


@command("demo")
def demo_command(
    directory: Annotated[str, typer.Option("--dir", help="Where the demo's run directories go.")] = "runs/demo",
    steps: Annotated[int, typer.Option("--steps", min=8, help="Training steps of each run.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the training and picks the killed rank, step, phase.")] = 0,
    ranks: Annotated[int, typer.Option("--ranks", min=1, help="Worker processes under torchrun.")] = 2,
    keep: Annotated[bool, typer.Option("--keep", help="Keep earlier demos' run directories.")] = False,
    local_every: Annotated[
        int | None,
        typer.Option("--local-every", min=1, help="Also snapshot to a local tier in host memory every N steps."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a small GPT under torchrun, SIGKILL a rank mid-step, and compare the recovered run bitwise.

    Exit code 0 when the recovered run ends bitwise equal to the uninterrupted one, 1 when it does
    not, 2 when the demo could not run.
    """
    from moai_ckpt.tools import demo  # loaded only when the command runs

    try:
        options = demo.DemoOptions(
            dir=directory, steps=steps, seed=seed, ranks=ranks, keep=keep, local_every=local_every
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    try:
        comparison = demo.run_demo(options, err if as_json else out)  # with --json the story goes to stderr
    except demo.DemoError as exc:  # it could not run; the message ends with the tail of a log, kept as lines
        err.print(f"error: {escape(str(exc))}", style="bold red", soft_wrap=True)
        raise typer.Exit(2) from exc
    if as_json:
        echo_json(comparison.as_json())
    raise typer.Exit(0 if comparison.bitwise_equal else 1)


__all__ = ["chaos_app", "demo_command", "list_scenarios", "run_scenario"]
