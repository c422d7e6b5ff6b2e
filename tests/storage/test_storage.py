"""The storage layer: the conformance suite on every local back end, URL dispatch, classification."""

from __future__ import annotations

import errno
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
from pydantic import ValidationError

from moai_ckpt.errors import (
    ChecksumError,
    StorageError,
    TransientStorageError,
    UnsafeKeyError,
)
from moai_ckpt.storage import FsspecStorage, LocalStorage, RetryPolicy, Storage, is_transient, open_storage
from moai_ckpt.testing import FaultPlan, FaultyFileSystem, protocols
from moai_ckpt.testing.storage_suite import LocalPathTests, StorageTests

ROOT = Path(__file__).resolve().parents[2]
FAST = RetryPolicy(attempts=3, initial_backoff_s=0.001, max_backoff_s=0.002, jitter_s=0.0, deadline_s=5)


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A unique top-level directory of the process-wide memory file system, removed afterwards."""
    root = f"/moai-test-{uuid.uuid4().hex[:12]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


class TestLocalStorage(StorageTests, LocalPathTests):
    @pytest.fixture
    def local_root(self, tmp_path: Path) -> Path:
        return tmp_path / "run"

    @pytest.fixture
    def storage(self, tmp_path: Path) -> Storage:
        storage = open_storage(str(tmp_path / "run"), FAST)
        assert isinstance(storage, LocalStorage)
        return storage

    def test_a_directory_removed_behind_its_back_is_made_again(self, storage: Storage, tmp_path: Path) -> None:
        storage.write("snapshots/000000000001/a", b"first")
        shutil.rmtree(tmp_path / "run" / "snapshots")  # another process pruned it
        storage.write("snapshots/000000000001/a", b"second")
        assert storage.read("snapshots/000000000001/a") == b"second"

    def test_nothing_is_written_outside_the_run_directory(self, storage: Storage, tmp_path: Path) -> None:
        storage.write("a/b", b"x")
        with pytest.raises(UnsafeKeyError):
            storage.write("../outside", b"x")
        assert sorted(os.listdir(tmp_path)) == ["run"]


class TestUnsyncedLocalStorage(StorageTests, LocalPathTests):
    @pytest.fixture
    def local_root(self, tmp_path: Path) -> Path:
        return tmp_path / "run"

    @pytest.fixture
    def storage(self, tmp_path: Path) -> Storage:
        storage = open_storage(str(tmp_path / "run"), FAST, fsync=False)
        assert isinstance(storage, LocalStorage) and not storage.durable
        return storage


class TestMemoryStorage(StorageTests):
    @pytest.fixture
    def storage(self, memory_root: str) -> Storage:
        storage = open_storage(f"memory://{memory_root}/run", FAST)
        assert isinstance(storage, FsspecStorage)
        return storage


class TestFsspecLocalStorage(StorageTests, LocalPathTests):
    """A local path through fsspec's own local file system (as ``file://`` with options gets)."""

    @pytest.fixture
    def local_root(self, tmp_path: Path) -> Path:
        return tmp_path / "run"

    @pytest.fixture
    def storage(self, tmp_path: Path) -> Storage:
        fs = fsspec.filesystem("file", auto_mkdir=True)
        return FsspecStorage(fs, str(tmp_path / "run"), f"file://{tmp_path}/run", FAST)


class TestFaultyLocalStorage(StorageTests, LocalPathTests):
    """``faulty://`` over real files with an empty plan: a pure pass-through."""

    @pytest.fixture
    def local_root(self, tmp_path: Path) -> Path:
        return tmp_path / "run"

    @pytest.fixture
    def storage(self, tmp_path: Path) -> Iterator[Storage]:
        storage = open_storage(f"faulty://{tmp_path}/run", FAST, target_protocol="file", plan=FaultPlan())
        assert isinstance(storage, FsspecStorage) and isinstance(storage.fs, FaultyFileSystem)
        yield storage
        assert storage.fs.stats.total_faults == 0

    def test_every_call_goes_through_the_wrapper(self, storage: Storage, tmp_path: Path) -> None:
        assert isinstance(storage, FsspecStorage) and isinstance(storage.fs, FaultyFileSystem)
        storage.write("a/b", b"xyz")
        assert (tmp_path / "run" / "a" / "b").read_bytes() == b"xyz"
        assert storage.read("a/b") == b"xyz"
        assert storage.list() == ["a/b"]
        assert storage.fs.stats.calls == {"write": 1, "info": 1, "read": 1, "list": 1}  # info: the size read-back


class TestFaultyMemoryStorage(StorageTests):
    """``faulty::memory://`` as a chained URL, with an empty plan."""

    @pytest.fixture
    def storage(self, memory_root: str) -> Storage:
        storage = open_storage(f"faulty::memory://{memory_root}/run", FAST, plan=FaultPlan())
        assert isinstance(storage, FsspecStorage) and isinstance(storage.fs, FaultyFileSystem)
        return storage


# -- opening storage -----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "file://"])
def test_a_bare_path_or_file_url_opens_local_storage(tmp_path: Path, prefix: str) -> None:
    storage = open_storage(f"{prefix}{tmp_path}/run/")
    assert isinstance(storage, LocalStorage)
    assert storage.url == f"{tmp_path}/run"
    assert storage.durable


def test_a_relative_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    storage = open_storage("relative/run")
    storage.write("k", b"x")
    assert (tmp_path / "relative" / "run" / "k").read_bytes() == b"x"


def test_an_fsspec_url_opens_fsspec_storage_with_its_options(memory_root: str) -> None:
    storage = open_storage(f"memory://{memory_root}/run", FAST)
    assert isinstance(storage, FsspecStorage)
    assert storage.url == f"memory://{memory_root}/run"
    assert storage.retry == FAST


def test_a_faulty_url_wraps_the_target_with_the_plan(tmp_path: Path) -> None:
    plan = FaultPlan(fail_nth=[3], seed=5)
    storage = open_storage(f"faulty://{tmp_path}/run", target_protocol="file", plan=plan)
    assert isinstance(storage, FsspecStorage) and isinstance(storage.fs, FaultyFileSystem)
    assert storage.fs.plan is plan
    assert storage.fs.fs.auto_mkdir


def test_a_faulty_url_wraps_memory_too(memory_root: str) -> None:
    storage = open_storage(f"faulty://{memory_root}/run", FAST, target_protocol="memory", plan=FaultPlan(fail_nth=[1]))
    storage.write("a/b", b"x")
    assert fsspec.filesystem("memory").cat_file(f"{memory_root}/run/a/b") == b"x"
    assert (storage.list(), storage.list_dirs()) == (["a/b"], ["a"])
    assert isinstance(storage, FsspecStorage) and isinstance(storage.fs, FaultyFileSystem)
    assert storage.fs.stats.faults == {"fail_nth": 1}


def test_two_faulty_storages_never_share_counters(tmp_path: Path) -> None:
    first = open_storage(f"faulty://{tmp_path}/run", target_protocol="file", plan=FaultPlan())
    second = open_storage(f"faulty://{tmp_path}/run", target_protocol="file", plan=FaultPlan())
    assert isinstance(first, FsspecStorage) and isinstance(second, FsspecStorage)
    assert first.fs is not second.fs
    first.write("k", b"x")
    assert second.read("k") == b"x"
    assert isinstance(first.fs, FaultyFileSystem) and isinstance(second.fs, FaultyFileSystem)
    assert (first.fs.stats.calls, second.fs.stats.calls) == ({"write": 1, "info": 1}, {"read": 1})


def test_a_chained_url_over_a_bare_local_path_keeps_its_wrapper(tmp_path: Path) -> None:
    storage = open_storage(f"faulty::{tmp_path}/run", FAST, plan=FaultPlan(fail_nth=[1]))
    assert isinstance(storage, FsspecStorage) and isinstance(storage.fs, FaultyFileSystem)
    storage.write("k", b"x")
    assert (tmp_path / "run" / "k").read_bytes() == b"x"
    assert storage.fs.stats.faults == {"fail_nth": 1}


def test_a_relative_path_behind_a_wrapper_lists_keys_relative_to_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    storage = open_storage("faulty://relative/run", FAST, target_protocol="file")
    storage.write("a/b", b"x")
    assert (tmp_path / "relative" / "run" / "a" / "b").read_bytes() == b"x"
    assert storage.list() == ["a/b"]
    assert storage.list_dirs() == ["a"]


def test_a_faulty_url_without_a_target_is_refused_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="target_protocol"):
        open_storage(f"faulty://{tmp_path}/run")


# -- how faulty:// resolves: the test kit's entry point, never an import in the core -------------------

_HIDE_THE_INSTALLED_PACKAGE = """
import importlib.metadata as metadata
import json
import sys

every = metadata.distributions
# as if moai-ckpt were not installed: no distribution of its own declares an entry point
metadata.distributions = lambda **kw: (d for d in every(**kw) if d.metadata["Name"] != "moai-ckpt")
from moai_ckpt.storage import open_storage

storage = open_storage("faulty://" + sys.argv[1], target_protocol="file")
storage.write("k", b"x")
print(json.dumps([type(storage.fs).__name__, sorted(sys.modules.keys() & {"moai_ckpt.testing.faulty"})]))
"""


def test_the_kits_entry_point_for_a_checkout_is_the_one_the_package_declares() -> None:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["fsspec.specs"]
    found = {
        e.name: e.value
        for d in importlib.metadata.distributions(path=[protocols.ENTRY_POINTS])
        for e in d.entry_points
        if e.group == "fsspec.specs"
    }
    assert found == declared == protocols.PROTOCOLS


def test_a_child_process_resolves_faulty_urls_without_the_installed_entry_point(tmp_path: Path) -> None:
    env = protocols.child_environment({**os.environ, "PYTHONPATH": str(ROOT)})
    done = subprocess.run(
        [sys.executable, "-c", _HIDE_THE_INSTALLED_PACKAGE, str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == ["FaultyFileSystem", ["moai_ckpt.testing.faulty"]]
    assert (tmp_path / "run" / "k").read_bytes() == b"x"
    without = {**os.environ, "PYTHONPATH": str(ROOT)}  # and without the kit's folder, nothing resolves it
    failed = subprocess.run(
        [sys.executable, "-c", _HIDE_THE_INSTALLED_PACKAGE, str(tmp_path / "other")],
        env=without,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode != 0 and "faulty" in failed.stderr


def test_an_unknown_protocol_is_a_storage_error_naming_the_url() -> None:
    with pytest.raises(StorageError) as info:
        open_storage("nosuchproto://bucket/run")
    assert info.value.url == "nosuchproto://bucket/run"
    assert "nosuchproto" in str(info.value)


# -- classification and policy -------------------------------------------------------------------


class EndpointConnectionError(Exception):
    """Named like botocore's, which is matched by name (botocore is optional)."""


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (TimeoutError("read timed out"), True),
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (ConnectionError("dropped"), True),
        (EndpointConnectionError("could not connect"), True),
        (OSError("SlowDown: please reduce your request rate"), True),
        (OSError(errno.EIO, "I/O error"), True),
        (TransientStorageError("throttled"), True),
        (FileNotFoundError(errno.ENOENT, "missing"), False),
        (PermissionError(errno.EACCES, "denied"), False),
        (IsADirectoryError(errno.EISDIR, "a directory"), False),
        (OSError(errno.ENOSPC, "disk full"), False),
        (OSError(errno.EROFS, "read-only"), False),
        (StorageError("gave up"), False),
        (ChecksumError("bad crc"), False),
        (ValueError("bad"), False),
        (KeyError("k"), False),
        (RuntimeError("bug"), False),
    ],
)
def test_errors_are_classified_transient_or_permanent(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


@pytest.mark.parametrize(
    "options",
    [{"attempts": 0}, {"initial_backoff_s": 0}, {"deadline_s": -1}, {"jitter_s": -0.1}, {"retries": 3}],
)
def test_a_bad_retry_policy_is_refused_naming_the_option(options: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match=next(iter(options))):
        RetryPolicy(**options)


def test_a_retry_policy_is_frozen() -> None:
    with pytest.raises(ValidationError):
        FAST.attempts = 10
