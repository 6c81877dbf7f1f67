"""The fsspec backend's own promises: URL dispatch, the base cache, ranged reads, and errors that name the URL."""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from pathlib import Path

import _s3server
import pytest
import torch
from _s3proxy import Proxy
from conftest import assert_state_bits_equal

from fishckpt import CheckpointStore, InvalidArgumentError, Mask, StorageError, StoreExistsError
from fishckpt.storage import LocalStorage, RootState, open_storage
from fishckpt.storage.remote import FsspecStorage


def _tiny() -> tuple[dict[str, torch.Tensor], Mask]:
    generator = torch.Generator().manual_seed(3)
    return {"w": torch.randn(16, 8, generator=generator)}, Mask.from_indices({"w": [1, 5, 9]}, {"w": (16, 8)})


def _no_botocore_in(error: BaseException) -> None:
    text = "".join(traceback.format_exception(error))
    for trace in ("botocore/", "botocore.exceptions", "s3fs/", "fsspec/"):  # no frame or exception of theirs
        assert trace not in text, text


# Dispatch --------------------------------------------------------------------------------------


def test_plain_paths_stay_local_and_urls_go_to_fsspec(tmp_path: Path) -> None:
    assert isinstance(open_storage(tmp_path / "a"), LocalStorage)
    assert isinstance(open_storage(str(tmp_path / "a")), LocalStorage)
    for url in ("s3://bucket/run", "memory://run", (tmp_path / "b").as_uri()):
        found = open_storage(url)
        assert isinstance(found, FsspecStorage), url
        assert found.url == url
    assert open_storage("s3://bucket/run").conditional_writes
    assert not open_storage("memory://run").conditional_writes


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("nosuchscheme://bucket/run", r"nosuchscheme://bucket/run: no fsspec backend handles nosuchscheme://"),
        ("s3:/bucket/run", r"s3:/bucket/run: looks like a s3:// URL that lost a slash.*'s3://bucket/run'"),
        (Path("s3://bucket/run"), r"looks like a s3:// URL that lost a slash"),
    ],
)
def test_a_url_never_becomes_a_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, location, message) -> None:
    monkeypatch.chdir(tmp_path)
    base, mask = _tiny()
    with pytest.raises(StorageError, match=message):
        CheckpointStore.create(location, base, mask)
    with pytest.raises(StorageError, match=message):
        CheckpointStore.open(location)
    assert list(tmp_path.iterdir()) == []  # no folder named "s3:" or "nosuchscheme:"


def test_a_missing_backend_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = importlib.import_module("fsspec.registry")._registry  # classes fsspec has imported already
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if s3fs were not installed
    monkeypatch.delitem(registry, "s3", raising=False)
    with pytest.raises(StorageError, match=r"s3://bucket/run: .*pip install 'fishckpt\[remote\]'"):
        CheckpointStore.open("s3://bucket/run")
    monkeypatch.setitem(sys.modules, "fsspec", None)  # and without fsspec at all
    with pytest.raises(StorageError, match=r"memory://run: memory:// stores need fsspec; .*fishckpt\[remote\]"):
        open_storage("memory://run")


def test_storage_options_are_refused_for_a_local_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="storage_options apply to URLs"):
        open_storage(tmp_path, storage_options={"key": "x"})


# The base cache ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory-url", "file-url", "s3"])
def test_map_downloads_once_verifies_then_serves_the_cache(kind: str, new_url, tmp_path: Path) -> None:
    url, options = new_url(kind)
    cache = tmp_path / "cache"
    storage = FsspecStorage(url, storage_options=options, cache_dir=cache)
    storage.make_folder("")
    payload = bytes(range(256)) * 64
    storage.publish("base", [payload], overwrite=False)
    refused: list[bytes] = []

    def refuse(buffer: memoryview) -> None:
        refused.append(bytes(buffer))
        raise ValueError("damaged")

    with pytest.raises(ValueError, match="damaged"):
        storage.map("base", cache_key="k1", verify=refuse)
    assert refused == [payload]
    assert not cache.exists() or list(cache.iterdir()) == []  # nothing kept, no temp left

    checked: list[bytes] = []
    mapped = storage.map("base", cache_key="k1", verify=lambda buffer: checked.append(bytes(buffer)))
    assert bytes(mapped) == payload and checked == [payload]
    assert storage.cache_path("k1").read_bytes() == payload
    mapped[0] = 0xFF  # copy-on-write: neither the cache nor the object changes
    assert storage.cache_path("k1").read_bytes() == payload

    storage.delete("base")  # a second store object, another "process", needs no download at all
    again = FsspecStorage(url, storage_options=options, cache_dir=cache)
    assert bytes(again.map("base", cache_key="k1", verify=lambda _: pytest.fail("verified twice"))) == payload
    with pytest.raises(FileNotFoundError):
        again.map("base", cache_key="another-key")


def test_default_cache_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert FsspecStorage("memory://x").cache_dir == tmp_path / "xdg" / "fishckpt" / "bases"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert FsspecStorage("memory://x").cache_dir == tmp_path / "home" / ".cache" / "fishckpt" / "bases"
    assert FsspecStorage("memory://x", cache_dir=tmp_path / "c").cache_dir == tmp_path / "c"


# The store's life cycle without rename --------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory-url", "file-url", "s3"])
def test_new_root_builds_in_place_and_undoes_a_failed_build(kind: str, new_url, tmp_path: Path) -> None:
    url, options = new_url(kind)
    storage = FsspecStorage(url, storage_options=options, cache_dir=tmp_path)
    assert storage.root_state(("marker",)) is RootState.MISSING
    with pytest.raises(RuntimeError, match="interrupted"), storage.new_root(replace=False, marker="marker") as staging:
        staging.publish("data", [b"1"], overwrite=False)
        raise RuntimeError("interrupted")
    assert storage.root_state(("marker",)) in (RootState.MISSING, RootState.EMPTY)
    with storage.new_root(replace=False, marker="marker") as staging:
        staging.publish("data", [b"1"], overwrite=False)
        assert storage.root_state(("marker",)) is RootState.OTHER  # in place: objects, but no marker yet
        staging.publish("marker", [b"1"], overwrite=False)
    assert storage.root_state(("marker",)) is RootState.STORE
    sibling = FsspecStorage(url + "2", storage_options=options, cache_dir=tmp_path)  # a prefix of the same letters
    sibling.make_folder("")
    sibling.publish("keep", [b"k"], overwrite=False)
    with storage.new_root(replace=True, marker="marker") as staging:
        staging.publish("marker", [b"2"], overwrite=False)
    assert storage.read("marker") == b"2"
    assert storage.stat("data") is None  # the replaced store's objects are gone
    assert sibling.read("keep") == b"k"  # and nothing outside it


def test_a_create_that_loses_a_race_is_a_store_exists_error(new_url, tmp_path: Path) -> None:
    url, options = new_url("s3")
    storage = FsspecStorage(url, storage_options=options, cache_dir=tmp_path)
    other = FsspecStorage(url, storage_options=options, cache_dir=tmp_path)
    with (
        pytest.raises(StoreExistsError, match="another process created a store here"),
        storage.new_root(replace=False, marker="marker") as staging,
    ):
        staging.publish("mine", [b"1"], overwrite=False)
        other.publish("base", [b"theirs"], overwrite=False)  # the other creator got there first
        staging.publish("base", [b"mine"], overwrite=False)
    assert storage.stat("mine") is None  # our part undone
    assert storage.read("base") == b"theirs"  # theirs untouched


# S3: the wire and the errors ----------------------------------------------------------------------


@pytest.fixture
def proxy(s3_server: _s3server.S3Server):
    running = Proxy(s3_server.endpoint).start()
    yield running
    running.stop()


def _through(proxy: Proxy, server: _s3server.S3Server, **extra: object) -> dict[str, object]:
    options = server.storage_options(skip_instance_cache=True, **extra)
    options["client_kwargs"] = {"endpoint_url": proxy.endpoint, "region_name": "us-east-1"}
    return options


def test_read_range_is_one_ranged_request(proxy: Proxy, s3_server, new_url, tmp_path: Path) -> None:
    url, _ = new_url("s3")
    storage = FsspecStorage(url, storage_options=_through(proxy, s3_server), cache_dir=tmp_path)
    data = torch.randint(0, 256, (1 << 20,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    payload = data.numpy().tobytes()
    storage.publish("big", [payload], overwrite=False)
    proxy.reset()
    assert storage.read_range("big", 1000, 1010) == payload[1000:1010]
    assert storage.read_range("big", len(payload) - 4, len(payload) + 100) == payload[-4:]
    gets = [seen for seen in proxy.seen if seen.method == "GET"]
    assert [(seen.range, seen.received) for seen in gets] == [
        ("bytes=1000-1009", 10),
        (f"bytes={len(payload) - 4}-{len(payload) + 99}", 4),
    ]
    assert storage.read_range("big", len(payload) + 5, len(payload) + 9) == b""  # past the end: empty
    with pytest.raises(FileNotFoundError):
        storage.read_range("missing", 0, 4)


def test_throttled_requests_are_retried_with_backoff(proxy: Proxy, s3_server, new_url, tmp_path: Path) -> None:
    url, _ = new_url("s3")
    storage = FsspecStorage(url, storage_options=_through(proxy, s3_server), cache_dir=tmp_path)
    storage.publish("x", [b"payload"], overwrite=False)
    proxy.reset()
    proxy.throttle_remaining = 2
    assert storage.read("x") == b"payload"
    statuses = [seen.status for seen in proxy.seen]
    assert statuses[:2] == [503, 503] and set(statuses[2:]) == {200}


def test_a_request_throttled_every_time_gives_up_boundedly(proxy: Proxy, s3_server, new_url, tmp_path: Path) -> None:
    url, _ = new_url("s3")
    storage = FsspecStorage(url, storage_options=_through(proxy, s3_server), cache_dir=tmp_path)
    proxy.throttle_remaining = 10_000
    started = time.monotonic()
    throttled = rf"{url}/x: the server kept throttling read requests \((SlowDown|503)"
    with pytest.raises(StorageError, match=throttled) as raised:
        storage.read("x")
    assert time.monotonic() - started < 60
    assert 2 <= len(proxy.seen) <= 15  # retried, and bounded: 3 botocore attempts x 5 s3fs tries at most
    _no_botocore_in(raised.value)


def test_missing_bucket_is_named(s3_server, tmp_path: Path) -> None:
    url = "s3://no-such-bucket-here/run"
    base, mask = _tiny()
    for action in (
        lambda: CheckpointStore.open(url, storage_options=s3_server.storage_options(), cache_dir=tmp_path),
        lambda: CheckpointStore.create(url, base, mask, storage_options=s3_server.storage_options()),
    ):
        with pytest.raises(StorageError, match=rf"{url}.*bucket 'no-such-bucket-here' does not exist") as raised:
            action()
        _no_botocore_in(raised.value)


def test_wrong_or_missing_credentials_are_named(s3_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = f"s3://{'fishckpt-tests'}/creds/run"
    endpoint = {"client_kwargs": {"endpoint_url": s3_server.endpoint}, "skip_instance_cache": True}
    denied = rf"{url}/manifest.safetensors: access denied for read \((InvalidAccessKeyId|403)"
    with pytest.raises(StorageError, match=denied) as raised:
        CheckpointStore.open(url, storage_options={"key": "nobody", "secret": "wrong", **endpoint})
    _no_botocore_in(raised.value)
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(
        StorageError, match=rf"{url}/manifest.safetensors: no credentials found .*AWS_ACCESS_KEY_ID"
    ) as raised:
        CheckpointStore.open(url, storage_options=endpoint)
    _no_botocore_in(raised.value)


def test_an_unreachable_endpoint_is_named(tmp_path: Path) -> None:
    closed = _s3server.free_ports(1, seed=5)[0]  # free, so nothing listens there
    options = {
        "key": "k",
        "secret": "s",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{closed}"},
        "config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 2}, "connect_timeout": 2},
        "skip_instance_cache": True,
    }
    started = time.monotonic()
    unreachable = r"s3://bucket/run/manifest.safetensors: cannot reach the storage endpoint"
    with pytest.raises(StorageError, match=unreachable) as raised:
        CheckpointStore.open("s3://bucket/run", storage_options=options, cache_dir=tmp_path)
    assert time.monotonic() - started < 60
    _no_botocore_in(raised.value)


def test_configuration_comes_from_the_environment_or_a_profile(
    s3_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    base, mask = _tiny()
    url = "s3://fishckpt-tests/from-env/run"
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", _s3server.ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", _s3server.SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    CheckpointStore.create(url, base, mask, storage_options={"skip_instance_cache": True}).save(base, 1)
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    (tmp_path / "config").write_text(f"[profile fishckpt]\nendpoint_url = {s3_server.endpoint}\nregion = us-east-1\n")
    (tmp_path / "credentials").write_text(
        f"[fishckpt]\naws_access_key_id = {_s3server.ACCESS_KEY}\naws_secret_access_key = {_s3server.SECRET_KEY}\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    store = CheckpointStore.open(
        url, storage_options={"profile": "fishckpt", "skip_instance_cache": True}, cache_dir=tmp_path / "cache"
    )
    assert store.steps == [1]
    assert_state_bits_equal(store.load(1), base)


def test_a_local_file_system_error_names_the_url_without_cloud_hints(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    storage = FsspecStorage((tmp_path / "store").as_uri(), cache_dir=tmp_path / "cache")
    (tmp_path / "store" / "steps").write_bytes(b"a file where a folder should be")
    with pytest.raises(StorageError, match=rf"{(tmp_path / 'store').as_uri()}/steps/a: upload failed \(") as raised:
        storage.publish("steps/a", [b"x"], overwrite=False)
    assert "AWS" not in str(raised.value)


def test_importing_fishckpt_does_not_import_fsspec() -> None:
    """fsspec and s3fs load only when a URL is opened: local users and the CLI's start-up pay nothing."""
    import subprocess

    probe = "import sys, fishckpt; print(sorted(m for m in ('fsspec', 's3fs', 'botocore') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("kind", ["memory-url", "file-url", "s3"])
def test_a_large_object_is_spooled_to_disk_and_still_created_only_once(
    kind: str, new_url, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fishckpt.storage import remote

    monkeypatch.setattr(remote, "SPOOL_IN_MEMORY_BYTES", 1000)  # as a multi-GB base would be
    url, options = new_url(kind)
    storage = FsspecStorage(url, storage_options=options, cache_dir=tmp_path / "cache")
    storage.make_folder("")
    pieces = [bytes([n]) * 700 for n in range(5)]
    assert storage.publish("big", iter(pieces), overwrite=False) == 3500
    assert storage.read("big") == b"".join(pieces)
    with pytest.raises(FileExistsError):
        storage.publish("big", iter(pieces[:2]), overwrite=False)
    assert storage.read("big") == b"".join(pieces)
    assert list((tmp_path / "cache").iterdir()) == []  # the spool file is gone
