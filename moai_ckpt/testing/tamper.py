"""Tampering with a run directory on local disk, as a careless user or an attacker with write access would.

Plain edits (`flip_bit`, `truncate`, `edit_json`, `write_raw_json`) change one file and leave every
checksum as it was, the way bit rot, a torn copy or a careless hand do: a reader must notice them.
The ``reseal`` functions then recompute every checksum an attacker can recompute, because none of
them is keyed: each chunk's appended crc32c and its rank-index entry, the sha256s in
``commit.json`` and the marker's own checksum (`reseal_snapshot`), each log frame's crc32c
(`reseal_segment`) and a log blob's content address (`replace_blob`). After a resealed edit no
checksum can tell the data is not what was written; what a reader still owes is to fail cleanly,
never half-way, and within bounded memory.

`CONFUSIONS` are JSON values of the wrong type and out-of-range numbers to put where a reader
expects something else; `deep_json` is a document nested deeper than any parser's recursion limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import crc32c as _crc32c

from moai_ckpt.format import canonical_json, sha256
from moai_ckpt.layout import COMMIT, MANIFEST, chunk_name, snapshot_dir

JsonPath = tuple[str | int, ...]

#: values of the wrong type, or out of range, to put where a reader expects something else
CONFUSIONS: list[tuple[str, Any]] = [
    ("null", None),
    ("true", True),
    ("negative", -1),
    ("zero", 0),
    ("huge_int", 10**30),
    ("int64_overflow", 2**64),
    ("huge_float", 1e308),
    ("fraction", 0.5),
    ("string", "x"),
    ("empty_list", []),
    ("list", [1, "a", None]),
    ("empty_object", {}),
    ("object", {"$tensor": 1}),
]

_DEEP = "__moai_ckpt_deep__"
_FRAME = struct.Struct("<4sII")  # kind, payload length, crc32c of the payload (replay.log's frames)
_CRC = struct.Struct("<I")


def flip_bit(path: str | Path, bit: int) -> None:
    """Flip one bit of a file (``bit`` counts from the first byte's lowest bit)."""
    data = bytearray(Path(path).read_bytes())
    data[bit // 8] ^= 1 << (bit % 8)
    Path(path).write_bytes(bytes(data))


def truncate(path: str | Path, size: int) -> None:
    """Cut a file to its first ``size`` bytes."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:size])


def json_paths(document: Any) -> list[JsonPath]:
    """The path of every node of a JSON document (the root is ``()``), in document order."""
    out: list[JsonPath] = []
    stack: list[tuple[JsonPath, Any]] = [((), document)]
    while stack:
        path, node = stack.pop()
        out.append(path)
        children: list[tuple[str | int, Any]] = []
        if isinstance(node, dict):
            children = list(node.items())
        elif isinstance(node, list):
            children = list(enumerate(node))
        stack.extend(((*path, k), v) for k, v in reversed(children))
    return out


def replace_at(document: Any, path: JsonPath, value: Any) -> Any:
    """``document`` with the node at ``path`` replaced by ``value`` (the root itself for ``()``)."""
    if not path:
        return value
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return document


def edit_json(path: str | Path, edit: Callable[[Any], Any]) -> None:
    """Rewrite a JSON file with ``edit(document)``'s result (compact; checksums left as they were)."""
    document = json.loads(Path(path).read_bytes())
    write_raw_json(path, edit(document))


def write_raw_json(path: str | Path, document: Any) -> None:
    """Write ``document``; a string value equal to `deep_json`'s marker becomes a deeply nested list."""
    text = json.dumps(document, separators=(",", ":"))
    Path(path).write_text(text.replace(json.dumps(_DEEP), _deep_text(100_000)))


def deep_json() -> str:
    """A placeholder that `write_raw_json` writes as a list nested 100,000 levels deep."""
    return _DEEP


def _deep_text(depth: int) -> str:
    return "[" * depth + "]" * depth


# -- resealing a snapshot --------------------------------------------------------------------------


def reseal_snapshot(root: str | Path, step: int, *, chunks: bool = True) -> None:
    """Recompute every checksum of the snapshot at ``step`` so that it vouches for what is there now.

    Each chunk's appended crc32c and each rank index's chunk entries (size and crc32c) unless
    ``chunks`` is False (forged entries stay as they are), then the sha256s of the manifest and of
    every rank index in ``commit.json``, and the marker's own checksum. Files that no longer
    parse are left as they are (their checksums cannot be fixed up).
    """
    base = Path(root) / snapshot_dir(step)
    for chunk in _chunk_files(base) if chunks else ():
        _reseal_chunk(chunk)
    commit = _load(base / COMMIT)
    body = commit.get("body") if isinstance(commit, dict) else None
    ranks = body.get("ranks") if isinstance(body, dict) else None
    for ref in ranks if isinstance(ranks, list) else []:
        if isinstance(ref, dict) and isinstance(ref.get("key"), str):
            if chunks:
                _reseal_rank_index(base, Path(root) / ref["key"])
            with _ignored():
                ref["sha256"] = sha256((Path(root) / ref["key"]).read_bytes())
    if isinstance(body, dict):
        with _ignored():
            body["manifest_sha256"] = sha256((base / MANIFEST).read_bytes())
        with _ignored():
            commit["checksum"] = sha256(canonical_json(body))
        (base / COMMIT).write_text(json.dumps(commit, indent=1, sort_keys=True))


def reseal_marker(root: str | Path, step: int) -> None:
    """Recompute only the commit marker's own checksum (after an edit of ``commit.json``)."""
    path = Path(root) / snapshot_dir(step) / COMMIT
    commit = _load(path)
    if isinstance(commit, dict) and "body" in commit:
        with _ignored():
            commit["checksum"] = sha256(canonical_json(commit["body"]))
            path.write_text(json.dumps(commit))


def _chunk_files(base: Path) -> Iterator[Path]:
    """Every chunk object below a snapshot (keys ``c`` or ``c/<i>/...``: names without ``.json``)."""
    for directory, _, files in os.walk(base):
        for name in files:
            if name == "c" or name.isdigit():
                yield Path(directory, name)


def _reseal_chunk(path: Path) -> None:
    data = path.read_bytes()
    if len(data) >= _CRC.size:
        body = data[: -_CRC.size]
        path.write_bytes(body + _CRC.pack(_crc32c.crc32c(body)))


def _reseal_rank_index(base: Path, path: Path) -> None:
    index = _load(path)
    chunks = index.get("chunks") if isinstance(index, dict) else None
    if not isinstance(chunks, dict):
        return
    for array, entries in chunks.items():
        for entry in entries if isinstance(entries, list) else []:
            if not (isinstance(entry, dict) and isinstance(entry.get("index"), list)):
                continue
            grid = tuple(entry["index"])
            # the key as the array's zarr.json has it: "." separator since it sits beside it, "/" before
            chunk = base / array / chunk_name(grid, ".")
            if not chunk.exists():
                chunk = base / array / chunk_name(grid, "/")
            with _ignored():
                data = chunk.read_bytes()
                entry["nbytes"] = len(data)
                (entry["crc32c"],) = _CRC.unpack(data[-_CRC.size :])
    path.write_text(json.dumps(index))


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


def _ignored() -> contextlib.AbstractContextManager[None]:
    """Skip a fix-up that does not apply to a document an edit has mangled."""
    return contextlib.suppress(OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error)


# -- resealing the op-stream log -------------------------------------------------------------------


def frames(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """(offset, kind, payload) of every whole frame of a log segment, trusting the length fields."""
    out = []
    offset = 0
    while offset + _FRAME.size <= len(data):
        kind, length, _ = _FRAME.unpack_from(data, offset)
        end = offset + _FRAME.size + length
        if end > len(data):
            break
        out.append((offset, kind, data[offset + _FRAME.size : end]))
        offset = end
    return out


def reseal_segment(path: str | Path) -> None:
    """Recompute the crc32c of every whole frame of a log segment (an edited payload passes again)."""
    data = bytearray(Path(path).read_bytes())
    for offset, _, payload in frames(bytes(data)):
        struct.pack_into("<I", data, offset + 8, _crc32c.crc32c(payload))
    Path(path).write_bytes(bytes(data))


def replace_frame(path: str | Path, index: int, payload: bytes) -> None:
    """Replace the payload of the ``index``-th frame, with a length and crc32c that match it."""
    data = Path(path).read_bytes()
    found = frames(data)
    offset, kind, old = found[index]
    frame = _FRAME.pack(kind, len(payload), _crc32c.crc32c(payload)) + payload
    Path(path).write_bytes(data[:offset] + frame + data[offset + _FRAME.size + len(old) :])


def replace_blob(log_dir: str | Path, segment: str | Path, index: int, data: bytes) -> None:
    """Give the ``index``-th frame of ``segment`` (a blob) new contents under their own sha256,
    and point every record of the log at the new address: a fully consistent forgery."""
    old_payload = frames(Path(segment).read_bytes())[index][2]
    old, new = old_payload[:32].hex(), hashlib.sha256(data).hexdigest()
    replace_frame(segment, index, bytes.fromhex(new) + data)
    for other in sorted(Path(log_dir).iterdir()):
        raw = other.read_bytes()
        if old.encode() in raw:
            other.write_bytes(raw.replace(old.encode(), new.encode()))
            reseal_segment(other)
