"""Which training function a session runs: the one the user names, or run.json's once allowed.

Storage is untrusted (docs/security.md): the function to re-run is the one the user names
(``--entrypoint``), or the one ``run.json`` records when the user trusts it (``--trust-run-json``,
or a confirmation on a terminal). `choose_code` makes that decision, in one place.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer

from moai_ckpt.cli.base import parse_pairs, shown_url
from moai_ckpt.cli.sessions import Code, ReplayPlan
from moai_ckpt.entry import (
    CALL_ENV,
    NOT_RECORDED,
    EntrypointError,
    RecordedCall,
    check_entrypoint,
    describe,
)
from moai_ckpt.entry import not_recorded as markers_in

__all__ = ["CodeChoice", "EntryOpt", "KwargEnvOpt", "KwargOpt", "TrustOpt", "choose_code"]

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
        pairs = parse_pairs(kwarg, "'--kwarg'")  # the same NAME=VALUE syntax as -o
        for name, variable in parse_pairs(kwarg_env, "'--kwarg-env'").items():
            if not isinstance(variable, str) or variable not in os.environ:
                raise typer.BadParameter(f"environment variable {variable!r} is not set", param_hint="'--kwarg-env'")
            pairs[name] = os.environ[variable]
        return cls(entrypoint, trust, pairs, call_from_env)


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
