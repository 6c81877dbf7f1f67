"""A flipped or truncated byte in any store file raises IntegrityError naming the file; never wrong weights."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors import safe_open

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
        for extra in (b"\x00", b"\x00" * 8, b"fishckpt"):  # appended bytes: a file longer than its header says
            path.write_bytes(original + extra)
            check(-len(original) - len(extra))  # negative: not a flipped data byte
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


# A tensor renamed in a file's header, and what a user sees with plain safetensors ------------------------


def _rename_first_tensor(path: Path) -> str:
    """Renames the file's first section in its JSON header, keeping every length the same."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    first = next(name for name in header if name != "__metadata__")
    renamed = first[:-1] + ("x" if first[-1] != "x" else "y")
    patched = data[8 : 8 + length].replace(f'"{first}"'.encode(), f'"{renamed}"'.encode(), 1)
    assert len(patched) == length
    path.write_bytes(data[:8] + patched + data[8 + length :])
    return renamed


@pytest.mark.parametrize("kind", ["manifest", "mask", "step"])
def test_a_tensor_renamed_in_the_header_is_refused(kind: str, tmp_path: Path) -> None:
    store = _make_store(tmp_path)
    path = store.step_path(1) if kind == "step" else store.files()[kind]
    _rename_first_tensor(Path(path))
    with pytest.raises(IntegrityError, match=re.escape(str(path))):
        CheckpointStore.open(store.path).load(1)


def test_step_and_mask_files_open_with_plain_safetensors(tmp_path: Path) -> None:
    store = _make_store(tmp_path)
    with safe_open(store.step_path(1), "pt") as opened:
        metadata = opened.metadata()
        names = sorted(opened.keys())
        sections = {name: opened.get_tensor(name) for name in names}
    assert metadata["fishckpt.format_version"] == "2"
    assert metadata["fishckpt.kind"] == "step"
    record = json.loads(metadata["fishckpt.record"])
    assert (record["store_id"], record["step"]) == (store.store_id, 1)
    assert (record["base_digest"], record["mask_digest"]) == (store.base_digest, store.mask.digest)
    assert record["k"] == 40 and record["values"] == [{"width": 4, "count": 40}]
    # The four byte planes of the 40 fp32 values' deltas, as 1-d uint8 tensors, each with its digest.
    assert names == [f"values.w4.p{plane}" for plane in range(4)]
    for name, tensor in sections.items():
        assert tensor.dtype == torch.uint8 and tensor.dim() == 1
        assert record["tensors"][name]["digest"] == xxhash.xxh3_128_hexdigest(tensor.numpy().tobytes())

    with safe_open(store.files()["mask"], "pt") as opened:
        metadata = opened.metadata()
        names = sorted(opened.keys())
    record = json.loads(metadata["fishckpt.record"])
    assert metadata["fishckpt.kind"] == "mask"
    assert record["entries"] == [["w", [64, 32], 40]]
    assert record["digest"] == store.mask.digest
    assert names == [f"positions.p{plane}" for plane in range(record["gap_width"])]
