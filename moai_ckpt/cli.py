"""The ``moai-ckpt`` command line: list, inspect, verify and prune the snapshots of a run.

Every command takes the run directory as a URL (a local path or any fsspec URL) and storage
options as repeatable ``-o key=value`` pairs (used to open storage, never recorded anywhere).
Tables go to stdout, progress bars and errors to stderr, so ``--json`` output stays parseable.
Exit codes: 0 success, 1 a check found faults (verify, replay --verify, diff-ops), 2 an error:
any failure prints one red line (naming URL, step and key for a moai-ckpt error; a traceback
only with ``--debug``), or bad usage. A password in a URL is never printed.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from moai_ckpt import __version__
from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.dtypes import from_name
from moai_ckpt.errors import MoaiCkptError, SnapshotNotFoundError, UnsupportedFormatError, redact_url
from moai_ckpt.format import ArrayRecord, Manifest
from moai_ckpt.layout import STEP_DIGITS, snapshot_dir
from moai_ckpt.pruning import prune_run
from moai_ckpt.results import SnapshotEntry, VerifyReport
from moai_ckpt.tree import decode, tensor_refs

try:  # recent typer releases carry their own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - typer on top of click
    from click import ClickException  # type: ignore[assignment]

app = typer.Typer(
    name="moai-ckpt",
    help="Inspect and maintain moai-ckpt snapshots on any fsspec storage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # every error gets one red line (see _command); tracebacks with --debug
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
class _Session:
    """Global options of the current invocation (set by the root callback)."""

    debug: bool = False


_session = _Session()


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
    _session.debug = debug
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")


def shown_url(url: str) -> str:
    """A URL as messages show it: without a password (``s3://key:secret@host`` -> ``s3://***@host``)."""
    return redact_url(url)


def _fail(exc: BaseException, *, unexpected: bool = False) -> NoReturn:
    """Print an error as one red line (a traceback too under ``--debug``) and exit 2.

    Called inside the ``except`` block that caught ``exc``.
    """
    if _session.debug:
        err.print_exception()
    message = re.sub(r"\s*\n\s*", "; ", str(exc).strip())
    if unexpected:
        hint = "" if _session.debug else "; re-run with --debug for the traceback"
        message = f"unexpected {type(exc).__name__}: {message or 'no message'}{hint}"
    err.print(f"error: {escape(redact_url(message))}", style="bold red", soft_wrap=True)
    raise typer.Exit(2)


def _command(name: str, on: typer.Typer = app) -> Callable[[F], F]:
    """Register a command on ``on`` whose every failure ends as one red line and exit code 2.

    A moai-ckpt error prints its message (URL, step and key); any other exception is a bug or a
    failure of the training code, printed as one line too, with a hint to re-run with ``--debug``.
    Exits the command chose (``typer.Exit``) and usage errors pass through as they are.
    """

    def register(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
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

        on.command(name)(run)
        return fn

    return register


def _storage_options(pairs: list[str] | None, option: str = "'-o' / '--storage-option'") -> dict[str, Any]:
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
def _open(url: str, pairs: list[str] | None) -> Iterator[Checkpointer]:
    with Checkpointer(url, local=True, **_storage_options(pairs)) as ckpt:
        yield ckpt


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, allow_nan=False))


# -- presentation helpers --------------------------------------------------------------------


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


def _table(title: str, **options: Any) -> Table:
    return Table(title=title, title_justify="left", box=box.SIMPLE, show_edge=False, pad_edge=False, **options)


def _local_time(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return iso


def _array_bytes(record: ArrayRecord) -> int | None:
    try:
        return math.prod(record.shape) * from_name(record.dtype).itemsize
    except ValueError:  # a dtype this version does not know; verify reports it
        return None


def _dtype_label(name: str) -> str:
    try:
        stored = from_name(name)
    except ValueError:
        return f"{name} (unknown)"
    return f"{name} (as {stored.zarr})" if stored.reinterpreted else name


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _where_stripped(message: str) -> str:
    """A fault message without its trailing ``[url=..., step=..., key=...]`` (shown in columns)."""
    return re.sub(r" \[(?:url|step|key)=[^\[\]]*\]$", "", message)


# -- list --------------------------------------------------------------------------------------

_STATUS_STYLE = {"committed": "green", "uncommitted": "yellow", "invalid": "red", "unsupported": "magenta"}


def _entry_json(entry: SnapshotEntry) -> dict[str, Any]:
    body = entry.marker.body if entry.marker else None
    return {
        "step": entry.step,
        "status": entry.status,
        "created": body.created if body else None,
        "total_bytes": body.total_bytes if body else None,
        "array_count": body.array_count if body else None,
        "world_size": body.world_size if body else None,
        "device_types": body.device_types if body else None,
        "problem": entry.problem,
    }


def _problem(entry: SnapshotEntry) -> str:
    if entry.status == "uncommitted":
        return "no commit marker: interrupted or in-progress save"
    return _where_stripped(entry.problem or "")


def _snapshot_cells(entry: SnapshotEntry, show_all: bool) -> list[str]:
    body = entry.marker.body if entry.marker else None
    cells = [str(entry.step)]
    if show_all:
        cells.append(f"[{_STATUS_STYLE[entry.status]}]{entry.status}[/]")
    if body:
        cells += [_local_time(body.created), human_bytes(body.total_bytes), str(body.array_count)]
        cells += [str(body.world_size), escape(", ".join(body.device_types) or "-")]
    else:
        cells += ["-"] * 5
    return cells


def _snapshots_table(url: str, entries: list[SnapshotEntry], show_all: bool) -> Table:
    zone = datetime.now().astimezone().tzname()
    table = _table(f"snapshots in {escape(shown_url(url))} (times in {zone})")
    table.add_column("step", justify="right", style="bold", no_wrap=True)
    if show_all:
        table.add_column("status", no_wrap=True)
    table.add_column("created")
    table.add_column("size", justify="right")
    table.add_column("arrays", justify="right")
    table.add_column("world", justify="right")
    table.add_column("devices")
    for entry in entries:
        table.add_row(*_snapshot_cells(entry, show_all))
    return table


@_command("list")
def list_snapshots(
    url: UrlArg,
    show_all: Annotated[
        bool, typer.Option("--all", "-a", help="Also show uncommitted, invalid and unsupported directories.")
    ] = False,
    as_json: JsonOpt = False,
    storage_option: StorageOpt = None,
) -> None:
    """List the committed snapshots of a run (step, created, size, arrays, world size, devices)."""
    with _open(url, storage_option) as ckpt:
        entries = ckpt.scan()
        if not entries:
            raise SnapshotNotFoundError("no snapshot directories here (is the URL right?)", url=ckpt.url)
        shown = entries if show_all else [e for e in entries if e.status == "committed"]
        if as_json:
            _echo_json([_entry_json(e) for e in shown])
            return
        out.print(_snapshots_table(ckpt.url, shown, show_all))
        for e in shown:
            if e.status != "committed":
                out.print(
                    f"[{_STATUS_STYLE[e.status]}]step {e.step} {e.status}[/]: {escape(_problem(e))}", soft_wrap=True
                )
        hidden = len(entries) - len(shown)
        if hidden:
            noun = "directory" if hidden == 1 else "directories"
            out.print(f"[dim]not shown: {hidden} {noun} without a valid commit (see --all)[/]")


# -- inspect -----------------------------------------------------------------------------------


def _readable(tree: Any) -> Any:
    """Decode a stored JSON tree for display: tensor references become ``<array PATH>`` strings."""

    def refs_to_text(node: Any) -> Any:
        if isinstance(node, dict):
            for tag in ("$tensor", "$ndarray"):
                if isinstance(node.get(tag), str) and len(node) == 1:
                    return f"<array {node[tag]}>"
            return {k: refs_to_text(v) for k, v in node.items()}
        if isinstance(node, list):
            return [refs_to_text(v) for v in node]
        return node

    return _plain(decode(refs_to_text(tree), {}))


def _plain(value: Any) -> Any:
    """Strict-JSON form of a decoded value (tuples as lists, NaN and odd types as strings)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _inspect_json(url: str, manifest: Manifest, total_bytes: int, writer: dict[str, str]) -> dict[str, Any]:
    return {
        "url": shown_url(url),
        "step": manifest.step,
        "created": manifest.created,
        "format_version": manifest.format_version,
        "world_size": manifest.world_size,
        "device_types": manifest.device_types,
        "total_bytes": total_bytes,
        "writer": writer,
        "info": _plain(manifest.info),
        "entries": [
            {"key": key, "kind": obj.kind, "type": obj.type, "arrays": sorted(tensor_refs(obj.tree))}
            for key, obj in manifest.objects.items()
        ],
        "arrays": [
            {**r.model_dump(mode="json"), "shape": list(r.shape), "bytes": _array_bytes(r)}
            for r in manifest.arrays.values()
        ],
        "extras": {key: _readable(obj.tree) for key, obj in manifest.objects.items() if obj.kind == "json"},
    }


def _entries_table(manifest: Manifest) -> Table:
    table = _table("entries")
    for name in ("key", "kind", "type", "arrays", "bytes"):
        table.add_column(name, justify="right" if name in ("arrays", "bytes") else "left", overflow="fold")
    for key, obj in manifest.objects.items():
        refs = tensor_refs(obj.tree)
        size = sum(_array_bytes(manifest.arrays[r]) or 0 for r in refs if r in manifest.arrays)
        table.add_row(escape(key), obj.kind, escape(obj.type), str(len(refs)), human_bytes(size) if refs else "-")
    return table


def _arrays_table(manifest: Manifest) -> Table:
    records = list(manifest.arrays.values())
    total = sum(_array_bytes(r) or 0 for r in records)
    table = _table("arrays", show_footer=True)
    table.add_column("path", footer=f"{len(records)} arrays", overflow="fold")
    table.add_column("dtype")
    table.add_column("shape", justify="right")
    table.add_column("chunks", justify="right")
    table.add_column("bytes", justify="right", footer=human_bytes(total))
    for r in records:
        table.add_row(
            escape(r.path), _dtype_label(r.dtype), _shape(r.shape), _shape(r.chunks), human_bytes(_array_bytes(r))
        )
    return table


def _header(data: dict[str, Any]) -> Table:
    writer = data["writer"]
    versions = ", ".join(f"{k} {writer[k]}" for k in ("python", "torch") if k in writer)
    by = f"moai-ckpt {writer.get('moai_ckpt', '?')} (format v{data['format_version']}; {versions})"
    rows = {
        "snapshot": f"step {data['step']} of {data['url']}",
        "created": f"{_local_time(data['created'])} ({datetime.now().astimezone().tzname()})",
        "placement": f"world size {data['world_size']} on {', '.join(data['device_types']) or '-'}",
        "stored": f"{human_bytes(data['total_bytes'])} in {len(data['arrays'])} arrays (tensor bytes + a crc32c per chunk)",
        "written by": f"{by} on {writer.get('host', '?')}",
    }
    if data["info"]:
        rows["info"] = json.dumps(data["info"])
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for label, value in rows.items():
        grid.add_row(label, escape(value))
    return grid


def _print_inspect(data: dict[str, Any], manifest: Manifest) -> None:
    for part in (_header(data), _entries_table(manifest), _arrays_table(manifest)):
        out.print(part)
        out.print()
    for key, value in data["extras"].items():
        out.print(f"[italic]json[/] [bold]{escape(key)}[/]")
        out.print_json(json.dumps(value))


@_command("inspect")
def inspect_snapshot(
    url: UrlArg, step: StepOpt = None, as_json: JsonOpt = False, storage_option: StorageOpt = None
) -> None:
    """Show a snapshot's entries, arrays (dtype, shape, bytes) and JSON extras."""
    with _open(url, storage_option) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise SnapshotNotFoundError("no committed snapshot in this run directory", url=ckpt.url)
        manifest, marker = ckpt.manifest(step), ckpt.marker(step)
        data = _inspect_json(ckpt.url, manifest, marker.body.total_bytes, marker.body.writer)
        if as_json:
            _echo_json(data)
        else:
            _print_inspect(data, manifest)


# -- verify ------------------------------------------------------------------------------------


@dataclass
class _Verified:
    report: VerifyReport
    seconds: float

    def as_json(self) -> dict[str, Any]:
        r = self.report
        return {
            "step": r.step,
            "ok": r.ok,
            "arrays": r.arrays,
            "bytes_checked": r.bytes_checked,
            "seconds": round(self.seconds, 4),
            "faults": [{"key": f.key, "kind": f.kind, "message": f.message} for f in r.faults],
        }


def _verify_targets(ckpt: Checkpointer, step: int | None, every: bool) -> list[SnapshotEntry]:
    """The snapshots to verify. A corrupt commit marker is a fault to report; a leftover is not."""
    entries = {e.step: e for e in ckpt.scan()}
    if every:
        for e in entries.values():
            if e.status == "unsupported":
                err.print(f"[yellow]skipped step {e.step}:[/] {escape(_problem(e))}", soft_wrap=True)
        targets = [e for e in entries.values() if e.status in ("committed", "invalid")]
        if not targets:
            raise SnapshotNotFoundError("no committed snapshot to verify", url=ckpt.url)
        return targets
    wanted = ckpt.latest_step() if step is None else step
    entry = entries.get(wanted) if wanted is not None else None
    if entry is None or entry.status == "uncommitted":
        detail = " (the directory has no commit marker: an interrupted save)" if entry else ""
        raise SnapshotNotFoundError(f"no committed snapshot to verify{detail}", url=ckpt.url, step=wanted)
    if entry.status == "unsupported":
        raise UnsupportedFormatError(_problem(entry), url=ckpt.url, step=entry.step)
    return [entry]


def _expected_bytes(ckpt: Checkpointer, step: int) -> int | None:
    try:
        return sum(_array_bytes(r) or 0 for r in ckpt.manifest(step).arrays.values())
    except MoaiCkptError:  # unreadable manifest: verify reports it as a fault
        return None


def _progress() -> Progress:
    """A bytes progress bar on stderr that disappears when done (and stays off when not a terminal)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )


def _verify_all(ckpt: Checkpointer, targets: list[SnapshotEntry]) -> list[_Verified]:
    results = []
    with _progress() as bar:
        for entry in targets:
            task = bar.add_task(f"verify step {entry.step}", total=_expected_bytes(ckpt, entry.step))
            started = time.perf_counter()
            report = ckpt.verify(entry.step, progress=functools.partial(bar.advance, task))
            results.append(_Verified(report, time.perf_counter() - started))
    return results


def _faults_table(results: list[_Verified]) -> Table:
    table = _table("faults", title_style="bold red")
    table.add_column("step", justify="right")
    table.add_column("key", no_wrap=True, overflow="fold")  # keys stay whole when the width allows
    table.add_column("kind", no_wrap=True)
    table.add_column("message", overflow="fold")
    for result in results:
        for f in result.report.faults:
            key = f.key.removeprefix(snapshot_dir(result.report.step) + "/")
            table.add_row(str(result.report.step), escape(key), escape(f.kind), escape(_where_stripped(f.message)))
    return table


def _summary(result: _Verified) -> str:
    r = result.report
    sizes = f"{r.arrays} arrays, {human_bytes(r.bytes_checked)} checked in {result.seconds:.2f} s"
    if r.ok:
        return f"[green]step {r.step}: OK[/], {sizes}"
    return f"[bold red]step {r.step}: {len(r.faults)} fault{'s' if len(r.faults) != 1 else ''}[/], {sizes}"


@_command("verify")
def verify_snapshots(
    url: UrlArg,
    step: StepOpt = None,
    every: Annotated[bool, typer.Option("--all", "-a", help="Verify every committed snapshot.")] = False,
    as_json: JsonOpt = False,
    storage_option: StorageOpt = None,
) -> None:
    """Re-read every chunk and check every checksum; exit 1 if anything is wrong."""
    if every and step is not None:
        raise typer.BadParameter("give either --step or --all, not both", param_hint="'--step'")
    with _open(url, storage_option) as ckpt:
        results = _verify_all(ckpt, _verify_targets(ckpt, step, every))
    if as_json:
        _echo_json([r.as_json() for r in results])
    else:
        if any(not r.report.ok for r in results):
            out.print(_faults_table(results))
        for r in results:
            out.print(_summary(r), soft_wrap=True)
    if any(not r.report.ok for r in results):
        raise typer.Exit(1)


# -- prune -------------------------------------------------------------------------------------


def _prune_lines(entries: dict[int, SnapshotEntry], deleted: list[int], dry_run: bool) -> list[str]:
    verb = "would delete" if dry_run else "deleted"
    lines = []
    for step in deleted:
        entry = entries.get(step)
        size = f", {human_bytes(entry.marker.body.total_bytes)}" if entry and entry.marker else ""
        lines.append(f"[red]{verb}[/] step {step} ({entry.status if entry else 'gone'}{size})")
    for entry in entries.values():
        if entry.step not in deleted and entry.status in ("uncommitted", "invalid"):
            why = "newer than the latest commit: may be a save still running"
            lines.append(f"[yellow]left alone[/] step {entry.step} ({entry.status}, {why})")
    return lines or ["nothing to delete"]


@_command("prune")
def prune_snapshots(
    url: UrlArg,
    keep: Annotated[int, typer.Option("--keep", "-k", min=1, help="How many newest committed snapshots to keep.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", "-n", help="Show what would be deleted; delete nothing.")
    ] = False,
    as_json: JsonOpt = False,
    storage_option: StorageOpt = None,
) -> None:
    """Delete all but the newest KEEP committed snapshots, and leftovers of failed saves."""
    with _open(url, storage_option) as ckpt:
        entries = {e.step: e for e in ckpt.scan()}
        deleted = prune_run(ckpt, keep, dry_run=dry_run)
        kept = [s for s in ckpt.steps() if s not in deleted]
    if as_json:
        _echo_json({"dry_run": dry_run, "deleted": deleted, "kept": kept})
        return
    for line in _prune_lines(entries, deleted, dry_run):
        out.print(line, soft_wrap=True)
    out.print(f"kept {len(kept)} committed snapshot{'s' if len(kept) != 1 else ''}: {', '.join(map(str, kept)) or '-'}")


# -- demo --------------------------------------------------------------------------------------


@_command("demo")
def demo_command(
    directory: Annotated[str, typer.Option("--dir", help="Where the demo's run directories go.")] = "runs/demo",
    steps: Annotated[int, typer.Option("--steps", min=8, help="Training steps of each run.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the training and picks the killed rank, step, phase.")] = 0,
    ranks: Annotated[int, typer.Option("--ranks", min=1, help="Worker processes under torchrun.")] = 2,
    keep: Annotated[bool, typer.Option("--keep", help="Keep earlier demos' run directories.")] = False,
) -> None:
    """Train a small GPT under torchrun, SIGKILL a rank mid-step, and compare the recovered run bitwise.

    Exit code 0 when the recovered run ends bitwise equal to the uninterrupted one, 1 when it does
    not, 2 when the demo could not run.
    """
    from moai_ckpt import demo  # loaded only when the command runs

    try:
        options = demo.DemoOptions(dir=directory, steps=steps, seed=seed, ranks=ranks, keep=keep)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    try:
        comparison = demo.run_demo(options, out)
    except demo.DemoError as exc:  # it could not run; the message ends with the tail of a log, kept as lines
        err.print(f"error: {escape(str(exc))}", style="bold red", soft_wrap=True)
        raise typer.Exit(2) from exc
    raise typer.Exit(0 if comparison.bitwise_equal else 1)


# the commands that re-run training live in modules of their own; importing them registers them
from moai_ckpt import (  # noqa: E402, F401
    cli_chaos,
    cli_interop,
    cli_ops,
    cli_plan,
    cli_replay,
)


def main() -> None:
    """Entry point of the ``moai-ckpt`` console script."""
    app(prog_name="moai-ckpt")


if __name__ == "__main__":
    # `python -m moai_ckpt.cli`: run the importable module, where every command is registered
    from moai_ckpt.cli import main as _main

    _main()
