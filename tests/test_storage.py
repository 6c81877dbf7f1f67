"""The Storage interface, held to one contract on every backend: local folders, the in-memory fake, and fsspec
URLs (memory://, file:// and a real S3 server)."""

from __future__ import annotations

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


def test_new_root_appears_whole_or_not_at_all(tmp_path) -> None:
    for storage in (LocalStorage(tmp_path / "fresh"), MemoryStorage("fresh")):
        assert storage.root_state("marker") in (RootState.MISSING, RootState.EMPTY)
        with pytest.raises(RuntimeError, match="interrupted"), storage.new_root(replace=False) as staging:
            staging.publish("marker", [b"1"], overwrite=False)
            raise RuntimeError("interrupted")
        assert storage.root_state("marker") in (RootState.MISSING, RootState.EMPTY)
        with storage.new_root(replace=False) as staging:
            staging.publish("marker", [b"1"], overwrite=False)
            assert storage.root_state("marker") in (RootState.MISSING, RootState.EMPTY)
        assert storage.root_state("marker") is RootState.STORE
        with storage.new_root(replace=True) as staging:
            staging.publish("marker", [b"2"], overwrite=False)
        assert storage.read("marker") == b"2"
    assert [p.name for p in tmp_path.iterdir()] == ["fresh"]  # no staging folder left behind


def test_root_state_tells_what_is_there(tmp_path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    assert LocalStorage(tmp_path / "file").root_state("m") is RootState.NOT_A_FOLDER
    assert LocalStorage(tmp_path / "other").root_state("m") is RootState.OTHER
    assert LocalStorage(tmp_path / "empty").root_state("m") is RootState.EMPTY
    assert LocalStorage(tmp_path / "none").root_state("m") is RootState.MISSING
