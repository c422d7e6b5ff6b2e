"""The test kit's fsspec protocol, ``faulty://``: registered here, and in the processes started from here.

The core never imports the test kit: `moai_ckpt.storage.open_storage` resolves ``faulty://``
through fsspec's registry like any other protocol. An installed moai-ckpt declares it under
fsspec's ``fsspec.specs`` entry point (``pyproject.toml``), so every process finds it. A checkout
that is not installed has no entry point, so the kit registers the protocol itself:

- `register` puts it in this process's fsspec registry (``tests/conftest.py`` calls it).
- `child_environment` gives a process started from here the same entry point: it puts
  `ENTRY_POINTS` on the child's ``PYTHONPATH``, a folder holding only a distribution record
  with the kit's entry point, where ``importlib.metadata``, and so fsspec, finds it at import.
  Subprocesses and torchrun workers of the test suite (``tests/conftest.py`` sets it for the
  whole session) and the jobs the chaos harness starts (`moai_ckpt.tools.chaos.runner`) get it.

Both name the same class as the installed entry point, so where both are present nothing
changes. ``tests/storage/test_storage.py`` checks that the folder's entry point and ``pyproject.toml``'s
agree, and that a child process resolves ``faulty://`` through it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import fsspec

#: protocol -> the class that implements it, as the ``fsspec.specs`` entry point names it
PROTOCOLS = {"faulty": "moai_ckpt.testing.faulty:FaultyFileSystem"}
#: the folder that makes the kit's entry point visible to a child process (on its ``PYTHONPATH``)
ENTRY_POINTS = str(Path(__file__).resolve().parent / "entry_points")

__all__ = ["ENTRY_POINTS", "PROTOCOLS", "child_environment", "register"]


def register() -> None:
    """Register the kit's protocols in this process (lazily: the class is imported when first used)."""
    for name, target in PROTOCOLS.items():
        fsspec.register_implementation(name, target.replace(":", "."), clobber=True)


def child_environment(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a child process that must resolve the kit's protocols: `ENTRY_POINTS` first on
    its ``PYTHONPATH`` (once), everything else as it is."""
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if ENTRY_POINTS not in paths:
        paths.insert(0, ENTRY_POINTS)
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}
