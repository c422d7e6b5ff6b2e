"""``moai-ckpt export``, ``import-dcp`` and ``export-dcp``: snapshots to and from other checkpoint formats.

moai-ckpt export runs/gpt --format safetensors --to hf/gpt --max-shard-size 2GB
moai-ckpt import-dcp outputs/checkpoint/step-1000 s3://bucket/run --trust-dcp-metadata
moai-ckpt export-dcp s3://bucket/run outputs/checkpoint/step-1000
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from moai_ckpt.cli.base import (
    JsonOpt,
    StepOpt,
    StorageOpt,
    UrlArg,
    command,
    echo_json,
    human_bytes,
    open_run,
    out,
    parse_pairs,
)
from moai_ckpt.cli.terminal import ProgressOpt, bytes_progress, snapshot_bytes

OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace what the destination already holds.")]
DcpDirArg = Annotated[str, typer.Argument(help="DCP checkpoint directory: a local path or an fsspec URL.")]


class ExportFormat(str, Enum):
    """Formats `moai-ckpt export` writes."""

    safetensors = "safetensors"


@command("export")
def export_weights(
    url: UrlArg,
    to: Annotated[str, typer.Option("--to", help="Output directory (local; created if needed).")],
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help="Output format.")] = ExportFormat.safetensors,
    step: StepOpt = None,
    key: Annotated[str, typer.Option("--key", "-k", help="The snapshot entry holding the weights.")] = "model",
    max_shard_size: Annotated[
        str,
        typer.Option(
            "--max-shard-size", help="Largest shard file: 5GB, 500MB (decimal units, as transformers) or bytes."
        ),
    ] = "5GB",
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    show_progress: ProgressOpt = None,
    storage_option: StorageOpt = None,
) -> None:
    """Export a snapshot's model weights as safetensors files that transformers' from_pretrained loads.

    Writes model.safetensors, or model-0000k-of-0000n.safetensors shards and
    model.safetensors.index.json; dtypes and bytes are kept. Add the model's config.json to load it.
    """
    from moai_ckpt.interop.safetensors import export_safetensors

    size: int | str = int(max_shard_size) if max_shard_size.isdigit() else max_shard_size
    with bytes_progress("export", _snapshot_total(url, storage_option, step, [key]), show_progress) as advance:
        result = export_safetensors(
            url,
            to,
            step=step,
            key=key,
            max_shard_size=size,
            overwrite=overwrite,
            progress=advance,
            **parse_pairs(storage_option),
        )
    if as_json:
        echo_json({"format": fmt.value, **vars(result)})
        return
    out.print(
        f"exported {result.tensors} tensors ({human_bytes(result.total_size)}) of entry "
        f"{escape(result.key)!r} at step {result.step} to {escape(result.directory)}: "
        + ", ".join(escape(f) for f in result.files),
        soft_wrap=True,
    )
    if result.skipped:
        out.print(f"[yellow]not tensors, not exported:[/] {escape(', '.join(result.skipped))}", soft_wrap=True)


@command("import-dcp")
def import_dcp_command(
    dcp_dir: DcpDirArg,
    url: UrlArg,
    step: Annotated[
        int | None,
        typer.Option("--step", "-s", min=0, help="Snapshot step (default: N of a step-N directory, else 0)."),
    ] = None,
    trust: Annotated[
        bool,
        typer.Option(
            "--trust-dcp-metadata",
            help="Allow unpickling the checkpoint's .metadata (DCP's format): only for checkpoints you trust.",
        ),
    ] = False,
    top_level_key: Annotated[
        str, typer.Option("--top-level-key", help="The entry that gathers tensors saved at the top level.")
    ] = "model",
    module_key: Annotated[
        list[str] | None,
        typer.Option("--module-key", help="An entry to record as a module, repeatable (default: model)."),
    ] = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    show_progress: ProgressOpt = None,
    storage_option: StorageOpt = None,
) -> None:
    """Save a DCP checkpoint (torch.distributed.checkpoint, e.g. torchtitan's) as a snapshot of URL."""
    from moai_ckpt.interop.dcp import import_dcp

    with bytes_progress("import", _dcp_total(dcp_dir), show_progress) as advance:
        result = import_dcp(
            dcp_dir,
            url,
            step=step,
            trust_metadata=trust,
            top_level_key=top_level_key,
            module_keys=module_key or None,
            overwrite=overwrite,
            progress=advance,
            **parse_pairs(storage_option),
        )
    if as_json:
        echo_json(vars(result))
        return
    out.print(
        f"imported {result.tensors} tensors from {escape(dcp_dir)} as step {result.step} of "
        f"{escape(result.url)}: entries {escape(', '.join(result.entries))}",
        soft_wrap=True,
    )
    if result.top_level_key:
        out.print(f"top-level tensors gathered into entry {escape(result.top_level_key)!r}", soft_wrap=True)
    if result.opaque:
        out.print(
            f"[yellow]kept as raw torch.save bytes (not opened):[/] {escape(', '.join(result.opaque))}",
            soft_wrap=True,
        )


@command("export-dcp")
def export_dcp_command(
    url: UrlArg,
    dcp_dir: DcpDirArg,
    step: StepOpt = None,
    key: Annotated[
        list[str] | None,
        typer.Option("--key", "-k", help="An entry to write, repeatable (default: all but the RNG states)."),
    ] = None,
    overwrite: OverwriteOpt = False,
    trust_payloads: Annotated[
        bool,
        typer.Option(
            "--trust-payloads",
            help="Write raw torch.save payloads an import kept (DCP's loader unpickles them): trusted snapshots only.",
        ),
    ] = False,
    as_json: JsonOpt = False,
    show_progress: ProgressOpt = None,
    storage_option: StorageOpt = None,
) -> None:
    """Write a snapshot as a DCP checkpoint that torch.distributed.checkpoint.load reads."""
    from moai_ckpt.interop.dcp import export_dcp

    total = _snapshot_total(url, storage_option, step, key or None)
    with bytes_progress("export", total, show_progress) as advance:
        result = export_dcp(
            url,
            dcp_dir,
            step=step,
            keys=key or None,
            overwrite=overwrite,
            trust_payloads=trust_payloads,
            progress=advance,
            **parse_pairs(storage_option),
        )
    if as_json:
        echo_json(vars(result))
        return
    out.print(
        f"exported step {result.step} ({result.tensors} tensors; entries {escape(', '.join(result.entries))}) "
        f"to {escape(result.dcp_dir)}",
        soft_wrap=True,
    )


def _snapshot_total(url: str, pairs: list[str] | None, step: int | None, keys: list[str] | None) -> int | None:
    """The tensor bytes an export reads, for its progress bar (every entry's when ``keys`` is None)."""
    with open_run(url, pairs) as ckpt:
        return snapshot_bytes(ckpt, step, keys)


def _dcp_total(dcp_dir: str) -> int | None:
    """The bytes of a local DCP checkpoint's data files (None for a URL), for the import's progress bar."""
    folder = Path(dcp_dir)
    return sum(f.stat().st_size for f in folder.glob("*.distcp")) if folder.is_dir() else None


__all__ = ["ExportFormat", "export_dcp_command", "export_weights", "import_dcp_command"]
