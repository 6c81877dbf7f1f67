"""A flipped or truncated byte in any store file raises IntegrityError naming the file; never wrong weights."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fishckpt import CheckpointStore, IntegrityError, Mask, VerifyError


def _make_store(tmp_path: Path) -> CheckpointStore:
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 32, generator=generator), "b": torch.randn(32, generator=generator)}
    mask = Mask.from_indices({"w": torch.randperm(2048, generator=generator)[:40]}, {"w": (64, 32)})
    store = CheckpointStore.create(tmp_path / "store", base, mask, chunk_bytes=1024)
    state = {name: t.clone() for name, t in base.items()}
    state["w"].view(-1)[mask["w"]] += 0.5
    store.save(state, 1)
    return store


def _positions(size: int) -> list[int]:
    generator = torch.Generator().manual_seed(size)
    return sorted({0, 7, size // 2, size - 17, size - 1, *torch.randint(0, size, (6,), generator=generator).tolist()})


def _flip_each(path: Path, check: Callable[[int], None]) -> None:
    original = path.read_bytes()
    try:
        for position in _positions(len(original)):
            damaged = bytearray(original)
            damaged[position] ^= 0x10
            path.write_bytes(bytes(damaged))
            check(position)
        for keep in (0, 10, len(original) // 2, len(original) - 1):
            path.write_bytes(original[:keep])
            check(-keep)
    finally:
        path.write_bytes(original)


def test_checkpoint_file(tmp_path: Path) -> None:
    store = _make_store(tmp_path)
    path = store.step_path(1)

    def check(_: int) -> None:
        fresh = CheckpointStore.open(store.path)
        with pytest.raises(IntegrityError, match=re.escape(str(path))):
            fresh.load(1)
        with pytest.raises(IntegrityError, match=re.escape(str(path))):
            fresh.verify(1)

    _flip_each(path, check)


def test_base_file(tmp_path: Path) -> None:
    store = _make_store(tmp_path)
    path = store.path / "base.safetensors"
    header_bytes = 8 + int.from_bytes(path.read_bytes()[:8], "little")

    def check(position: int) -> None:
        fresh = CheckpointStore.open(store.path)
        with pytest.raises(IntegrityError, match=re.escape(str(path))) as raised:
            fresh.load(1)
        if position >= header_bytes:  # a data byte: the tensor is named too
            assert re.search(r"tensor '(w|b)'", str(raised.value)), raised.value
        with pytest.raises(VerifyError, match=re.escape(str(path))):
            fresh.verify()

    _flip_each(path, check)


def test_mask_file(tmp_path: Path) -> None:
    store = _make_store(tmp_path)
    path = store.files()["mask"]

    def check(_: int) -> None:
        with pytest.raises(IntegrityError, match=re.escape(str(path))):
            CheckpointStore.open(store.path)

    _flip_each(path, check)


def test_manifest(tmp_path: Path) -> None:
    store = _make_store(tmp_path)
    path = store.files()["manifest"]

    def check(_: int) -> None:
        with pytest.raises(IntegrityError, match=re.escape(str(path))):
            CheckpointStore.open(store.path)

    _flip_each(path, check)


def test_save_refuses_to_record_a_damaged_base_as_changes(tmp_path: Path) -> None:
    store = _make_store(tmp_path)
    path = store.path / "base.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside tensor data, away from the header
    path.write_bytes(bytes(data))
    fresh = CheckpointStore.open(store.path)
    with pytest.raises(IntegrityError, match="base file is corrupted"):
        fresh.save(fresh.load(1, verify=False), 2)
    assert fresh.steps == [1]


def test_verify_lists_every_failing_file(tmp_path: Path) -> None:
    store = _make_store(tmp_path)
    store.save({"w": torch.zeros(64, 32), "b": torch.zeros(32)}, 2, check_outside_mask=False)
    for step in (1, 2):
        data = bytearray(store.step_path(step).read_bytes())
        data[len(data) // 2] ^= 0x01
        store.step_path(step).write_bytes(bytes(data))
    with pytest.raises(VerifyError) as raised:
        CheckpointStore.open(store.path).verify()
    assert [failure.file for failure in raised.value.failures] == [store.step_path(1), store.step_path(2)]
