"""The device-side exact check (store/devicecheck.py): an independent reference, and the changes it must catch."""

from __future__ import annotations

import warnings

import pytest
import torch
from _states import DTYPES, random_tensor
from conftest import assert_state_bits_equal
from hypothesis import given, settings
from hypothesis import strategies as st

from fishckpt import CheckpointStore, Mask, OutsideMaskWarning
from fishckpt.format.bits import element_words
from fishckpt.format.dtypes import dtype_row
from fishckpt.format.manifest import TensorEntry
from fishckpt.store import devicecheck

MASK64 = (1 << 64) - 1


def _reference_mix(word: int, position: int) -> int:
    """splitmix64's finaliser (Steele et al.) in Python integers modulo 2^64, returned as a signed int64."""
    z = (word ^ (position * 0x9E3779B97F4A7C15)) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return z - (1 << 64) if z >> 63 else z


def test_mix_matches_an_independent_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**63), 2**63 - 1, (200,), dtype=torch.int64, generator=generator)
    positions = torch.randint(0, 2**40, (200,), dtype=torch.int64, generator=generator)
    got = devicecheck.mix(words, positions).tolist()
    expected = [_reference_mix(w & MASK64, p) for w, p in zip(words.tolist(), positions.tolist(), strict=True)]
    assert got == expected


def _entry(tensor: torch.Tensor) -> TensorEntry:
    return TensorEntry("t", dtype_row(tensor.dtype, key="t"), tuple(tensor.shape), None, [])


def _differing(base: torch.Tensor, state: torch.Tensor, index: torch.Tensor, per_chunk: int) -> list[int]:
    entry = _entry(base)
    base_sums = devicecheck.chunk_sums(entry, base, per_chunk)
    return devicecheck.differing_chunks(
        entry,
        state,
        index,
        element_words(state).index_select(0, index),
        element_words(base).index_select(0, index),
        base_sums,
        per_chunk,
    )


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    st.sampled_from(DTYPES),
    st.integers(1, 500),
    st.integers(1, 64),
    st.floats(0, 1),
    st.integers(0, 2**31 - 1),
    st.integers(0, 7),
)
def test_one_flipped_bit_outside_the_mask_is_always_caught(dtype, numel, per_chunk, density, seed, bit) -> None:
    generator = torch.Generator().manual_seed(seed)
    base = random_tensor(dtype, (numel,), generator)
    index = torch.nonzero(torch.rand(numel, generator=generator) < density).reshape(-1)
    state = base.clone()
    element_words(state)[index] = element_words(random_tensor(dtype, (index.numel(),), generator))
    assert _differing(base, state, index, per_chunk) == []  # changes inside the mask never count
    outside = sorted(set(range(numel)) - set(index.tolist()))
    if not outside:
        return
    position = outside[seed % len(outside)]
    byte = state.reshape(-1)[position : position + 1].view(torch.uint8)
    byte[seed % byte.numel()] ^= 1 << bit
    assert _differing(base, state, index, per_chunk) == [position // per_chunk]


def test_weight_decay_on_every_entry_and_a_moved_buffer_are_caught() -> None:
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(10_000, generator=generator)
    index = torch.arange(0, 10_000, 100)
    assert _differing(base, base * (1 - 1e-4), index, 1024) == list(range(10))
    moved = base.clone()
    moved[5000:5003] += 1.0
    assert _differing(base, moved, index, 1024) == [4]
    swapped = base.clone()
    swapped[[10, 20]] = swapped[[20, 10]]  # the same values, in other places: the position is mixed in
    assert _differing(base, swapped, index, 1024) == [0]


def test_sixteen_byte_elements_and_empty_tensors() -> None:
    base = torch.complex(torch.arange(50.0), -torch.arange(50.0)).to(torch.complex128)
    state = base.clone()
    state[7] = complex(7.0, 7.0)  # only the second word differs
    assert _differing(base, state, torch.tensor([1, 2]), 8) == [0]
    empty = torch.empty(0, dtype=torch.float16)
    assert _differing(empty, empty.clone(), torch.zeros(0, dtype=torch.int64), 8) == []


def test_the_checksum_path_finds_the_same_changes_as_the_scan(tmp_path) -> None:
    generator = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(300, 300, generator=generator), "b": torch.randn(300, generator=generator)}
    mask = Mask.from_indices({"w": torch.randperm(90000, generator=generator)[:900]}, {"w": (300, 300)})
    store = CheckpointStore.create(tmp_path / "s", base, mask, chunk_bytes=4096)
    state = {name: tensor.clone() for name, tensor in base.items()}
    state["w"].view(-1)[mask["w"]] += 0.25
    state["w"].view(-1)[12345] = 7.0
    state["b"][3] = 7.0
    infos = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutsideMaskWarning)
        for step, device_check in ((1, False), (2, True)):
            infos[step] = store.save(state, step, device_check=device_check)
    assert infos[1].changed_outside_mask == infos[2].changed_outside_mask == {"w": 1, "b": 1}
    assert_state_bits_equal(store.load(1), store.load(2))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_checksums_equal_the_cpu_ones_and_a_cuda_save_moves_o_k(tmp_path) -> None:
    generator = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(2048, 1024, generator=generator), "h": torch.randn(5000, generator=generator).half()}
    for name, tensor in base.items():
        entry = _entry(tensor)
        assert torch.equal(
            devicecheck.chunk_sums(entry, tensor.cuda(), 4096).cpu(), devicecheck.chunk_sums(entry, tensor, 4096)
        ), name
    mask = Mask.from_indices({"w": torch.randperm(2048 * 1024, generator=generator)[:10_000]}, {"w": (2048, 1024)})
    store = CheckpointStore.create(tmp_path / "s", base, mask)
    state = {name: tensor.cuda() for name, tensor in base.items()}
    state["w"].view(-1)[mask["w"].cuda()] += 0.5
    state["h"][17] = 3.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutsideMaskWarning)
        info = store.save(state, 1)
    assert info.changed_outside_mask == {"h": 1}
    assert_state_bits_equal(store.load(1), {name: tensor.cpu() for name, tensor in state.items()})
    target = {name: torch.zeros_like(tensor) for name, tensor in state.items()}
    store.load_into(target, 1)
    assert_state_bits_equal({k: v.cpu() for k, v in target.items()}, {k: v.cpu() for k, v in state.items()})
