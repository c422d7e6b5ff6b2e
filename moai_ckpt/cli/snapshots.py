"""``moai-ckpt list``, ``inspect``, ``verify`` and ``prune``: the snapshots of a run, read and maintained.

None of them runs training code: they read the run directory (``verify`` re-reads every chunk and
checks every checksum) and ``prune`` deletes the snapshots no retention policy keeps, leftovers
of failed saves, and the logs only they could replay.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.cli.base import (
    JsonOpt,
    StepOpt,
    StorageOpt,
    UrlArg,
    command,
    echo_json,
    err,
    human_bytes,
    new_table,
    open_run,
    out,
    shown_url,
)
from moai_ckpt.cli.terminal import ProgressOpt, print_table, progress, snapshot_bytes
from moai_ckpt.dtypes import from_name
from moai_ckpt.errors import SnapshotNotFoundError, UnsupportedFormatError
from moai_ckpt.format import ArrayRecord, Manifest
from moai_ckpt.layout import snapshot_dir
from moai_ckpt.pruner import PrunePlan
from moai_ckpt.pruning import prune_run
from moai_ckpt.results import SnapshotEntry, VerifyReport
from moai_ckpt.retention import KeepBest, KeepEvery, KeepInterval, KeepLast, RetentionPolicy, parse_duration
from moai_ckpt.tree import decode, tensor_refs

__all__ = ["human_bytes", "inspect_snapshot", "list_snapshots", "prune_snapshots", "verify_snapshots"]


# -- presentation --------------------------------------------------------------------


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
    table = new_table(f"snapshots in {escape(shown_url(url))} (times in {zone})")
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


@command("list")
def list_snapshots(
    url: UrlArg,
    show_all: Annotated[
        bool, typer.Option("--all", "-a", help="Also show uncommitted, invalid and unsupported directories.")
    ] = False,
    as_json: JsonOpt = False,
    storage_option: StorageOpt = None,
) -> None:
    """List the committed snapshots of a run (step, created, size, arrays, world size, devices)."""
    with open_run(url, storage_option) as ckpt:
        entries = ckpt.scan()
        if not entries:
            raise SnapshotNotFoundError("no snapshot directories here (is the URL right?)", url=ckpt.url)
        shown = entries if show_all else [e for e in entries if e.status == "committed"]
        if as_json:
            echo_json([_entry_json(e) for e in shown])
            return
        print_table(_snapshots_table(ckpt.url, shown, show_all), drop=("devices", "created"))
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
    table = new_table("entries")
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
    table = new_table("arrays", show_footer=True)
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
    out.print(_header(data))
    out.print()
    for table in (_entries_table(manifest), _arrays_table(manifest)):
        print_table(table)
        out.print()
    for key, value in data["extras"].items():
        out.print(f"[italic]json[/] [bold]{escape(key)}[/]")
        out.print_json(json.dumps(value))


@command("inspect")
def inspect_snapshot(
    url: UrlArg, step: StepOpt = None, as_json: JsonOpt = False, storage_option: StorageOpt = None
) -> None:
    """Show a snapshot's entries, arrays (dtype, shape, bytes) and JSON extras."""
    with open_run(url, storage_option) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise SnapshotNotFoundError("no committed snapshot in this run directory", url=ckpt.url)
        manifest, marker = ckpt.manifest(step), ckpt.marker(step)
        data = _inspect_json(ckpt.url, manifest, marker.body.total_bytes, marker.body.writer)
        if as_json:
            echo_json(data)
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


def _verify_all(ckpt: Checkpointer, targets: list[SnapshotEntry], show: bool | None = None) -> list[_Verified]:
    results = []
    with progress("bytes", show=show) as bar:
        for entry in targets:
            task = bar.add_task(f"verify step {entry.step}", total=snapshot_bytes(ckpt, entry.step))
            started = time.perf_counter()
            report = ckpt.verify(entry.step, progress=functools.partial(bar.advance, task))
            results.append(_Verified(report, time.perf_counter() - started))
    return results


def _faults_table(results: list[_Verified]) -> Table:
    table = new_table("faults", title_style="bold red")
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


@command("verify")
def verify_snapshots(
    url: UrlArg,
    step: StepOpt = None,
    every: Annotated[bool, typer.Option("--all", "-a", help="Verify every committed snapshot.")] = False,
    as_json: JsonOpt = False,
    show_progress: ProgressOpt = None,
    storage_option: StorageOpt = None,
) -> None:
    """Re-read every chunk and check every checksum; exit 1 if anything is wrong."""
    if every and step is not None:
        raise typer.BadParameter("give either --step or --all, not both", param_hint="'--step'")
    with open_run(url, storage_option) as ckpt:
        results = _verify_all(ckpt, _verify_targets(ckpt, step, every), show_progress)
    if as_json:
        echo_json([r.as_json() for r in results])
    else:
        if any(not r.report.ok for r in results):
            print_table(_faults_table(results))
        for r in results:
            out.print(_summary(r), soft_wrap=True)
    if any(not r.report.ok for r in results):
        raise typer.Exit(1)


# -- prune -------------------------------------------------------------------------------------


def _best_policy(spec: str) -> KeepBest:
    """``METRIC[:min|max][:K]`` as a `KeepBest` (a bad one is a usage error naming the option)."""
    metric, *rest = spec.split(":")
    fields: dict[str, Any] = {"metric": metric}
    for part in rest:
        if part in ("min", "max"):
            fields["mode"] = part
        elif part.isdigit():
            fields["k"] = int(part)
        else:
            raise typer.BadParameter(
                f"{spec!r}: expected METRIC[:min|max][:K], e.g. loss:min:3", param_hint="'--keep-best'"
            )
    if not metric or fields.get("k", 1) < 1:
        raise typer.BadParameter(f"{spec!r}: expected METRIC[:min|max][:K] with K >= 1", param_hint="'--keep-best'")
    return KeepBest(**fields)


def _cli_policies(
    last: int | None, every: int | None, best: list[str] | None, interval: str | None
) -> list[RetentionPolicy]:
    """The policies the ``--keep-*`` options name (at least one)."""
    policies: list[RetentionPolicy] = []
    if last is not None:
        policies.append(KeepLast(n=last))
    if every is not None:
        policies.append(KeepEvery(steps=every))
    policies.extend(_best_policy(spec) for spec in best or [])
    if interval is not None:
        try:
            policies.append(KeepInterval(every=parse_duration(interval)))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--keep-interval'") from None
    if not policies:
        raise typer.BadParameter(
            "give at least one of --keep-last, --keep-every, --keep-best, --keep-interval", param_hint="'--keep-last'"
        )
    return policies


def _prune_table(url: str, plan: PrunePlan) -> Table:
    zone = datetime.now().astimezone().tzname()
    verb = "would delete" if plan.dry_run else "deleted"
    table = new_table(f"prune {escape(shown_url(url))}: {verb} {len(plan.deleted)} (times in {zone})")
    table.add_column("step", justify="right", style="bold", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("committed", no_wrap=True)
    table.add_column("action", no_wrap=True)
    table.add_column("why", overflow="fold", ratio=1)
    for row in plan.rows:
        action = f"[red]{'delete' if plan.dry_run else 'deleted'}[/]" if row.delete else "[green]keep[/]"
        created = _local_time(row.created)[:16] if row.created else "-"
        size = human_bytes(row.total_bytes) if row.total_bytes is not None else "-"
        table.add_row(str(row.step), row.status, size, created, action, escape(row.reason))
    return table


def _prune_json(plan: PrunePlan, policies: list[RetentionPolicy]) -> dict[str, Any]:
    return {
        "dry_run": plan.dry_run,
        "deleted": plan.deleted,
        "kept": plan.kept,
        "policies": [p.model_dump() for p in policies],
        "snapshots": [
            {
                "step": r.step,
                "status": r.status,
                "delete": r.delete,
                "reason": r.reason,
                "bytes": r.total_bytes,
                "created": r.created,
            }
            for r in plan.rows
        ],
    }


@command("prune")
def prune_snapshots(
    url: UrlArg,
    keep_last: Annotated[
        int | None,
        typer.Option("--keep-last", "--keep", "-k", min=1, help="Keep the newest N committed snapshots."),
    ] = None,
    keep_every: Annotated[
        int | None, typer.Option("--keep-every", min=1, help="Keep the snapshots of every Mth step (step % M == 0).")
    ] = None,
    keep_best: Annotated[
        list[str] | None,
        typer.Option(
            "--keep-best",
            help="Keep the K best by a logged metric: METRIC[:min|max][:K], e.g. loss:min:3 (repeatable).",
        ),
    ] = None,
    keep_interval: Annotated[
        str | None,
        typer.Option("--keep-interval", help="Keep one snapshot per period of commit time, e.g. 6h, 30m, 1d."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", "-n", help="Show what would be deleted; delete nothing.")
    ] = False,
    as_json: JsonOpt = False,
    storage_option: StorageOpt = None,
) -> None:
    """Delete the committed snapshots no --keep-* policy keeps, leftovers of failed saves, and their logs.

    A snapshot any policy keeps stays; the newest committed one always stays. Asks nothing:
    use --dry-run to see the plan first.
    """
    policies = _cli_policies(keep_last, keep_every, keep_best, keep_interval)
    with open_run(url, storage_option) as ckpt:
        plan = prune_run(ckpt, policies, dry_run=dry_run)
    if as_json:
        echo_json(_prune_json(plan, policies))
        return
    out.print(_prune_table(url, plan))
    kept = plan.kept
    verb = "would keep" if dry_run else "kept"
    out.print(
        f"{verb} {len(kept)} committed snapshot{'s' if len(kept) != 1 else ''}: {', '.join(map(str, kept)) or '-'}"
    )
