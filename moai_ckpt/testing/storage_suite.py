"""The storage conformance suite: what every `moai_ckpt.storage.Storage` back end must do.

Mix `StorageTests` into a test class and supply a ``storage`` fixture that returns an empty run
directory (the way zarr's ``StoreTests`` is subclassed by every store)::

    class TestMyStorage(StorageTests):
        @pytest.fixture
        def storage(self, tmp_path) -> Storage:
            return open_storage(f"myproto://{tmp_path}/run")

The suite pins down the contract the snapshot code relies on: whole-object writes from one or
several buffers, exact-size reads into caller memory, missing objects as `FileNotFoundError`
(never retried), sorted recursive listings of relative keys, directory listings, idempotent
deletes that leave no empty directory behind, and keys checked before any I/O happens. Storage
is untrusted, so it also pins down: exclusive create (one winner among racing threads where the
back end declares it atomic), bounded metadata reads, listings that skip names outside the key
alphabet, and tree deletes that remove such names too, marker first.

Back ends over a local file system also mix in `LocalPathTests`
(`moai_ckpt.testing.local_path_suite`, importable from here too).
"""

from __future__ import annotations

import array
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from moai_ckpt.errors import (
    ObjectTooLargeError,
    StorageError,
    TruncatedDataError,
    UnsafeKeyError,
)
from moai_ckpt.storage import Buffer, FsspecStorage, LocalStorage, Storage
from moai_ckpt.testing.local_path_suite import LocalPathTests

__all__ = ["STRAY_NAMES", "UNSAFE_KEYS", "LocalPathTests", "StorageTests"]

#: keys a storage must refuse: relative steps, absolute paths, empty segments, backslashes,
#: spaces, control, shell and non-ASCII characters, hidden names, over-long keys
UNSAFE_KEYS: tuple[str, ...] = (
    "..",
    ".",
    "../escape",
    "a/../../escape",
    "a/./b",
    "/abs",
    "/etc/passwd",
    "a//b",
    "a/",
    "a\\b",
    "..\\escape",
    "a b",
    " lead",
    "a\tb",
    "a\nb",
    "a\x00b",
    "a;b",
    "a*b",
    "a?b",
    "$HOME",
    "~user",
    "a:b",
    "s3://bucket/key",
    "caf\u00e9",
    ".hidden",
    "-dash",
    "x" * 201,
    "/".join(["abcd"] * 300),
)

#: the hooks a back end does its I/O in; none may run for an unsafe key
_HOOKS = (
    "_write",
    "_create",
    "_read",
    "_read_record",
    "_read_into",
    "_size",
    "_list",
    "_list_dirs",
    "_delete",
    "_delete_tree",
    "_newest_change",
    "_barrier",
)

#: names a key may not have but that turn up in run directories: NFS silly-renames, editor and
#: OS droppings, shell-hostile characters
STRAY_NAMES: tuple[str, ...] = (".nfs0000000012345678", ".DS_Store", "a b", "x~", "-dash", "caf\u00e9")


class StorageTests:
    """Conformance tests for a `Storage` back end; subclasses supply the ``storage`` fixture."""

    @pytest.fixture
    def storage(self) -> Storage:
        """An empty run directory on the back end under test (override in the subclass)."""
        raise NotImplementedError("subclasses of StorageTests supply a 'storage' fixture")

    @pytest.fixture
    def sibling(self, storage: Storage) -> Storage:
        """A second run directory whose URL extends the first one's (``<url>-sibling``).

        Override for back ends other than `LocalStorage` and `FsspecStorage`.
        """
        if isinstance(storage, LocalStorage):
            return LocalStorage(storage.root + "-sibling", storage.retry, fsync=storage.durable)
        if isinstance(storage, FsspecStorage):
            return FsspecStorage(storage.fs, storage.root + "-sibling", storage.url + "-sibling", storage.retry)
        raise NotImplementedError(f"override the 'sibling' fixture for {type(storage).__name__}")

    @pytest.fixture
    def untouchable(self, storage: Storage) -> Iterator[list[str]]:
        """Make every I/O hook of ``storage`` record its call and fail; yields the calls made."""
        calls: list[str] = []

        def forbidden(name: str) -> Callable[..., Any]:
            def hook(*args: Any, **kwargs: Any) -> Any:
                calls.append(name)
                raise AssertionError(f"{name} ran for a key that should have been refused")

            return hook

        for name in _HOOKS:
            setattr(storage, name, forbidden(name))
        yield calls
        for name in _HOOKS:
            delattr(storage, name)

    # -- writing and reading -------------------------------------------------------------------

    def test_bytes_written_are_read_back(self, storage: Storage) -> None:
        storage.write("obj", b"hello world")
        assert storage.read("obj") == b"hello world"

    @pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview"])
    def test_every_buffer_type_is_accepted(self, storage: Storage, kind: str) -> None:
        payload = bytes(range(256)) * 3
        buffers: dict[str, Buffer] = {
            "bytes": payload,
            "bytearray": bytearray(payload),
            "memoryview": memoryview(payload),
        }
        storage.write("obj", buffers[kind])
        assert storage.read("obj") == payload

    def test_several_buffers_are_written_as_one_object_in_order(self, storage: Storage) -> None:
        words = array.array("I", [1, 2, 3])
        parts: list[Buffer] = [b"head-", bytearray(b"middle-"), memoryview(b"xxtail-")[2:], memoryview(words)]
        storage.write("obj", parts)
        assert storage.read("obj") == b"head-middle-tail-" + words.tobytes()

    def test_many_small_buffers_are_written_and_read_in_order(self, storage: Storage) -> None:
        # more parts than one writev/readv call takes (IOV_MAX is 1024 on Linux)
        parts = [bytes([i % 251]) * (1 + i % 3) for i in range(1500)]
        storage.write("obj", parts)
        expected = b"".join(parts)
        assert storage.read("obj") == expected
        outs = [bytearray(len(p)) for p in parts]
        storage.read_into("obj", [memoryview(o) for o in outs])
        assert b"".join(outs) == expected

    def test_a_large_object_round_trips(self, storage: Storage) -> None:
        payload = bytes(range(256)) * 8192  # 2 MiB
        storage.write("big/obj", [memoryview(payload)[: 1 << 20], memoryview(payload)[1 << 20 :]])
        assert storage.size("big/obj") == len(payload)
        assert storage.read("big/obj") == payload

    def test_deep_keys_need_no_directories_made_first(self, storage: Storage) -> None:
        storage.write("a/b/c/d/e/f", b"deep")
        assert storage.read("a/b/c/d/e/f") == b"deep"

    def test_writing_again_replaces_the_whole_object(self, storage: Storage) -> None:
        storage.write("obj", b"a much longer first version")
        storage.write("obj", b"short")
        assert storage.read("obj") == b"short"
        assert storage.size("obj") == 5

    def test_empty_objects_exist_and_read_back_empty(self, storage: Storage) -> None:
        storage.write("empty", b"")
        storage.write("empty-parts", [])
        for key in ("empty", "empty-parts"):
            assert storage.exists(key)
            assert storage.size(key) == 0
            assert storage.read(key) == b""
            storage.read_into(key, [])
        assert storage.list() == ["empty", "empty-parts"]

    def test_concurrent_writes_from_threads_all_land(self, storage: Storage) -> None:
        errors: list[BaseException] = []

        def worker(t: int) -> None:
            try:
                for i in range(8):
                    storage.write(f"t{t}/obj{i}", f"{t}:{i}".encode())
            except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
        assert not errors
        keys = storage.list()
        assert len(keys) == 48
        assert all(storage.read(k) == f"{k[1]}:{k[-1]}".encode() for k in keys)

    # -- read_into -----------------------------------------------------------------------------

    def test_read_into_fills_the_parts_in_order(self, storage: Storage) -> None:
        storage.write("obj", b"abcdefghij")
        first, second = bytearray(3), bytearray(7)
        storage.read_into("obj", [memoryview(first), memoryview(second)])
        assert (bytes(first), bytes(second)) == (b"abc", b"defghij")

    def test_read_into_accepts_typed_memory(self, storage: Storage) -> None:
        values = array.array("d", [1.5, -2.25, 3.0])
        storage.write("obj", memoryview(values))
        out = array.array("d", [0.0, 0.0, 0.0])
        storage.read_into("obj", [memoryview(out)])
        assert out == values

    @pytest.mark.parametrize("expected", [9, 11, 0])
    def test_read_into_refuses_an_object_of_another_size(self, storage: Storage, expected: int) -> None:
        storage.write("obj", b"0123456789")
        out = bytearray(b"\xaa" * expected)
        with pytest.raises(TruncatedDataError) as info:
            storage.read_into("obj", [memoryview(out)])
        assert info.value.key == "obj"
        assert "10 bytes" in str(info.value)

    # -- missing objects -----------------------------------------------------------------------

    def test_a_missing_object_is_file_not_found(self, storage: Storage) -> None:
        with pytest.raises(FileNotFoundError):
            storage.read("missing")
        with pytest.raises(FileNotFoundError):
            storage.read_into("missing", [memoryview(bytearray(1))])
        with pytest.raises(FileNotFoundError):
            storage.size("missing/deeper")
        assert not storage.exists("missing")

    def test_a_missing_object_is_not_retried(self, storage: Storage, caplog: pytest.LogCaptureFixture) -> None:
        with caplog.at_level(logging.WARNING, logger="moai_ckpt.storage"), pytest.raises(FileNotFoundError):
            storage.read("missing")
        assert [r for r in caplog.records if r.name == "moai_ckpt.storage"] == []

    def test_a_prefix_with_objects_below_is_not_an_object(self, storage: Storage) -> None:
        storage.write("dir/obj", b"x")
        assert not storage.exists("dir")
        with pytest.raises(FileNotFoundError):
            storage.size("dir")
        with pytest.raises(FileNotFoundError):
            storage.read("dir")
        with pytest.raises(FileNotFoundError):
            storage.read_into("dir", [memoryview(bytearray(1))])

    def test_exists_and_size_follow_writes_and_deletes(self, storage: Storage) -> None:
        assert not storage.exists("obj")
        storage.write("obj", b"12345")
        assert storage.exists("obj")
        assert storage.size("obj") == 5
        storage.delete(["obj"])
        assert not storage.exists("obj")

    # -- listing -------------------------------------------------------------------------------

    def test_list_is_recursive_sorted_and_relative(self, storage: Storage) -> None:
        keys = ["z", "a/b/c", "a/d", "a/b/e.json", "m/n/o/p", "A"]
        for key in keys:
            storage.write(key, key.encode())
        assert storage.list() == sorted(keys)
        assert storage.list("a") == ["a/b/c", "a/b/e.json", "a/d"]
        assert storage.list("a/b") == ["a/b/c", "a/b/e.json"]
        assert storage.list("m/n") == ["m/n/o/p"]

    def test_list_of_a_prefix_does_not_match_longer_names(self, storage: Storage) -> None:
        for key in ("snap/1", "snap/2", "snapshots/1", "snap-old/1", "snap.json"):
            storage.write(key, b"x")
        assert storage.list("snap") == ["snap/1", "snap/2"]

    def test_list_of_an_empty_or_missing_place_is_empty(self, storage: Storage) -> None:
        assert storage.list() == []
        assert storage.list_dirs() == []
        storage.write("other/x", b"x")
        assert storage.list("missing") == []
        assert storage.list_dirs("missing") == []

    def test_a_sibling_run_directory_is_never_listed(self, storage: Storage, sibling: Storage) -> None:
        sibling.write("snapshots/000000000001/commit.json", b"{}")
        sibling.write("run.json", b"{}")
        storage.write("run.json", b"{}")
        assert storage.list() == ["run.json"]
        assert storage.list_dirs() == []
        assert storage.list_dirs("snapshots") == []

    def test_list_dirs_names_the_immediate_subdirectories(self, storage: Storage) -> None:
        for key in ("snapshots/000000000002/a/b", "snapshots/000000000001/c", "snapshots/file", "log/x", "top"):
            storage.write(key, b"x")
        assert storage.list_dirs("snapshots") == ["000000000001", "000000000002"]
        assert storage.list_dirs() == ["log", "snapshots"]
        assert storage.list_dirs("snapshots/000000000002") == ["a"]

    # -- deleting ------------------------------------------------------------------------------

    def test_delete_removes_the_named_objects_only(self, storage: Storage) -> None:
        for key in ("a", "b", "c/d", "c/e"):
            storage.write(key, b"x")
        storage.delete(["a", "c/d"])
        assert storage.list() == ["b", "c/e"]

    def test_deleting_missing_objects_is_not_an_error(self, storage: Storage) -> None:
        storage.write("kept", b"x")
        storage.delete(["missing", "missing/deeper"])
        storage.delete(["kept", "missing"])
        storage.delete([])
        assert storage.list() == []

    def test_delete_prefix_removes_everything_below_and_nothing_beside(self, storage: Storage) -> None:
        for key in ("p/a", "p/b/c", "p/b/d/e", "pq/f", "p.json", "q"):
            storage.write(key, b"x")
        storage.delete_prefix("p")
        assert storage.list() == ["p.json", "pq/f", "q"]

    def test_delete_prefix_leaves_no_empty_directory_behind(self, storage: Storage) -> None:
        for key in ("snapshots/000000000001/x/y", "snapshots/000000000001/z", "snapshots/000000000002/w"):
            storage.write(key, b"x")
        storage.delete_prefix("snapshots/000000000001")
        assert storage.list_dirs("snapshots") == ["000000000002"]
        storage.delete_prefix("snapshots/000000000002")
        assert storage.list_dirs("snapshots") == []

    def test_delete_prefix_of_a_missing_prefix_is_not_an_error(self, storage: Storage) -> None:
        storage.delete_prefix("missing")
        storage.write("a/b", b"x")
        storage.delete_prefix("a/missing")
        assert storage.list() == ["a/b"]

    def test_an_object_can_be_written_again_after_its_prefix_was_deleted(self, storage: Storage) -> None:
        storage.write("p/q/r", b"first")
        storage.delete_prefix("p")
        storage.write("p/q/r", b"second")
        assert storage.read("p/q/r") == b"second"
        assert storage.list_dirs() == ["p"]

    def test_barrier_accepts_written_keys(self, storage: Storage) -> None:
        storage.write("a/b/c", b"x")
        storage.barrier(["a/b/c"])
        storage.barrier([])
        assert storage.read("a/b/c") == b"x"

    # -- key safety ----------------------------------------------------------------------------

    @pytest.mark.parametrize("key", UNSAFE_KEYS)
    def test_unsafe_keys_are_refused_before_any_io(self, storage: Storage, untouchable: list[str], key: str) -> None:
        attempts: list[Callable[[], object]] = [
            lambda: storage.write(key, b"x"),
            lambda: storage.write(key, [b"x", b"y"]),
            lambda: storage.read(key),
            lambda: storage.read_into(key, [memoryview(bytearray(1))]),
            lambda: storage.size(key),
            lambda: storage.exists(key),
            lambda: storage.list(key),
            lambda: storage.list_dirs(key),
            lambda: storage.delete([key]),
            lambda: storage.delete(["fine", key]),
            lambda: storage.delete_prefix(key),
            lambda: storage.delete_tree(key),
            lambda: storage.delete_tree("fine", first=[key]),
            lambda: storage.delete_tree("fine", keep=[key]),
            lambda: storage.barrier([key]),
            lambda: storage.create(key, b"x"),
            lambda: storage.read_record(key),
            lambda: storage.newest_change(key),
        ]
        for attempt in attempts:
            with pytest.raises(UnsafeKeyError) as info:
                attempt()
            assert info.value.url == storage.url
        assert untouchable == []

    def test_unsafe_key_error_is_a_value_error_not_a_storage_error(self, storage: Storage) -> None:
        with pytest.raises(ValueError) as info:
            storage.write("../escape", b"x")
        assert not isinstance(info.value, StorageError)
        assert "../escape" in str(info.value)
        assert storage.list() == []

    @pytest.mark.parametrize("key", ["a", "A-Z_0.9", "snapshots/000000000001/model.w/c/0/0", "x" * 200, "_x/y._/z-"])
    def test_safe_keys_round_trip(self, storage: Storage, key: str) -> None:
        storage.write(key, key.encode())
        assert storage.read(key) == key.encode()
        assert storage.list() == [key]

    # -- exclusive create ----------------------------------------------------------------------

    def test_create_writes_a_new_object(self, storage: Storage) -> None:
        storage.create("lease/000000000001.json", b'{"epoch": 1}')
        assert storage.read("lease/000000000001.json") == b'{"epoch": 1}'

    def test_create_never_replaces_an_object(self, storage: Storage) -> None:
        storage.write("claim.json", b"first")
        with pytest.raises(FileExistsError):
            storage.create("claim.json", b"second")
        storage.create("other.json", b"mine")
        with pytest.raises(FileExistsError):
            storage.create("other.json", b"theirs")
        assert storage.read("claim.json") == b"first"
        assert storage.read("other.json") == b"mine"

    def test_create_is_not_retried_into_success_when_the_object_is_someone_elses(
        self, storage: Storage, caplog: pytest.LogCaptureFixture
    ) -> None:
        storage.create("k", b"theirs")
        with caplog.at_level(logging.WARNING, logger="moai_ckpt.storage"), pytest.raises(FileExistsError):
            storage.create("k", b"mine")
        assert [r for r in caplog.records if "retrying" in r.getMessage()] == []

    def test_threads_racing_to_create_one_key_have_one_winner(self, storage: Storage) -> None:
        if not storage.supports_exclusive_create:
            pytest.skip(f"{type(storage).__name__} at {storage.url} declares no atomic exclusive create")
        for round_ in range(5):
            key = f"race/{round_}"
            winners = _race_to_create(storage, key, contenders=6)
            assert len(winners) == 1, winners
            assert storage.read(key) == f"contender {winners[0]}".encode()

    # -- bounded reads -------------------------------------------------------------------------

    def test_read_record_reads_an_object_within_the_limit(self, storage: Storage) -> None:
        storage.write("commit.json", b"x" * 100)
        storage.write("empty.json", b"")
        assert storage.read_record("commit.json", limit=100) == b"x" * 100
        assert storage.read_record("commit.json") == b"x" * 100
        assert storage.read_record("empty.json", limit=0) == b""

    def test_read_record_refuses_an_object_over_the_limit_naming_it(self, storage: Storage) -> None:
        storage.write("snapshots/000000000001/commit.json", b"x" * 101)
        with pytest.raises(ObjectTooLargeError) as info:
            storage.read_record("snapshots/000000000001/commit.json", limit=100)
        assert info.value.key == "snapshots/000000000001/commit.json"
        assert info.value.url == storage.url
        assert "100-byte limit" in str(info.value)

    def test_read_record_limit_defaults_to_the_storage_setting(self, storage: Storage) -> None:
        storage.write("manifest.json", b"y" * 64)
        storage.record_limit = 63
        with pytest.raises(ObjectTooLargeError):
            storage.read_record("manifest.json")
        storage.record_limit = 64
        assert storage.read_record("manifest.json") == b"y" * 64

    def test_read_record_of_a_missing_object_or_a_prefix_is_file_not_found(self, storage: Storage) -> None:
        storage.write("dir/obj", b"x")
        for key in ("missing", "dir"):
            with pytest.raises(FileNotFoundError):
                storage.read_record(key)

    # -- stray names ---------------------------------------------------------------------------

    @pytest.fixture
    def plant(self, storage: Storage) -> Callable[[str, bytes], None]:
        """Put an object at a raw name, past the key checks (as another program would)."""

        def plant(name: str, data: bytes = b"stray") -> None:
            storage._write(name, [data])

        return plant

    def test_listings_skip_names_outside_the_key_alphabet(
        self, storage: Storage, plant: Callable[[str, bytes], None], caplog: pytest.LogCaptureFixture
    ) -> None:
        storage.write("snapshots/000000000001/commit.json", b"{}")
        for name in STRAY_NAMES:
            plant(f"snapshots/000000000001/{name}", b"stray")
            plant(f"snapshots/{name}/x", b"stray")
        with caplog.at_level(logging.WARNING):
            assert storage.list("snapshots") == ["snapshots/000000000001/commit.json"]
            assert storage.list_dirs("snapshots") == ["000000000001"]
        assert any(".nfs0000000012345678" in r.getMessage() for r in caplog.records)

    def test_delete_tree_removes_stray_names_too(self, storage: Storage, plant: Callable[[str, bytes], None]) -> None:
        storage.write("snapshots/000000000001/commit.json", b"{}")
        storage.write("snapshots/000000000001/model/c/0", b"data")
        for name in STRAY_NAMES:
            plant(f"snapshots/000000000001/{name}", b"stray")
            plant(f"snapshots/000000000001/model/{name}", b"stray")
        storage.write("snapshots/000000000002/commit.json", b"{}")
        storage.delete_tree("snapshots/000000000001")
        assert storage.list_dirs("snapshots") == ["000000000002"]
        assert storage.list() == ["snapshots/000000000002/commit.json"]

    def test_delete_tree_keeps_what_it_is_told_to_keep(self, storage: Storage) -> None:
        for key in ("s/claim.json", "s/commit.json", "s/a/b", "s/c"):
            storage.write(key, b"x")
        storage.delete_tree("s", keep=["s/claim.json"])
        assert storage.list() == ["s/claim.json"]
        storage.delete_tree("s")
        assert storage.list() == []
        storage.delete_tree("s")  # gone already: not an error

    def test_newest_change_is_recent_or_unknown(self, storage: Storage) -> None:
        before = time.time()
        storage.write("s/a", b"x")
        seen = storage.newest_change("s")
        assert seen is None or seen >= before - 5  # coarse clocks (object stores: whole seconds)
        assert storage.newest_change("missing") is None


def _race_to_create(storage: Storage, key: str, contenders: int) -> list[int]:
    """Threads released at once all `create` ``key``; returns the ones that succeeded."""
    winners: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(contenders)

    def contender(i: int) -> None:
        start.wait(10)
        try:
            storage.create(key, f"contender {i}".encode())
            winners.append(i)
        except FileExistsError:
            pass
        except BaseException as exc:  # noqa: BLE001  (reported by the caller)
            errors.append(exc)

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(contenders)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors
    return winners
