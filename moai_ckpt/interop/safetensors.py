"""Model weights of a snapshot as safetensors files, laid out the way Hugging Face ``transformers`` loads them.

One file ``model.safetensors``, or shards ``model-0000k-of-0000n.safetensors`` and the index
``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": {name: file}}``),
split by ``huggingface_hub``'s own sharding rule. Tensors keep their dtype (bfloat16 and float8
included) and their bytes; tied weights (one array under two names) are written under both names.
Reading goes through the checked snapshot reader, one shard's arrays at a time, so memory stays
near one shard's size.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moai_ckpt.dtypes import from_name
from moai_ckpt.errors import InteropError, MoaiCkptError
from moai_ckpt.format import ArrayRecord
from moai_ckpt.interop.state import check_entries, open_reader
from moai_ckpt.snapshot import Progress, SnapshotReader

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FILE_PATTERN = "model{suffix}.safetensors"
_OUR_FILES = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")
WEIGHT_KINDS = ("module", "partial", "stateful", "json")


@dataclass(frozen=True)
class SafetensorsExport:
    """What `export_safetensors` wrote.

    Attributes:
        directory: the output directory.
        step: the snapshot's step.
        key: the snapshot entry exported.
        files: the files written, shards first and the index (if any) last.
        tensors: how many names the files hold.
        total_size: bytes of distinct tensor data (tied weights counted once, as in the index).
        skipped: names of the entry's values that are not tensors (not exported).
    """

    directory: str
    step: int
    key: str
    files: list[str]
    tensors: int
    total_size: int
    skipped: list[str] = field(default_factory=list)


def weight_arrays(tree: Any, prefix: str = "") -> tuple[dict[str, str], list[str]]:
    """The tensors of an encoded state tree: flat dotted name -> array path, and the other values' names.

    Nested mappings are flattened with ``.`` (``{"a": {"b": t}}`` -> ``a.b``), as state dicts name them.
    """
    weights: dict[str, str] = {}
    skipped: list[str] = []
    for name, node in tree.items():
        full = f"{prefix}{name}"
        ref = node.get("$tensor", node.get("$ndarray")) if isinstance(node, dict) and len(node) == 1 else None
        if isinstance(ref, str):
            weights[full] = ref
        elif isinstance(node, dict) and node and not any(str(k).startswith("$") for k in node):
            inner, rest = weight_arrays(node, f"{full}.")
            weights |= inner
            skipped += rest
        else:
            skipped.append(full)
    return weights, skipped


def _nbytes(record: ArrayRecord) -> int:
    return math.prod(record.shape) * from_name(record.dtype).itemsize


def _supported_dtypes() -> set[str]:
    import safetensors.torch

    table = getattr(safetensors.torch, "_TYPES", None)  # dtype names by safetensors code, where the version has it
    if not isinstance(table, dict):
        return set()
    return {str(dtype).removeprefix("torch.") for dtype in table.values()}


def _select(reader: SnapshotReader, key: str) -> tuple[dict[str, str], list[str]]:
    """The weights (name -> array path) of entry ``key``, checked exportable before anything is written."""
    check_entries(reader, [key])
    record = reader.manifest.objects[key]
    where: dict[str, Any] = {"url": reader.storage.url, "step": reader.step, "key": key}
    if record.kind not in WEIGHT_KINDS or not isinstance(record.tree, dict):
        raise InteropError(
            f"entry {key!r} is of kind {record.kind} ({record.type}), not a state dict of weights", **where
        )
    weights, skipped = weight_arrays(record.tree)
    if not weights:
        raise InteropError(f"entry {key!r} holds no tensors", **where)
    supported = _supported_dtypes()
    for name, path in weights.items():
        dtype = reader.arrays[path].dtype
        if supported and dtype not in supported:
            raise InteropError(
                f"{name}: dtype {dtype} has no safetensors type (it has {sorted(supported)})",
                **{**where, "key": f"{key}.{name}"},
            )
    return weights, skipped


def _clear_target(directory: Path, overwrite: bool) -> list[Path]:
    """Create ``directory``; return the model files already in it (an error unless ``overwrite``)."""
    directory.mkdir(parents=True, exist_ok=True)
    existing = sorted(p for p in directory.iterdir() if _OUR_FILES.match(p.name))
    if existing and not overwrite:
        raise InteropError(
            f"{directory} already holds {', '.join(p.name for p in existing)}; pass overwrite=True "
            "(--overwrite) to replace them",
            url=str(directory),
        )
    return existing


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _write_shard(
    reader: SnapshotReader,
    weights: dict[str, str],
    names: list[str],
    path: Path,
    metadata: dict[str, str],
    progress: Progress | None = None,
) -> None:
    from safetensors.torch import save_file

    tensors = reader.read_arrays(sorted({weights[n] for n in names}), progress)
    shard: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    for name in names:
        array = weights[name]
        # safetensors refuses two names on one storage: a tied weight's second name gets its own copy
        shard[name] = tensors[array].clone() if array in seen else tensors[array]
        seen.add(array)
    save_file(shard, str(path), metadata=metadata)


@contextmanager
def _local_writes(directory: Path) -> Iterator[None]:
    """Failures of the output directory as `InteropError`s naming it (storage errors of the snapshot pass)."""
    from safetensors import SafetensorError

    try:
        yield
    except MoaiCkptError:
        raise
    except (OSError, SafetensorError) as exc:
        raise InteropError(f"cannot write the export: {type(exc).__name__}: {exc}", url=str(directory)) from None


def _write_files(
    reader: SnapshotReader,
    weights: dict[str, str],
    split: Any,
    out: Path,
    overwrite: bool,
    key: str,
    progress: Progress | None = None,
) -> list[str]:
    """Write the shards under temporary names, rename them, write the index, drop stale files."""
    stale = _clear_target(out, overwrite)
    metadata = {"format": "pt", "moai_ckpt.step": str(reader.step), "moai_ckpt.entry": key}
    staged: list[tuple[Path, Path]] = []
    try:
        for filename, names in split.filename_to_tensors.items():
            temporary = out / f".{filename}.{os.getpid()}.tmp"
            staged.append((temporary, out / filename))
            _write_shard(reader, weights, names, temporary, metadata, progress)
        for temporary, final in staged:
            os.replace(temporary, final)
    finally:
        for temporary, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
    files = [final.name for _, final in staged]
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        _write_atomic(out / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True) + "\n")
        files.append(INDEX_FILE)
    for old in stale:
        if old.name not in files:
            old.unlink(missing_ok=True)
    return files


def export_safetensors(
    url: str,
    directory: str | os.PathLike[str],
    *,
    step: int | None = None,
    key: str = "model",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: Progress | None = None,
    **storage_options: Any,
) -> SafetensorsExport:
    """Write the weights of snapshot entry ``key`` as safetensors files that ``from_pretrained`` loads.

    Args:
        url: the run directory (a local path or any fsspec URL).
        directory: a local output directory (created if needed). Add the model's ``config.json``
            (``config.save_pretrained(directory)``) to load it with ``AutoModel*.from_pretrained``.
        step: the snapshot's step (the latest committed one by default).
        key: the entry holding the weights: a module (``{"model": model}``), a placed run's
            partial model, or any state dict of tensors.
        max_shard_size: largest shard, bytes or a size such as ``"5GB"`` / ``"500MB"``; a tensor
            larger than this gets a shard of its own (as in ``transformers``).
        overwrite: replace model files already in ``directory`` (stale shards are removed).
        progress: called with the byte count of each chunk read.
        **storage_options: passed to the storage back end.

    Returns:
        What was written.

    Raises:
        SnapshotNotFoundError: no committed snapshot (at ``step``).
        CorruptSnapshotError: the snapshot fails a check; files written so far stay temporary.
        InteropError: no such entry, not weights, a dtype safetensors lacks, or existing files.
    """
    from huggingface_hub import split_state_dict_into_shards_factory

    out = Path(directory)
    with open_reader(url, step, **storage_options) as reader:
        weights, skipped = _select(reader, key)
        records = {name: reader.arrays[path] for name, path in weights.items()}
        try:
            split = split_state_dict_into_shards_factory(
                records,
                get_storage_size=_nbytes,
                get_storage_id=lambda record: record.path,  # tied weights share an array: one shard, counted once
                filename_pattern=FILE_PATTERN,
                max_shard_size=max_shard_size,
            )
        except ValueError as exc:
            raise InteropError(f"max shard size {max_shard_size!r}: {exc}", url=reader.storage.url) from None
        with _local_writes(out):
            files = _write_files(reader, weights, split, out, overwrite, key, progress)
        return SafetensorsExport(
            directory=str(out),
            step=reader.step,
            key=key,
            files=files,
            tensors=len(weights),
            total_size=int(split.metadata.get("total_size", sum(_nbytes(r) for r in records.values()))),
            skipped=skipped,
        )
