"""A store at a URL keeps every promise of a local one: damage is detected, an interrupted or losing save is
never visible, racing writers never both succeed, and a save sends O(k) bytes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from _s3proxy import Hold, Proxy
from conftest import assert_state_bits_equal

from fishckpt import CheckpointStore, IntegrityError, Mask, StepNotFoundError, VerifyError

KINDS = ["memory-url", "file-url", "s3"]


def _base() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"w": torch.randn(256, 64, generator=generator), "b": torch.randn(64, generator=generator)}


def _mask() -> Mask:
    return Mask.from_indices({"w": range(0, 256 * 64, 37)}, {"w": (256, 64)})


def _state(seed: int) -> dict[str, torch.Tensor]:
    """The base with every masked entry moved, differently for each seed."""
    state = _base()
    index = _mask()["w"]
    generator = torch.Generator().manual_seed(seed)
    state["w"].view(-1)[index] += torch.randn(index.numel(), generator=generator)
    return state


def _open(url: str, options: dict[str, Any], cache: Path) -> CheckpointStore:
    return CheckpointStore.open(url, storage_options=options, cache_dir=cache)


# Damage ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_flipped_or_truncated_byte_in_any_object_is_detected(kind: str, new_url, tmp_path: Path) -> None:
    url, options = new_url(kind)
    store = CheckpointStore.create(url, _base(), _mask(), storage_options=options, chunk_bytes=4096)
    store.save(_state(1), 1)
    fs, root = fsspec.core.url_to_fs(url, **options)
    checks = 0
    for name in ("manifest.safetensors", "mask.safetensors", "base.safetensors", "steps/step-000000000001.safetensors"):
        where = f"{url}/{name}"
        original = fs.cat_file(f"{root}/{name}")
        damaged_copies = [bytes(original[:keep]) for keep in (len(original) // 2, len(original) - 1)]
        for position in (0, len(original) // 2, len(original) - 1):
            flipped = bytearray(original)
            flipped[position] ^= 0x10
            damaged_copies.append(bytes(flipped))
        try:
            for damaged in damaged_copies:
                fs.pipe_file(f"{root}/{name}", damaged)
                cache = tmp_path / f"cache-{checks}"  # a machine that has not cached the base yet
                checks += 1
                with pytest.raises(IntegrityError, match=re.escape(where)):
                    reopened = _open(url, options, cache)
                    reopened.load(1)
                if name == "base.safetensors":
                    assert not cache.exists() or list(cache.iterdir()) == []  # a damaged download is never kept
        finally:
            fs.pipe_file(f"{root}/{name}", original)
    assert_state_bits_equal(_open(url, options, tmp_path / "cache-final").load(1), _state(1))


def test_a_damaged_cached_base_is_detected(new_url, tmp_path: Path) -> None:
    url, options = new_url("s3")
    CheckpointStore.create(url, _base(), _mask(), storage_options=options, chunk_bytes=4096).save(_state(1), 1)
    cache = tmp_path / "cache"
    assert_state_bits_equal(_open(url, options, cache).load(1), _state(1))
    [cached] = list(cache.iterdir())
    data = bytearray(cached.read_bytes())
    data[-5] ^= 0x01
    cached.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="base file is corrupted"):
        _open(url, options, cache).load(1)
    # verify checks the store (the object on the server, which is intact), and a good download
    # replaces the damaged cached copy, so loads work again.
    assert _open(url, options, cache).verify().base_ok
    assert_state_bits_equal(_open(url, options, cache).load(1), _state(1))


@pytest.mark.parametrize("kind", ["memory-url", "s3"])
def test_verify_reads_the_base_on_the_server_not_the_cached_copy(kind: str, new_url, tmp_path: Path) -> None:
    url, options = new_url(kind)
    CheckpointStore.create(url, _base(), _mask(), storage_options=options, chunk_bytes=4096).save(_state(1), 1)
    cache = tmp_path / "cache"
    store = _open(url, options, cache)
    assert_state_bits_equal(store.load(1), _state(1))  # the base is now cached on this machine
    [cached] = list(cache.iterdir())
    good = cached.read_bytes()
    fs, root = fsspec.core.url_to_fs(url, **options)
    damaged = bytearray(fs.cat_file(f"{root}/base.safetensors"))
    damaged[-5] ^= 0x01  # the last tensor in the file ("b", names are sorted): only its chunk digest can see this
    fs.pipe_file(f"{root}/base.safetensors", bytes(damaged))
    for reader in (store, _open(url, options, cache)):
        with pytest.raises(VerifyError) as caught:
            reader.verify()
        failures = [(failure.file, failure.tensor) for failure in caught.value.failures]
        assert failures == [(f"{url}/base.safetensors", "b")]
        assert cached.read_bytes() == good, "the failed download did not replace the good cached copy"
    # A check of one step reads only the base's masked values, in the (good) cached copy.
    assert store.verify(1).steps == [1]


def test_upgrade_refuses_a_store_at_a_url_and_changes_nothing(new_url, tmp_path: Path) -> None:
    url, options = new_url("memory-url")
    CheckpointStore.create(url, _base(), _mask(), storage_options=options).save(_state(1), 1)
    fs, root = fsspec.core.url_to_fs(url, **options)
    before = {name: fs.cat_file(name) for name in fs.find(root)}
    storage = CheckpointStore.open(url, storage_options=options, cache_dir=tmp_path / "c").storage
    with pytest.raises(NotImplementedError, match=re.escape(url)):
        CheckpointStore.upgrade(storage)
    assert {name: fs.cat_file(name) for name in fs.find(root)} == before


# Interrupted, racing and concurrent writers (S3) -------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, sys.argv[5])
    from test_remote_store import _state
    from fishckpt import CheckpointStore, StepExistsError

    url, options, cache, first = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    store = CheckpointStore.open(url, storage_options=options, cache_dir=cache)
    store.load(1)  # the base is downloaded and cached before the test is told the writer is ready
    print("ready", flush=True)
    for step in range(first, first + int(sys.argv[6])):
        try:
            store.save(_state(step), step, check_outside_mask=False)
            print("saved", step, flush=True)
        except StepExistsError:
            print("exists", step, flush=True)
    """
)


def _writer(url: str, options: dict[str, Any], cache: Path, first: int, count: int) -> subprocess.Popen[str]:
    arguments = [url, json.dumps(options), str(cache), str(first), str(Path(__file__).parent), str(count)]
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, *arguments], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture
def s3_store(s3_server, new_url, tmp_path: Path):
    """A store on S3 with step 1 saved, a proxy in front of the server, and options for both ways in."""
    url, options = new_url("s3")
    store = CheckpointStore.create(url, _base(), _mask(), storage_options=options)
    store.save(_state(1), 1)
    proxy = Proxy(s3_server.endpoint).start()
    proxied = dict(options, client_kwargs={"endpoint_url": proxy.endpoint, "region_name": "us-east-1"})
    yield url, options, proxied, proxy
    proxy.stop()


def _is_step_upload(method: str, path: str) -> bool:
    return method == "PUT" and "/steps/" in path


def test_a_writer_killed_mid_upload_leaves_no_step(s3_store, tmp_path: Path) -> None:
    url, options, proxied, proxy = s3_store
    # A small body sits whole in the socket buffer before a kill lands, so the proxy cuts the
    # server off after half of it: to the server the writer died mid-upload.
    proxy.hold = Hold(_is_step_upload, manual=True, drop_rest=True)
    child = _writer(url, proxied, tmp_path / "cache", 2, 1)
    try:
        assert proxy.hold.arrived.wait(timeout=120), child.stderr.read() if child.poll() is not None else "no upload"
        # Half the step's bytes have reached the server; the writer dies before sending the rest.
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        proxy.hold.release.set()
        if child.poll() is None:
            child.kill()
        child.communicate()
    time.sleep(0.5)  # let the proxy drop its half-sent request
    assert [s.status for s in proxy.seen if _is_step_upload(s.method, s.path)] == []  # never answered
    store = _open(url, options, tmp_path / "cache")
    assert store.steps == [1]
    with pytest.raises(StepNotFoundError):
        store.load(2)
    store.verify()
    store.save(_state(2), 2)  # the step can be saved afresh
    assert_state_bits_equal(_open(url, options, tmp_path / "cache").load(2), _state(2))


def test_writers_killed_at_random_instants_leave_only_complete_steps(s3_store, tmp_path: Path) -> None:
    url, options, _, _ = s3_store
    generator = torch.Generator().manual_seed(11)
    for attempt in range(2):
        first = 100 * (attempt + 1)
        child = _writer(url, options, tmp_path / "cache", first, 50)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready", child.stderr.read() if child.stderr else ""
        time.sleep(float(torch.rand(1, generator=generator)) * 0.5)
        os.kill(child.pid, signal.SIGKILL)
        child.communicate()
        store = _open(url, options, tmp_path / "cache")
        store.verify()
        for step in store.steps:
            assert_state_bits_equal(store.load(step), _state(step))


def test_two_processes_saving_one_step_exactly_one_wins(s3_store, tmp_path: Path) -> None:
    url, options, proxied, proxy = s3_store
    # Both uploads are held at the proxy until both have started, so both writers have passed
    # the store's "is the step saved?" check and the server alone decides between them.
    proxy.hold = Hold(_is_step_upload, count=2)
    racers = [_writer(url, proxied, tmp_path / f"cache-{n}", 5, 1) for n in range(2)]
    outputs = [racer.communicate(timeout=180) for racer in racers]
    assert proxy.hold.arrived.is_set(), "the two uploads never met at the server"
    lines = sorted(out.strip().splitlines()[-1] for out, _ in outputs)
    assert lines == ["exists 5", "saved 5"], outputs
    uploads = [seen.status for seen in proxy.seen if _is_step_upload(seen.method, seen.path)]
    assert sorted(uploads) == [200, 412]  # the server refused the second conditional create
    store = _open(url, options, tmp_path / "cache-0")
    assert store.steps == [1, 5]
    assert_state_bits_equal(store.load(5), _state(5))


def test_a_reader_during_an_upload_sees_the_step_whole_or_not_at_all(s3_store, tmp_path: Path) -> None:
    url, options, proxied, proxy = s3_store
    proxy.hold = Hold(_is_step_upload, manual=True)
    writer_store = _open(url, proxied, tmp_path / "cache")
    failures: list[BaseException] = []

    def write() -> None:
        try:
            writer_store.save(_state(3), 3)
        except BaseException as error:
            failures.append(error)

    thread = threading.Thread(target=write)
    thread.start()
    try:
        assert proxy.hold.arrived.wait(timeout=60)
        reader = _open(url, options, tmp_path / "cache")  # half the step is at the server now
        assert reader.steps == [1]
        with pytest.raises(StepNotFoundError):
            reader.load(3)
    finally:
        proxy.hold.release.set()
        thread.join(timeout=60)
    assert failures == []
    reader = _open(url, options, tmp_path / "cache")
    assert reader.steps == [1, 3]
    assert_state_bits_equal(reader.load(3), _state(3))


# What goes over the wire ------------------------------------------------------------------------------


def test_the_base_is_downloaded_once_per_machine_and_a_save_sends_o_k_bytes(s3_store, tmp_path: Path) -> None:
    url, _, proxied, proxy = s3_store
    cache = tmp_path / "cache"
    proxy.reset()
    _open(url, proxied, cache).load(1)  # cold: downloads the base
    base_gets = [s for s in proxy.seen if s.method == "GET" and s.path.split("?")[0].endswith("/base.safetensors")]
    base_bytes = fsspec.core.url_to_fs(url, **proxied)[0].info(f"{url}/base.safetensors")["size"]
    assert sum(s.received for s in base_gets) == base_bytes  # every byte once, none twice
    proxy.reset()
    warm = _open(url, proxied, cache)
    warm.load(1)  # warm: no byte of the base crosses the wire
    assert not [s for s in proxy.seen if "/base.safetensors" in s.path]
    proxy.reset()
    info = warm.save(_state(7), 7)
    sent, received = proxy.wire_bytes()
    assert info.bytes_written == sum(s.sent for s in proxy.seen if s.method == "PUT")
    assert sent == info.bytes_written  # the step file and nothing else goes up
    assert received < 4096  # and nothing of size comes down
    assert info.bytes_written * 20 < base_bytes  # O(k): 1/37 of the entries are masked here
