"""Storage: a run directory on any fsspec URL, behind one checked and retried interface.

`open_storage` turns a path or URL into a `Storage`: `LocalStorage` for a plain path,
`FsspecStorage` for everything else. The interface and its declared capabilities are in
`moai_ckpt.storage.base`, retries and error classification in `moai_ckpt.storage.retry`, one back
end per module beside them.
"""

from __future__ import annotations

import fsspec

from moai_ckpt.errors import StorageError
from moai_ckpt.storage.base import Buffer, Storage
from moai_ckpt.storage.fsspec_storage import FsspecStorage
from moai_ckpt.storage.local import LocalStorage
from moai_ckpt.storage.retry import RetryPolicy, is_transient

__all__ = ["Buffer", "FsspecStorage", "LocalStorage", "RetryPolicy", "Storage", "is_transient", "open_storage"]


def open_storage(
    url: str,
    retry: RetryPolicy | None = None,
    **storage_options: object,
) -> Storage:
    """Open a run directory from a path or fsspec URL.

    A bare path (or ``file://``) gives `LocalStorage`; pass ``fsync=False`` to skip fsync on
    scratch disks. Other URLs go to fsspec with ``storage_options`` (for example
    ``endpoint_url`` for ``s3://``); a protocol fsspec does not know is a `StorageError` naming
    it. Protocols come from fsspec's registry: its own, those packages register through the
    ``fsspec.specs`` entry point (``faulty://``, moai-ckpt's test kit), and those registered by
    ``fsspec.register_implementation``.
    """
    # a chained URL (``faulty::/data/run``, ``simplecache::s3://b/run``) is its outermost protocol's
    head = url.split("::", 1)[0]
    protocol = head.split("://", 1)[0] if "://" in head else ("file" if head == url else head)
    if protocol == "file" and set(storage_options) <= {"fsync"}:
        return LocalStorage(url, retry, fsync=bool(storage_options.get("fsync", True)))
    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
    except ImportError as exc:
        raise StorageError(f"no fsspec back end for {protocol}://: {exc}", url=url) from exc
    except ValueError as exc:
        raise StorageError(f"cannot open storage: {exc}", url=url) from exc
    if protocol == "file":
        fs = fsspec.filesystem("file", auto_mkdir=True)
    return FsspecStorage(fs, root, url, retry)
