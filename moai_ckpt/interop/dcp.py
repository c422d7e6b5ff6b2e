"""DCP (``torch.distributed.checkpoint``) checkpoints to snapshots, and snapshots to DCP checkpoints.

A DCP checkpoint is a directory of ``*.distcp`` data files and a ``.metadata`` file that DCP
writes with `pickle`. Reading it therefore unpickles it, which runs whatever code a crafted file
names: `import_dcp` refuses unless the caller says it trusts the checkpoint
(``trust_metadata=True``, ``--trust-dcp-metadata``). Writing one (`export_dcp`) unpickles nothing.

Import rebuilds the checkpoint's own nested state dict from its metadata (DCP's
``planner_data`` holds each value's path), reads every tensor whole (however many ranks saved
it), and saves it as one snapshot with the library's `Checkpointer`:

- each top-level key becomes a snapshot entry; tensors saved at the top level (torchtitan
  flattens its model there) are gathered into one entry (``top_level_key``, ``"model"``);
- a ``module_keys`` entry that is a flat state dict of tensors is recorded as a module, so it
  restores into an ``nn.Module`` and exports to safetensors; other dicts that hold tensors are
  recorded as stateful objects (they restore into anything with ``load_state_dict``), and the
  rest as JSON values (a dict of plain values restores into a dict);
- DCP stores every non-tensor value as a `torch.save` payload. Each is opened with torch's
  restricted loader (``weights_only=True``: plain containers, numbers, strings, tensors); a
  payload it refuses, or whose value a snapshot cannot hold, is kept as its raw bytes, unopened,
  and listed in the manifest's ``info["dcp"]["opaque"]`` so that export can write it back
  verbatim (only with ``trust_payloads``: DCP's loader unpickles it without restriction).

Export writes the decoded entries with `torch.distributed.checkpoint.save` (every rank's RNG
entries left out), undoing the import's grouping, so a checkpoint that went through a snapshot
loads where it came from.
"""

from __future__ import annotations

import io
import itertools
import pickle
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import fsspec
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.planner import ReadItem, WriteItem, WriteItemType

from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.errors import InteropError, UnserializableStateError, UntrustedDataError
from moai_ckpt.interop.state import is_rng_entry, open_reader, read_entries
from moai_ckpt.snapshot import Progress
from moai_ckpt.tree import TensorSink, encode

INFO_KEY = "dcp"
METADATA = ".metadata"
_DCP_FILES = re.compile(r"^(\.metadata|__\d+_\d+\.distcp|__\d+_\.metadata)$")
_STEP_DIR = re.compile(r"^step-(\d+)$")

TRUST_MESSAGE = (
    "reading a DCP checkpoint unpickles its .metadata file (torch's format), and unpickling runs "
    "any code a crafted file names: anyone who could write this directory could run code on this "
    "machine. Pass trust_metadata=True (--trust-dcp-metadata) only for a checkpoint that you or a "
    "job you trust wrote, on storage only you can write (see docs/interop.md)"
)
_DCP_FAILURES = (CheckpointException, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError)

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class DcpImport:
    """What `import_dcp` saved.

    Attributes:
        url: the run directory written.
        step: the snapshot's step.
        entries: the snapshot's entries, in order.
        modules: the entries recorded as modules.
        tensors: how many tensors the checkpoint held.
        top_level_key: the entry that gathers the checkpoint's top-level tensors (None: there were none).
        opaque: DCP keys of values kept as raw `torch.save` bytes (unopened).
    """

    url: str
    step: int
    entries: list[str]
    modules: list[str]
    tensors: int
    top_level_key: str | None
    opaque: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DcpExport:
    """What `export_dcp` wrote.

    Attributes:
        dcp_dir: the DCP checkpoint directory written.
        step: the snapshot's step.
        entries: the snapshot entries written.
        tensors: how many tensor values the checkpoint holds.
        verbatim: DCP keys written back as the raw bytes an import kept.
    """

    dcp_dir: str
    step: int
    entries: list[str]
    tensors: int
    verbatim: list[str] = field(default_factory=list)


class ImportedModule(torch.nn.Module):
    """An imported state dict of tensors, recorded as a module: it restores into any ``nn.Module`` with its names."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._weights = weights

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self._weights


class ImportedState:
    """An imported nested state, recorded as a stateful object: it restores into anything with ``load_state_dict``."""

    def __init__(self, tree: dict[str, Any]) -> None:
        self._tree = tree

    def state_dict(self) -> dict[str, Any]:
        return self._tree

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._tree = state


# -- reading a DCP checkpoint ------------------------------------------------------------------


def _extend(items: list[Any], index: int) -> None:
    items.extend([None] * (index + 1 - len(items)))


def _set_path(root: dict[str, Any], path: Path_, value: Any) -> None:
    """Put ``value`` at ``path`` (mapping keys and list indices), creating the containers on the way."""
    node: Any = root
    for here, following in itertools.pairwise(path):
        empty: Any = [] if isinstance(following, int) else {}
        if isinstance(node, list):
            assert isinstance(here, int)
            _extend(node, here)
            if node[here] is None:
                node[here] = empty
            node = node[here]
        else:
            node = node.setdefault(here, empty)
    last = path[-1]
    if isinstance(node, list):
        assert isinstance(last, int)
        _extend(node, last)
    node[last] = value


def _path_of(fqn: str, metadata: Metadata) -> Path_:
    """Where DCP's metadata says the value of ``fqn`` sat in the saved state dict."""
    path = (metadata.planner_data or {}).get(fqn, (fqn,)) if isinstance(metadata.planner_data, dict) else (fqn,)
    if (
        not isinstance(path, (tuple, list))
        or not path
        or not isinstance(path[0], str)
        or not all(isinstance(p, str) or (isinstance(p, int) and not isinstance(p, bool) and p >= 0) for p in path)
    ):
        raise InteropError(f"DCP metadata gives {fqn!r} the path {path!r}, which is not a state dict path", key=fqn)
    return tuple(path)


class _RebuildPlanner(DefaultLoadPlanner):
    """Loads a whole DCP checkpoint into the nested state dict its metadata describes.

    As torch's own ``_EmptyStateDictLoadPlanner`` (``dcp_to_torch_save``) does, but byte payloads
    are kept raw instead of going through an unrestricted `torch.load`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.payloads: dict[str, bytes] = {}

    def set_up_planner(
        self, state_dict: dict[str, Any], metadata: Metadata | None = None, is_coordinator: bool = False
    ) -> None:
        if metadata is None:
            raise InteropError("DCP gave no metadata to plan the load")
        for fqn, item in metadata.state_dict_metadata.items():
            value = (
                torch.empty(item.size, dtype=item.properties.dtype) if isinstance(item, TensorStorageMetadata) else None
            )
            _set_path(state_dict, _path_of(fqn, metadata), value)
        super().set_up_planner(state_dict, metadata, is_coordinator)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.payloads[read_item.dest_index.fqn] = value.read()

    def path(self, fqn: str) -> Path_:
        return tuple(self.mappings[fqn]) if self.flatten_state_dict else (fqn,)


def _storable(value: Any) -> bool:
    """Whether a snapshot can hold ``value`` (tensors and JSON-able trees; nothing pickled)."""
    try:
        encode(value, "value", TensorSink(lambda path: path))
    except UnserializableStateError:
        return False
    return True


def open_payload(raw: bytes) -> tuple[Any, bool]:
    """A DCP byte payload's value through torch's restricted loader; ``(raw, False)`` if it is refused."""
    try:
        value = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError, ImportError):
        return raw, False
    return (value, True) if _storable(value) else (raw, False)


@contextmanager
def _single_process() -> Iterator[None]:
    """DCP in this process alone (``no_dist``), without torch's warning that it assumes exactly that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _dcp_fs(dcp_dir: str) -> tuple[Any, str]:
    """The file system and path of a DCP directory (a local path or an fsspec URL)."""
    try:
        fs, path = fsspec.core.url_to_fs(dcp_dir)
    except (ValueError, ImportError) as exc:  # an unknown protocol, or its package is not installed
        raise InteropError(f"cannot open the DCP directory: {exc}", url=dcp_dir) from None
    return fs, path.rstrip("/")


def load_dcp(dcp_dir: str, *, trust_metadata: bool = False) -> tuple[dict[str, Any], list[str]]:
    """A DCP checkpoint's whole state dict (CPU tensors) and the keys of the payloads kept as raw bytes.

    Raises:
        UntrustedDataError: ``trust_metadata`` is off (reading unpickles the ``.metadata`` file).
        InteropError: not a DCP checkpoint, or DCP failed to read it.
    """
    if not trust_metadata:
        raise UntrustedDataError(TRUST_MESSAGE, url=dcp_dir)
    fs, path = _dcp_fs(dcp_dir)
    try:
        found = fs.isfile(f"{path}/{METADATA}")
    except OSError as exc:
        raise InteropError(f"cannot read the DCP directory: {exc}", url=dcp_dir) from None
    if not found:
        raise InteropError(f"not a DCP checkpoint: no {METADATA} file in the directory", url=dcp_dir)
    planner = _RebuildPlanner()
    try:
        with _single_process():
            dcp.load({}, checkpoint_id=dcp_dir, planner=planner, no_dist=True)
    except _DCP_FAILURES as exc:
        raise InteropError(f"DCP could not read the checkpoint: {type(exc).__name__}: {exc}", url=dcp_dir) from None
    state = planner.original_state_dict
    opaque = []
    for fqn, raw in sorted(planner.payloads.items()):
        value, opened = open_payload(raw)
        if not opened:
            opaque.append(fqn)
        _set_path(state, planner.path(fqn), value)
    return state, opaque


# -- DCP checkpoint -> snapshot ----------------------------------------------------------------


def step_from_dir(dcp_dir: str) -> int | None:
    """The step in a torchtitan-style checkpoint directory name (``.../step-1000``), if any."""
    match = _STEP_DIR.match(PurePosixPath(dcp_dir.rstrip("/")).name)
    return int(match.group(1)) if match else None


def _gather_top_level(state: dict[str, Any], key: str, dcp_dir: str) -> tuple[dict[str, Any], str | None]:
    loose = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not loose:
        return state, None
    if key in state:
        raise InteropError(
            f"the checkpoint has {len(loose)} tensors at its top level and also an entry {key!r}: "
            "choose another top_level_key (--top-level-key) for the tensors",
            url=dcp_dir,
            key=key,
        )
    return {key: loose, **{k: v for k, v in state.items() if k not in loose}}, key


def _is_weights(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _as_objects(state: dict[str, Any], module_keys: Sequence[str], explicit: bool, dcp_dir: str) -> dict[str, Any]:
    """The snapshot entries: weights as modules, dicts holding tensors as stateful objects, the rest as values.

    DCP's dicts of tensors come from ``state_dict()`` calls, so they restore into objects with
    ``load_state_dict``; a dict of plain values restores into a dict, as JSON extras do.
    """
    objects: dict[str, Any] = {}
    for key, value in state.items():
        if key in module_keys and _is_weights(value):
            objects[key] = ImportedModule(value)
        elif key in module_keys and explicit:
            raise InteropError(f"entry {key!r} is not a flat state dict of tensors", url=dcp_dir, key=key)
        elif isinstance(value, dict) and _count_tensors(value):
            objects[key] = ImportedState(value)
        else:
            objects[key] = value
    missing = [k for k in module_keys if k not in state]
    if explicit and missing:
        raise InteropError(f"the checkpoint has no entry {missing[0]!r}; it has {sorted(state)}", url=dcp_dir)
    return objects


def _count_tensors(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return 1
    if isinstance(value, Mapping):
        return sum(_count_tensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_count_tensors(v) for v in value)
    return 0


def import_dcp(
    dcp_dir: str,
    url: str,
    *,
    step: int | None = None,
    trust_metadata: bool = False,
    top_level_key: str = "model",
    module_keys: Iterable[str] | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    **storage_options: Any,
) -> DcpImport:
    """Save a DCP checkpoint as a committed snapshot of the run at ``url``.

    Args:
        dcp_dir: the DCP checkpoint directory (a local path or an fsspec URL torch's DCP can read).
        url: the run directory to save into (a local path or any fsspec URL).
        step: the snapshot's step (default: ``N`` of a ``step-N`` directory name, else 0).
        trust_metadata: required: reading DCP unpickles its ``.metadata`` file.
        top_level_key: the entry that gathers tensors saved at the checkpoint's top level.
        module_keys: entries to record as modules (default ``["model"]``, when it is a flat
            state dict of tensors; an entry named here that is not one is an error).
        overwrite: replace a committed snapshot at ``step``.
        progress: called with the byte count of each chunk the snapshot writes.
        **storage_options: passed to the run directory's storage back end.

    Returns:
        What was saved.

    Raises:
        UntrustedDataError: ``trust_metadata`` is off.
        InteropError: not a DCP checkpoint, unreadable, or an entry clash.
        SnapshotExistsError: a snapshot exists at ``step`` and ``overwrite`` is off.
    """
    state, opaque = load_dcp(dcp_dir, trust_metadata=trust_metadata)
    state, gathered = _gather_top_level(state, top_level_key, dcp_dir)
    explicit = module_keys is not None
    chosen = list(module_keys) if module_keys is not None else ["model"]
    objects = _as_objects(state, chosen, explicit, dcp_dir)
    if step is None:
        step = step_from_dir(dcp_dir) or 0
    info = {INFO_KEY: {"top_level_key": gathered, "opaque": opaque}}
    with Checkpointer(url, local=True, capture_rng=False, **storage_options) as ckpt:
        ckpt.save(step, objects, overwrite=overwrite, info=info, progress=progress)
        written = ckpt.url
    return DcpImport(
        url=written,
        step=step,
        entries=list(objects),
        modules=[k for k, v in objects.items() if isinstance(v, ImportedModule)],
        tensors=_count_tensors(state),
        top_level_key=gathered,
        opaque=opaque,
    )


# -- snapshot -> DCP checkpoint ----------------------------------------------------------------


class _VerbatimPlanner(DefaultSavePlanner):
    """DCP's default save planner, except that the payloads an import kept raw go back byte for byte."""

    def __init__(self, verbatim: set[str]) -> None:
        super().__init__()
        self._verbatim = verbatim
        self.raw: set[str] = set()

    def set_up_planner(
        self, state_dict: dict[str, Any], storage_meta: StorageMeta | None = None, is_coordinator: bool = False
    ) -> None:
        super().set_up_planner(state_dict, storage_meta, is_coordinator)
        # the keys whose raw bytes go out as they are (state_dict is now DCP's flattened view)
        self.raw = {fqn for fqn in self._verbatim if isinstance(self.state_dict.get(fqn), bytes)}

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:
        if write_item.type == WriteItemType.BYTE_IO and write_item.index.fqn in self.raw:
            return io.BytesIO(object)
        return super().transform_object(write_item, object)


def _prepare_target(dcp_dir: str, overwrite: bool) -> None:
    """Refuse a directory that already holds a DCP checkpoint (or clear its DCP files with ``overwrite``)."""
    fs, path = _dcp_fs(dcp_dir)
    try:
        existing = (
            [p for p in fs.ls(path, detail=False) if _DCP_FILES.match(PurePosixPath(p).name)] if fs.isdir(path) else []
        )
        if existing and not overwrite:
            raise InteropError(
                "the directory already holds a DCP checkpoint; pass overwrite=True (--overwrite) to replace it",
                url=dcp_dir,
            )
        # the metadata goes first: a half-cleared directory is then no checkpoint at all
        for p in sorted(existing, key=lambda p: not p.endswith(METADATA)):
            fs.rm(p)
    except OSError as exc:
        raise InteropError(f"cannot clear the DCP directory: {exc}", url=dcp_dir) from None


def _hoist(state: dict[str, Any], info: Any, url: str, step: int) -> dict[str, Any]:
    """Put an imported checkpoint's top-level tensors back at the top level."""
    key = info.get("top_level_key") if isinstance(info, dict) else None
    if not isinstance(key, str) or not isinstance(state.get(key), dict):
        return state
    tensors = state[key]
    rest = {k: v for k, v in state.items() if k != key}
    clash = sorted(set(tensors) & set(rest))
    if clash:
        raise InteropError(f"top-level tensor {clash[0]!r} has the name of an entry", url=url, step=step, key=key)
    return {**tensors, **rest}


def export_dcp(
    url: str,
    dcp_dir: str,
    *,
    step: int | None = None,
    keys: Iterable[str] | None = None,
    overwrite: bool = False,
    trust_payloads: bool = False,
    progress: Progress | None = None,
    **storage_options: Any,
) -> DcpExport:
    """Write a snapshot as a DCP checkpoint that `torch.distributed.checkpoint.load` reads.

    Each entry is its state as the snapshot holds it (a module's ``state_dict()``, an
    optimizer's, a stateful object's, a JSON value), under its key. Load it into the same layout,
    e.g. ``dcp.load({"model": model.state_dict()}, checkpoint_id=dcp_dir)``, or into the
    ``Stateful`` objects that produced it. Nothing is unpickled; DCP pickles non-tensor values
    with `torch.save`, as it always does.

    Payloads an import kept raw (``info["dcp"]["opaque"]``) go back byte for byte, and DCP's
    loader unpickles them without restriction: whoever wrote the snapshot chose those bytes, so
    they are written only with ``trust_payloads``.

    Args:
        url: the run directory (a local path or any fsspec URL).
        dcp_dir: the checkpoint directory to write (a local path or an fsspec URL torch's DCP can write).
        step: the snapshot's step (the latest committed one by default).
        keys: the entries to write (default: every entry except moai-ckpt's RNG states).
        overwrite: replace a DCP checkpoint already in ``dcp_dir``.
        trust_payloads: write raw payloads kept by an import (refused otherwise, naming them).
        progress: called with the byte count of each chunk read from the snapshot.
        **storage_options: passed to the run directory's storage back end.

    Returns:
        What was written.

    Raises:
        SnapshotNotFoundError: no committed snapshot (at ``step``).
        CorruptSnapshotError: the snapshot fails a check; nothing is written.
        InteropError: no such entry, raw payloads without ``trust_payloads``, an existing
            checkpoint, or DCP failed to write.
    """
    with open_reader(url, step, **storage_options) as reader:
        chosen = [k for k in reader.manifest.objects if not is_rng_entry(k)] if keys is None else list(keys)
        state = read_entries(reader, chosen, progress)
        info = reader.manifest.info.get(INFO_KEY)
        source, step = reader.storage.url, reader.step
    state = _hoist(state, info, source, step)
    opaque = info.get("opaque") if isinstance(info, dict) else None
    verbatim = {fqn for fqn in opaque or [] if isinstance(fqn, str)}
    probe = _VerbatimPlanner(verbatim)
    probe.set_up_planner(state, is_coordinator=True)
    if probe.raw and not trust_payloads:
        raise InteropError(
            f"the snapshot holds raw torch.save payloads ({', '.join(sorted(probe.raw))}) that DCP's loader "
            "would unpickle as they are: pass trust_payloads=True (--trust-payloads) if you trust whoever "
            "wrote the snapshot, or leave their entries out (keys / --key)",
            url=source,
            step=step,
            key=sorted(probe.raw)[0],
        )
    _prepare_target(dcp_dir, overwrite)
    try:
        with _single_process():
            dcp.save(state, checkpoint_id=dcp_dir, planner=_VerbatimPlanner(verbatim), no_dist=True)
    except _DCP_FAILURES as exc:
        raise InteropError(
            f"DCP could not write {dcp_dir}: {type(exc).__name__}: {exc}", url=source, step=step
        ) from None
    return DcpExport(
        dcp_dir=dcp_dir,
        step=step,
        entries=chosen,
        tensors=_count_tensors(state),
        verbatim=sorted(probe.raw),
    )
