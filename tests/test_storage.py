"""The Storage interface, held to one contract on every backend: local folders, the in-memory fake, and fsspec
URLs (memory://, file:// and a real S3 server)."""

from __future__ import annotations

import threading
import time

import pytest

from fishckpt import StoreLockedError
from fishckpt.storage import LocalStorage, MemoryStorage, RootState, Storage
from fishckpt.storage.remote import FsspecStorage


@pytest.fixture(params=["local", "memory", "memory-url", "file-url", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path, new_url) -> Storage:
    if request.param == "local":
        (tmp_path / "root" / "steps").mkdir(parents=True)
        return LocalStorage(tmp_path / "root")
    if request.param == "memory":
        return MemoryStorage("t")
    url, options = new_url(request.param)
    found = FsspecStorage(url, storage_options=options, cache_dir=tmp_path / "cache")
    found.make_folder("steps")
    return found


def test_publish_creates_and_never_clobbers(storage: Storage) -> None:
    assert storage.publish("steps/a", [b"he", memoryview(b"llo")], overwrite=False) == 5
    assert storage.read("steps/a") == b"hello"
    with pytest.raises(FileExistsError):
        storage.publish("steps/a", [b"other"], overwrite=False)
    assert storage.read("steps/a") == b"hello"
    before = storage.stat("steps/a")
    assert storage.publish("steps/a", [b"bye"], overwrite=True) == 3
    after = storage.stat("steps/a")
    assert storage.read("steps/a") == b"bye"
    assert before is not None and after is not None
    assert (before.size, after.size) == (5, 3)
    assert before.version != after.version


def test_a_failed_publish_leaves_nothing(storage: Storage) -> None:
    def pieces():
        yield b"partial"
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        storage.publish("steps/b", pieces(), overwrite=False)
    assert storage.stat("steps/b") is None
    assert storage.list("steps") == []


def test_reads_ranges_lists_and_deletes(storage: Storage) -> None:
    storage.publish("steps/a", [b"0123456789"], overwrite=False)
    storage.publish("top", [b"x"], overwrite=False)
    assert storage.read_range("steps/a", 2, 5) == b"234"
    assert storage.read_range("steps/a", 8, 20) == b"89"
    assert bytes(storage.map("steps/a")) == b"0123456789"
    assert sorted(storage.list("steps")) == ["a"]
    assert "top" in storage.list("")
    assert storage.list("nowhere") == []
    storage.delete("steps/a")
    assert storage.stat("steps/a") is None
    for call in (lambda: storage.read("steps/a"), lambda: storage.delete("steps/a")):
        with pytest.raises(FileNotFoundError):
            call()


def test_map_is_copy_on_write(storage: Storage) -> None:
    storage.publish("f", [b"abcd"], overwrite=False)
    mapped = storage.map("f")
    mapped[0] = ord("z")
    assert storage.read("f") == b"abcd"


def test_lock_is_exclusive(storage: Storage) -> None:
    with storage.lock(), pytest.raises(StoreLockedError), storage.lock():
        pass
    with storage.lock():  # released
        pass


MARKERS = ("marker",)


def test_new_root_appears_whole_or_not_at_all(tmp_path) -> None:
    for storage in (LocalStorage(tmp_path / "fresh"), MemoryStorage("fresh")):
        assert storage.root_state(MARKERS) in (RootState.MISSING, RootState.EMPTY)
        with pytest.raises(RuntimeError, match="interrupted"), storage.new_root(replace=False, marker="marker") as new:
            new.publish("marker", [b"1"], overwrite=False)
            raise RuntimeError("interrupted")
        assert storage.root_state(MARKERS) in (RootState.MISSING, RootState.EMPTY)
        with storage.new_root(replace=False, marker="marker") as staging:
            staging.publish("data", [b"d"], overwrite=False)
            staging.publish("marker", [b"1"], overwrite=False)
            assert storage.root_state(MARKERS) in (RootState.MISSING, RootState.EMPTY)
        assert storage.root_state(MARKERS) is RootState.STORE
        with storage.new_root(replace=True, marker="marker") as staging:
            staging.publish("marker", [b"2"], overwrite=False)
        assert storage.read("marker") == b"2"
        assert storage.stat("data") is None  # the replaced store is gone whole
    assert [p.name for p in tmp_path.iterdir()] == ["fresh"]  # no staging folder left behind


def test_new_root_in_an_existing_empty_folder_keeps_the_folder(tmp_path) -> None:
    folder = tmp_path / "here"
    folder.mkdir()
    inode = folder.stat().st_ino
    storage = LocalStorage(folder)
    with storage.new_root(replace=False, marker="marker") as staging:
        staging.make_folder("steps")
        staging.publish("marker", [b"1"], overwrite=False)
    assert folder.stat().st_ino == inode  # a shell whose working directory it is keeps working
    assert sorted(p.name for p in folder.iterdir()) == ["marker", "steps"]
    assert [p.name for p in tmp_path.iterdir()] == ["here"]


def test_root_state_tells_what_is_there(tmp_path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "leftovers").mkdir()  # what a killed create leaves: owned names and temp files, no marker
    (tmp_path / "leftovers" / "base").write_bytes(b"partial")
    (tmp_path / "leftovers" / "steps").mkdir()
    (tmp_path / "leftovers" / ".tmp-0123-base").write_bytes(b"partial")
    (tmp_path / "kept").mkdir()  # a steps folder that holds steps is never a leftover
    (tmp_path / "kept" / "steps").mkdir()
    (tmp_path / "kept" / "steps" / "s").write_bytes(b"x")
    owned = ("base", "steps")
    assert LocalStorage(tmp_path / "file").root_state(MARKERS) is RootState.NOT_A_FOLDER
    assert LocalStorage(tmp_path / "other").root_state(MARKERS) is RootState.OTHER
    assert LocalStorage(tmp_path / "empty").root_state(MARKERS) is RootState.EMPTY
    assert LocalStorage(tmp_path / "none").root_state(MARKERS) is RootState.MISSING
    assert LocalStorage(tmp_path / "leftovers").root_state(MARKERS, owned) is RootState.EMPTY
    assert LocalStorage(tmp_path / "leftovers").root_state(MARKERS) is RootState.OTHER
    assert LocalStorage(tmp_path / "kept").root_state(MARKERS, owned) is RootState.OTHER


def test_abandoned_staging_folders_are_removed_and_live_ones_kept(tmp_path) -> None:
    storage = LocalStorage(tmp_path / "store")
    abandoned = tmp_path / ".tmp-00000000deadbeef-store"
    abandoned.mkdir()
    (abandoned / "base").write_bytes(bytes(1000))
    other = tmp_path / ".tmp-00000000deadbeef-other"  # another path's: not ours to touch
    other.mkdir()
    live = LocalStorage(tmp_path / "store")
    with storage.new_root(replace=False, marker="marker") as staging:
        staging.publish("marker", [b"1"], overwrite=False)
        staging_folders = [p for p in tmp_path.iterdir() if p.name.endswith("-store")]
        assert len(staging_folders) == 1 and staging_folders[0] != abandoned  # the abandoned one went first
        # Another create of the same path now must not remove this live staging folder.
        with pytest.raises(FileExistsError), live.new_root(replace=False, marker="marker"):
            (tmp_path / "store").mkdir()
            (tmp_path / "store" / "x").write_bytes(b"x")  # make the second create's rename fail
            raise FileExistsError("stop")
        assert staging_folders[0].exists()
        (tmp_path / "store" / "x").unlink()
        (tmp_path / "store").rmdir()
    assert not abandoned.exists()
    assert other.exists()
    assert storage.read("marker") == b"1"


def test_lock_waits_for_a_holder_up_to_the_timeout(tmp_path) -> None:
    storage = LocalStorage(tmp_path)
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with storage.lock():
            held.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    started = time.monotonic()
    with pytest.raises(StoreLockedError, match="waited for 0.2 s"), storage.lock(timeout=0.2):
        pass
    assert time.monotonic() - started >= 0.2
    threading.Timer(0.2, release.set).start()
    with storage.lock(timeout=5):  # the holder lets go within the wait
        pass
    thread.join()
