"""The ``moai-ckpt`` Typer app and what every command shares: consoles, options, errors, tables.

Every command takes the run directory as a URL (a local path or any fsspec URL) and storage
options as repeatable ``-o key=value`` pairs (used to open storage, never recorded anywhere), over
the Checkpointer and storage options of `moai_ckpt.RunOptions` (``MOAI_CKPT_*`` variables, the
config file), as a training job reads them.
Tables go to stdout, progress bars and errors to stderr, so ``--json`` output stays parseable.
Exit codes: 0 success, 1 a check found faults (verify, replay --verify, diff-ops), 2 an error:
any failure prints one red line (naming URL, step and key for a moai-ckpt error; a traceback
only with ``--debug``), or bad usage. A password in a URL is never printed.

Command modules name their commands with `command`; `moai_ckpt.cli` adds them all to `app` (`register`).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moai_ckpt import __version__
from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.errors import MoaiCkptError, redact_url
from moai_ckpt.layout import STEP_DIGITS
from moai_ckpt.run.options import RunOptions

try:  # recent typer releases carry their own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - typer on top of click
    from click import ClickException  # type: ignore[assignment]

__all__ = [
    "MAX_STEP",
    "JsonOpt",
    "StepOpt",
    "StorageOpt",
    "UrlArg",
    "app",
    "command",
    "echo_json",
    "err",
    "human_bytes",
    "new_table",
    "open_run",
    "out",
    "parse_pairs",
    "shown_url",
]

app = typer.Typer(
    name="moai-ckpt",
    help="Inspect and maintain moai-ckpt snapshots on any fsspec storage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # every error gets one red line (see `command`); tracebacks with --debug
    context_settings={"help_option_names": ["-h", "--help"]},
)
# Rich resolves sys.stdout / sys.stderr at write time, so these follow redirections (and CliRunner).
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])

UrlArg = Annotated[str, typer.Argument(help="Run directory: a local path or an fsspec URL (s3://...).")]
StorageOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--storage-option",
        "-o",
        metavar="KEY=VALUE",
        help="fsspec storage option, repeatable; VALUE is parsed as JSON when it can be (-o anon=true).",
    ),
]
MAX_STEP = 10**STEP_DIGITS - 1  # the largest step a run directory can name
StepOpt = Annotated[
    int | None, typer.Option("--step", "-s", min=0, max=MAX_STEP, help="Snapshot step (default: the latest).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


# -- the app, its global options and error handling ------------------------------------------


@dataclass
class _Invocation:
    """Global options of the current invocation (set by the root callback)."""

    debug: bool = False


_invocation = _Invocation()


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"moai-ckpt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", envvar="MOAI_CKPT_DEBUG", help="Show tracebacks and debug logging.")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Inspect and maintain moai-ckpt snapshots on any fsspec storage."""
    _invocation.debug = debug
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")


def shown_url(url: str) -> str:
    """A URL as messages show it: without a password (``s3://key:secret@host`` -> ``s3://***@host``)."""
    return redact_url(url)


def _fail(exc: BaseException, *, unexpected: bool = False) -> NoReturn:
    """Print an error as one red line (a traceback too under ``--debug``) and exit 2.

    Called inside the ``except`` block that caught ``exc``.
    """
    if _invocation.debug:
        err.print_exception()
    message = re.sub(r"\s*\n\s*", "; ", str(exc).strip())
    if unexpected:
        hint = "" if _invocation.debug else "; re-run with --debug for the traceback"
        message = f"unexpected {type(exc).__name__}: {message or 'no message'}{hint}"
    err.print(f"error: {escape(redact_url(message))}", style="bold red", soft_wrap=True)
    raise typer.Exit(2)


def command(name: str) -> Callable[[F], F]:
    """Name ``fn`` as the command ``name`` (added to an app by `register`), every failure one red line.

    A moai-ckpt error prints its message (URL, step and key) and exits 2; any other exception is
    a bug or a failure of the training code, printed as one line too, with a hint to re-run with
    ``--debug``. Exits the command chose (``typer.Exit``) and usage errors pass through as they
    are. The decorated function itself is returned unchanged, for callers in Python.
    """

    def name_it(fn: F) -> F:
        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except (typer.Exit, typer.Abort, ClickException):  # chosen exits and usage errors
                raise
            except MoaiCkptError as exc:
                _fail(exc)
            except KeyboardInterrupt:
                err.print("interrupted", style="bold red")
                raise typer.Exit(130) from None
            except Exception as exc:  # noqa: BLE001 - a bug or the training code: one line, not a traceback
                _fail(exc, unexpected=True)

        _COMMANDS[fn] = (name, guarded)
        return fn

    return name_it


_COMMANDS: dict[Callable[..., Any], tuple[str, Callable[..., Any]]] = {}  # function -> (name, guarded form)


def register(on: typer.Typer, *functions: Callable[..., Any]) -> None:
    """Add the `command` functions to ``on``, in this order (the order ``--help`` lists them in)."""
    for fn in functions:
        name, guarded = _COMMANDS[fn]
        on.command(name)(guarded)


# -- shared helpers ----------------------------------------------------------------------------


def parse_pairs(pairs: list[str] | None, option: str = "'-o' / '--storage-option'") -> dict[str, Any]:
    """``["key=value", ...]`` (the values of ``option``) to a dict; values are JSON when they parse, else strings."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=option)
        try:
            options[key.strip()] = json.loads(raw)
        except ValueError:
            options[key.strip()] = raw
    return options


@contextmanager
def open_run(url: str, pairs: list[str] | None) -> Iterator[Checkpointer]:
    """The run directory ``url`` for this process alone (no collectives).

    Its Checkpointer and storage options are those `RunOptions` reads from ``MOAI_CKPT_*``
    variables and the config file, with the ``-o`` pairs over them (a ``-o`` pair that names a
    Checkpointer option, ``-o max_record_bytes=...``, sets that option).
    """
    options = RunOptions(storage=url)
    storage_options = {**options.storage_options, **parse_pairs(pairs)}
    with Checkpointer(url, local=True, options=options.checkpointer, **storage_options) as ckpt:
        yield ckpt


def echo_json(data: Any) -> None:
    """``data`` as indented strict JSON on stdout."""
    typer.echo(json.dumps(data, indent=2, allow_nan=False))


def human_bytes(n: int | None) -> str:
    """``10184`` -> ``"9.9 KiB"`` (binary units; bytes shown exactly below 1 KiB)."""
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"


def new_table(title: str, **options: Any) -> Table:
    """A borderless table with its title on the left, as every command prints them."""
    return Table(title=title, title_justify="left", box=box.SIMPLE, show_edge=False, pad_edge=False, **options)
