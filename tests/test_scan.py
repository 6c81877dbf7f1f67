"""The exact check's chunk scan: the C extension and the torch loop against an independent oracle."""

from __future__ import annotations

import math
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
import xxhash
from _states import DTYPES, random_tensor
from conftest import bits
from hypothesis import given, settings
from hypothesis import strategies as st

from fishckpt.format.bits import byte_view, element_words
from fishckpt.format.dtypes import dtype_row
from fishckpt.format.manifest import TensorEntry
from fishckpt.store import scan as _scan

needs_native = pytest.mark.skipif(not _scan.native_available(), reason="the C extension was not built")


def _chunk_digests(tensor: torch.Tensor, per_chunk: int) -> list[bytes]:
    """Oracle: the xxhash package's XXH3-128 of each chunk of the tensor's bytes."""
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    step = per_chunk * tensor.element_size()
    return [xxhash.xxh3_128_digest(data[i : i + step]) for i in range(0, max(len(data), 1), step)]


def _case(dtype: torch.dtype, numel: int, per_chunk: int, density: float, outside: int, seed: int):
    """A base, a mask, a state changed inside the mask and at ``outside`` positions, and the changed chunks."""
    generator = torch.Generator().manual_seed(seed)
    base = random_tensor(dtype, (numel,), generator)
    index = torch.nonzero(torch.rand(numel, generator=generator) < density).reshape(-1)
    state = base.clone()
    words = element_words(state)
    words[index] = element_words(random_tensor(dtype, (index.numel(),), generator))
    unmasked = torch.ones(numel, dtype=torch.bool)
    unmasked[index] = False
    candidates = torch.nonzero(unmasked).reshape(-1)
    moved = candidates[torch.randperm(candidates.numel(), generator=generator)[:outside]]
    for position in moved.tolist():  # flip one bit of the first byte: always a real change
        state.reshape(-1)[position : position + 1].view(torch.uint8)[0] ^= 1
    row = dtype_row(dtype, key="t")
    entry = TensorEntry("t", row, (numel,), None, _chunk_digests(base, per_chunk))
    plan = _scan.MaskPlan.build(entry, index, base, per_chunk * row.itemsize)
    expected_chunks = sorted({position // per_chunk for position in moved.tolist()})
    return entry, plan, base, state, index, expected_chunks


def _run(entry, plan, state, *, native: bool, monkeypatch: pytest.MonkeyPatch):
    with monkeypatch.context() as patch:
        if not native:
            patch.setattr(_scan, "_native", None)
        scratch = torch.empty(plan.per_chunk * entry.dtype.itemsize, dtype=torch.uint8)
        return _scan.scan(entry, plan, state, scratch)


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native), False], ids=["native", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scan_finds_exactly_the_changed_chunks(dtype: torch.dtype, native: bool, monkeypatch) -> None:
    # 1000 elements in chunks of 96 (a last, short chunk), some chunks with no masked entry.
    for seed, (numel, density, outside) in enumerate([(1000, 0.05, 0), (1000, 0.3, 3), (1000, 0.0, 2), (7, 1.0, 0)]):
        entry, plan, _, state, index, expected_chunks = _case(dtype, numel, 96, density, outside, seed)
        values, differing = _run(entry, plan, state, native=native, monkeypatch=monkeypatch)
        assert differing == expected_chunks
        assert torch.equal(bits(values), bits(element_words(state)[index]))


@needs_native
def test_native_blocks_cross_chunk_and_block_edges() -> None:
    # 4 KiB blocks inside 10,000-element chunks: masked entries on every edge, state left untouched.
    numel, per_chunk = 40_000, 10_000
    base = torch.arange(numel, dtype=torch.float32)
    edges = {0, 1023, 1024, 1025, 9_999, 10_000, 10_001, 19_999, 39_999}
    index = torch.tensor(sorted(edges), dtype=torch.int64)
    state = base.clone()
    state[index] = -1.0
    row = dtype_row(torch.float32, key="t")
    entry = TensorEntry("t", row, (numel,), None, _chunk_digests(base, per_chunk))
    plan = _scan.MaskPlan.build(entry, index, base, per_chunk * 4)
    values, differing = _scan.scan(entry, plan, state, scratch=None)
    assert differing == []
    assert values.view(torch.float32).tolist() == [-1.0] * len(edges)
    state[10_002] = 0.5  # outside the mask, in chunk 1
    assert _scan.scan(entry, plan, state, scratch=None)[1] == [1]


@needs_native
def test_native_empty_tensor_has_one_chunk() -> None:
    row = dtype_row(torch.float16, key="t")
    empty = torch.empty(0, dtype=torch.float16)
    entry = TensorEntry("t", row, (0,), None, [xxhash.xxh3_128_digest(b"")])
    plan = _scan.MaskPlan.build(entry, torch.zeros(0, dtype=torch.int64), empty, 64)
    values, differing = _scan.scan(entry, plan, empty, scratch=None)
    assert differing == [] and values.numel() == 0


def _native_args(numel: int = 100, k: int = 3, itemsize: int = 4, per_chunk: int = 50):
    chunks = max(1, math.ceil(numel / per_chunk))
    return [
        np.zeros(numel * itemsize, dtype=np.uint8),
        itemsize,
        per_chunk,
        np.arange(0, 3 * k, 3, dtype=np.int64),
        np.zeros(k * itemsize, dtype=np.uint8),
        np.zeros(k * itemsize, dtype=np.uint8),
        bytes(16 * chunks),
    ]


@needs_native
@pytest.mark.parametrize(
    ("position", "value", "message"),
    [
        (3, np.array([5, 5, 9], dtype=np.int64), "index\\[1\\] = 5 is not strictly increasing"),
        (3, np.array([9, 5, 6], dtype=np.int64), "index\\[1\\] = 5 is not strictly increasing"),
        (3, np.array([1, 2, 100], dtype=np.int64), "index\\[2\\] = 100 .* not below numel 100"),
        (3, np.array([-1, 2, 3], dtype=np.int64), "index\\[0\\] = -1"),
        (1, 0, "itemsize 0 must be 1 to 16"),
        (2, 0, "chunk_elements 0 at least 1"),
        (4, np.zeros(11, dtype=np.uint8), "base_values and values of 12 bytes"),
        (5, np.zeros(13, dtype=np.uint8), "base_values and values of 12 bytes"),
        (6, bytes(16), "32 digest bytes"),
        (0, np.zeros(401, dtype=np.uint8), "not a whole number of elements"),
    ],
)
def test_native_refuses_inconsistent_arguments(position: int, value: object, message: str) -> None:
    args = _native_args()
    args[position] = value
    native = _scan._native
    assert native is not None
    with pytest.raises(ValueError, match=message):
        native.masked_scan(*args)


@needs_native
def test_native_needs_a_writable_values_buffer() -> None:
    args = _native_args()
    args[5] = bytes(12)
    native = _scan._native
    assert native is not None
    with pytest.raises(TypeError):
        native.masked_scan(*args)


@needs_native
def test_native_digest_matches_xxhash_package() -> None:
    # No masked entries: the native digest of each chunk is the xxhash package's, so only the chunk
    # whose reference digest was damaged differs.
    data = torch.randint(0, 256, (100_003,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    digests = _chunk_digests(data, 8_192)
    digests[5] = bytes(16)
    native = _scan._native
    assert native is not None
    empty = np.zeros(0, dtype=np.uint8)
    differing = native.masked_scan(
        byte_view(data).numpy(), 1, 8_192, np.zeros(0, dtype=np.int64), empty, empty.copy(), b"".join(digests)
    )
    assert differing == [5]


def test_store_works_where_the_extension_is_missing(tmp_path) -> None:
    # As installed without a compiler: importing fishckpt.store._native fails, and saves still find every change.
    script = f"""
import sys, warnings
sys.modules["fishckpt.store._native"] = None  # makes `from . import _native` raise ImportError
import torch
from fishckpt import CheckpointStore, Mask, OutsideMaskWarning
from fishckpt.store import scan as _scan
assert not _scan.native_available()
base = {{"w": torch.arange(4096, dtype=torch.float32), "b": torch.zeros(3)}}
mask = Mask.from_indices({{"w": [5, 4000]}}, {{"w": (4096,)}})
store = CheckpointStore.create({str(tmp_path / "store")!r}, base, mask)
state = {{"w": base["w"].clone(), "b": base["b"].clone()}}
state["w"][[5, 4000, 17]] = -1.0
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    info = store.save(state, 1)
assert info.changed_outside_mask == {{"w": 1}}, info.changed_outside_mask
assert any(issubclass(w.category, OutsideMaskWarning) for w in caught)
assert torch.equal(store.load(1)["w"].view(torch.int32), state["w"].view(torch.int32))
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@needs_native
@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    dtype=st.sampled_from(DTYPES),
    numel=st.integers(0, 5000),
    per_chunk=st.integers(1, 3000),
    density=st.floats(0, 1),
    outside=st.integers(0, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_native_matches_oracle_and_torch_loop(
    dtype: torch.dtype, numel: int, per_chunk: int, density: float, outside: int, seed: int
) -> None:
    entry, plan, _, state, index, expected_chunks = _case(dtype, numel, per_chunk, density, outside, seed)
    scratch = torch.empty(per_chunk * entry.dtype.itemsize, dtype=torch.uint8)
    native_values, native_chunks = _scan.scan(entry, plan, state, scratch=None)
    with mock.patch.object(_scan, "_native", None):
        torch_values, torch_chunks = _scan.scan(entry, plan, state, scratch)
    assert native_chunks == torch_chunks == expected_chunks
    assert torch.equal(bits(native_values), bits(element_words(state)[index]))
    assert torch.equal(bits(native_values), bits(torch_values))
