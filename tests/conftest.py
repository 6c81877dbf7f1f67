"""Shared fixtures and bit-exact comparison helpers."""

from __future__ import annotations

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


@pytest.fixture(params=["native", "torch"])
def scan_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the C scan of the exact check, then with the torch fallback used where it is not built."""
    if request.param == "native" and not _scan.available():
        pytest.skip("the C extension was not built")
    if request.param == "torch":
        monkeypatch.setattr(_scan, "module", None)
    return str(request.param)


@pytest.fixture(params=["local", "memory"])
def new_location(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A maker of fresh store locations on one backend: a local folder, or the in-memory fake."""
    from fishckpt.storage import MemoryStorage

    def make():
        if request.param == "local":
            return tmp_path_factory.mktemp("s") / "store"
        return MemoryStorage("test")

    return make
