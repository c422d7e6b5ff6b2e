"""Shared-memory segments for the host pool: named files in ``/dev/shm`` that a writer process maps too.

A segment is a file ``/dev/shm/moai-ckpt-<pid>-<n>`` created exclusively with mode 0600 by the
training process (``pid`` is its process id) and mapped into both processes; host tensors are
views of the mapping. Only names travel between the processes, never pickled objects. The
training process unlinks a segment when its buffer is freed; the writer process removes every
segment of a training process that died without doing so (`remove_all`), so none is left behind.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import re

import torch

ROOT = "/dev/shm"
_NAME = re.compile(r"^moai-ckpt-(\d+)-(\d+)$")
_COUNTER = itertools.count()


def prefix(pid: int) -> str:
    """The name prefix of every segment of the training process ``pid``."""
    return f"moai-ckpt-{pid}-"


def free_bytes() -> int:
    """Bytes free in ``/dev/shm`` (0 where there is none)."""
    try:
        st = os.statvfs(ROOT)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _path(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"not a moai-ckpt shared-memory segment: {name!r}")
    return os.path.join(ROOT, name)


def create(nbytes: int) -> tuple[str, mmap.mmap]:
    """A new segment of ``nbytes`` (at least one byte is mapped) and its mapping."""
    name = f"{prefix(os.getpid())}{next(_COUNTER)}"
    fd = os.open(_path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        # reserve the pages now: a tmpfs that runs out later would kill the process with SIGBUS
        os.posix_fallocate(fd, 0, max(nbytes, 1))
        return name, mmap.mmap(fd, max(nbytes, 1))
    except BaseException:
        os.unlink(_path(name))
        raise
    finally:
        os.close(fd)


def attach(name: str, nbytes: int) -> mmap.mmap:
    """Map the existing segment ``name`` (writer process side)."""
    fd = os.open(_path(name), os.O_RDWR | os.O_NOFOLLOW)
    try:
        if os.fstat(fd).st_size < max(nbytes, 1):
            raise ValueError(f"shared-memory segment {name} is smaller than {nbytes} bytes")
        return mmap.mmap(fd, max(nbytes, 1))
    finally:
        os.close(fd)


def unlink(name: str) -> None:
    """Remove a segment's name (mappings stay valid until unmapped)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_path(name))


def remove_all(pid: int) -> None:
    """Remove every segment the training process ``pid`` left (after it died)."""
    mine = prefix(pid)
    try:
        names = [n for n in os.listdir(ROOT) if n.startswith(mine) and _NAME.match(n)]
    except OSError:
        return
    for name in names:
        unlink(name)


def tensor(mapping: mmap.mmap, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` over the start of ``mapping`` (no copy)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = itemsize
    for d in shape:
        count *= d
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mapping, dtype=torch.uint8, count=count).view(dtype).reshape(shape)


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype ``name`` (``"float32"``), as `str(dtype)` without ``torch.`` spells it."""
    found = getattr(torch, name, None)
    if not isinstance(found, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return found
