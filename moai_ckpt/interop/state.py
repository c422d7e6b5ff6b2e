"""A committed snapshot's entries as plain Python values, for conversions to other formats.

Every read goes through the library's checked reader (`moai_ckpt.snapshot.SnapshotReader`):
the commit marker, manifest and rank indexes are validated and every chunk's crc32c is checked
before a tensor is handed out.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from moai_ckpt.capture import RNG_KEY
from moai_ckpt.checkpointer import Checkpointer
from moai_ckpt.errors import InteropError
from moai_ckpt.snapshot import Progress, SnapshotReader
from moai_ckpt.tree import decode, tensor_refs


def is_rng_entry(key: str) -> bool:
    """Whether ``key`` is one of the global RNG entries moai-ckpt adds to each snapshot."""
    return key == RNG_KEY or key.startswith(RNG_KEY + ".")


@contextmanager
def open_reader(url: str, step: int | None = None, **storage_options: Any) -> Iterator[SnapshotReader]:
    """A checked reader of the committed snapshot at ``step`` (the latest by default), in this process only."""
    with Checkpointer(url, local=True, capture_rng=False, **storage_options) as ckpt:
        yield ckpt.open_snapshot(step)


def check_entries(reader: SnapshotReader, keys: Iterable[str]) -> list[str]:
    """``keys`` as a list, or an `InteropError` naming the first one the snapshot lacks."""
    keys = list(keys)
    objects = reader.manifest.objects
    for key in keys:
        if key not in objects:
            held = sorted(k for k in objects if not is_rng_entry(k))
            raise InteropError(
                f"the snapshot has no entry {key!r}; it holds {held}",
                url=reader.storage.url,
                step=reader.step,
                key=key,
            )
    return keys


def read_entries(reader: SnapshotReader, keys: Iterable[str], progress: Progress | None = None) -> dict[str, Any]:
    """Decode the entries ``keys`` of an open snapshot; their tensors are read (and checked) at once
    (``progress`` is called with the byte count of each chunk read)."""
    keys = check_entries(reader, keys)
    objects = reader.manifest.objects
    names = sorted({ref for key in keys for ref in tensor_refs(objects[key].tree)})
    tensors = reader.read_arrays(names, progress)
    return {key: decode(objects[key].tree, tensors) for key in keys}


def read_state(
    url: str, step: int | None = None, keys: Iterable[str] | None = None, **storage_options: Any
) -> dict[str, Any]:
    """A snapshot's entries as plain values: state dicts, lists, numbers, CPU tensors.

    This is the snapshot as data, without objects to restore into: a module entry comes back as
    its ``state_dict()``, an optimizer as its ``state_dict()`` (integer parameter ids), JSON
    extras as themselves. Tied weights come back as one tensor under each name.

    Args:
        url: the run directory (a local path or any fsspec URL).
        step: the snapshot's step (the latest committed one by default).
        keys: the entries to read (default: every entry except moai-ckpt's RNG states).
        **storage_options: passed to the storage back end (e.g. ``endpoint_url``).

    Raises:
        SnapshotNotFoundError: no committed snapshot (at ``step``).
        CorruptSnapshotError: the snapshot fails a check.
        InteropError: the snapshot has no entry of that name.
    """
    with open_reader(url, step, **storage_options) as reader:
        chosen = [k for k in reader.manifest.objects if not is_rng_entry(k)] if keys is None else list(keys)
        return read_entries(reader, chosen)
