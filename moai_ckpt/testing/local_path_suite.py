"""The conformance suite of back ends over a local file system: nothing below the run is followed.

Mix `LocalPathTests` into a test class beside `moai_ckpt.testing.storage_suite.StorageTests` and
supply a ``local_root`` fixture (the run directory's path on disk): links and special files
planted below the run directory are refused, never followed, a FIFO never blocks a read or a
listing, a link to a device is refused unread, and a hard-linked object is replaced rather
than written through.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from moai_ckpt.errors import UnsafeEntryError
from moai_ckpt.storage import Storage


class LocalPathTests:
    """For back ends over a local file system: nothing below the run directory is followed.

    Subclasses supply ``storage`` and ``local_root`` (the run directory's path on disk).
    """

    @pytest.fixture
    def local_root(self) -> Path:
        raise NotImplementedError("subclasses of LocalPathTests supply a 'local_root' fixture")

    @pytest.fixture
    def victim(self, tmp_path: Path) -> Path:
        """A directory outside the run with a file in it: no storage call may touch it."""
        outside = tmp_path / "victim"
        outside.mkdir(exist_ok=True)
        (outside / "secret").write_bytes(b"do not touch")
        (outside / "snapshot-like").mkdir(exist_ok=True)
        (outside / "snapshot-like" / "commit.json").write_bytes(b"{}")
        return outside

    @staticmethod
    def assert_untouched(victim: Path) -> None:
        assert (victim / "secret").read_bytes() == b"do not touch"
        assert (victim / "snapshot-like" / "commit.json").read_bytes() == b"{}"
        assert sorted(p.name for p in victim.iterdir()) == ["secret", "snapshot-like"]

    def test_a_linked_directory_is_never_followed(self, storage: Storage, local_root: Path, victim: Path) -> None:
        storage.write("snapshots/000000000010/commit.json", b"{}")
        os.symlink(victim, local_root / "snapshots" / "000000000020")
        assert storage.list_dirs("snapshots") == ["000000000010"]
        for attempt in (
            lambda: storage.write("snapshots/000000000020/commit.json", b"x"),
            lambda: storage.create("snapshots/000000000020/claim.json", b"x"),
            lambda: storage.read("snapshots/000000000020/secret"),
            lambda: storage.read_record("snapshots/000000000020/secret"),
            lambda: storage.size("snapshots/000000000020/secret"),
            lambda: storage.list("snapshots/000000000020"),
            lambda: storage.delete(["snapshots/000000000020/secret"]),
        ):
            with pytest.raises(UnsafeEntryError) as info:
                attempt()
            assert info.value.key == "snapshots/000000000020"
            self.assert_untouched(victim)
        storage.delete_tree("snapshots/000000000020")  # the link itself goes, never what it points to
        assert not os.path.lexists(local_root / "snapshots" / "000000000020")
        self.assert_untouched(victim)
        storage.write("snapshots/000000000020/commit.json", b"mine")
        assert (local_root / "snapshots" / "000000000020").is_dir()
        self.assert_untouched(victim)

    def test_a_linked_file_is_refused_and_its_target_never_read_or_written(
        self, storage: Storage, local_root: Path, victim: Path
    ) -> None:
        storage.write("s/real", b"x")
        os.symlink(victim / "secret", local_root / "s" / "chunk")
        os.symlink(local_root / "nowhere", local_root / "s" / "dangling")
        for key in ("s/chunk", "s/dangling"):
            for attempt in (
                lambda key=key: storage.read(key),
                lambda key=key: storage.read_record(key),
                lambda key=key: storage.read_into(key, [memoryview(bytearray(12))]),
                lambda key=key: storage.size(key),
                lambda key=key: storage.write(key, b"overwritten"),
            ):
                with pytest.raises(UnsafeEntryError) as info:
                    attempt()
                assert info.value.key == key
                assert "12" not in str(info.value)  # the target's size is not disclosed
        with pytest.raises((FileExistsError, UnsafeEntryError)):  # an entry is there, whatever it is
            storage.create("s/chunk", b"x")
        assert storage.list("s") == ["s/real"]
        storage.delete(["s/chunk"])
        assert not os.path.lexists(local_root / "s" / "chunk")
        self.assert_untouched(victim)

    def test_a_fifo_never_blocks_a_read_or_a_listing(self, storage: Storage, local_root: Path) -> None:
        storage.write("snapshots/000000000001/manifest.json", b"{}")
        os.mkfifo(local_root / "snapshots" / "000000000001" / "commit.json")
        done = threading.Event()
        outcome: list[BaseException | list[str]] = []

        def reader() -> None:
            try:
                outcome.append(storage.list("snapshots"))
                storage.read_record("snapshots/000000000001/commit.json")
            except BaseException as exc:  # noqa: BLE001  (checked below)
                outcome.append(exc)
            done.set()

        threading.Thread(target=reader, daemon=True).start()
        assert done.wait(20), "reading a FIFO blocked"
        assert outcome[0] == ["snapshots/000000000001/manifest.json"]
        assert isinstance(outcome[1], UnsafeEntryError)
        assert outcome[1].key == "snapshots/000000000001/commit.json"
        for attempt in (
            lambda: storage.read("snapshots/000000000001/commit.json"),
            lambda: storage.write("snapshots/000000000001/commit.json", b"x"),
            lambda: storage.size("snapshots/000000000001/commit.json"),
        ):
            with pytest.raises(UnsafeEntryError):
                attempt()
        storage.delete_tree("snapshots/000000000001")
        assert storage.list_dirs("snapshots") == []

    def test_a_link_to_a_device_is_refused_without_a_read(self, storage: Storage, local_root: Path) -> None:
        storage.write("snapshots/000000000001/manifest.json", b"{}")
        os.symlink("/dev/zero", local_root / "snapshots" / "000000000001" / "commit.json")
        started = time.monotonic()
        with pytest.raises(UnsafeEntryError):
            storage.read_record("snapshots/000000000001/commit.json")
        with pytest.raises(UnsafeEntryError):
            storage.read("snapshots/000000000001/commit.json")
        assert time.monotonic() - started < 5

    def test_a_non_utf8_name_is_listed_never_and_deleted_with_its_tree(
        self, storage: Storage, local_root: Path
    ) -> None:
        storage.write("snapshots/000000000001/commit.json", b"{}")
        weird = os.fsencode(local_root / "snapshots" / "000000000001") + b"/caf\xe9-\xff"
        with open(weird, "wb") as f:
            f.write(b"stray")
        assert storage.list("snapshots") == ["snapshots/000000000001/commit.json"]
        storage.delete_tree("snapshots/000000000001")
        assert not (local_root / "snapshots" / "000000000001").exists()

    def test_a_write_through_a_hard_link_leaves_the_other_name_alone(
        self, storage: Storage, local_root: Path, victim: Path
    ) -> None:
        (local_root / "s").mkdir(parents=True)
        os.link(victim / "secret", local_root / "s" / "obj")
        storage.write("s/obj", b"new content")
        assert storage.read("s/obj") == b"new content"
        self.assert_untouched(victim)
