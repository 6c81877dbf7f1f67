"""Stores written by format_version 1 keep loading, bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import assert_state_bits_equal
from golden_v1 import mask, step_state

from fishckpt import CheckpointStore, FormatError, OutsideMaskWarning

GOLDEN = Path(__file__).parent / "data" / "store_v1"


@pytest.fixture
def golden(tmp_path: Path) -> CheckpointStore:
    copy = tmp_path / "store_v1"
    shutil.copytree(GOLDEN, copy)  # the test may write a lock file; keep the checked-in copy pristine
    return CheckpointStore.open(copy)


def test_golden_store_loads_bit_exact(golden: CheckpointStore) -> None:
    assert golden.steps == [1, 2]
    assert golden.mask == mask()
    for step in (1, 2):
        loaded = golden.load(step)
        assert_state_bits_equal(loaded, step_state(step))
        assert loaded["head.weight"] is loaded["layer.weight"]
    golden.verify()
    info = golden.info(2)
    assert info.metadata == {"note": "with buffers"}
    assert info.changed_outside_mask == {"layer.weight": 1, "counts": 5, "flags": 1}


def test_golden_v1_store_is_read_only_and_says_how_to_upgrade(golden: CheckpointStore) -> None:
    assert golden.format_version == 1 and golden.store_id is None
    with pytest.raises(FormatError, match="format 1, which this fishckpt reads but no longer writes; run `fishckpt up"):
        golden.save(step_state(2), 3)
    assert golden.steps == [1, 2]


def test_golden_v1_store_upgrades_bit_exact(golden: CheckpointStore) -> None:
    before = {step: golden.load(step) for step in golden.steps}
    created = golden.info(2).created
    upgraded = CheckpointStore.upgrade(golden.path)
    assert upgraded.format_version == 2 and upgraded.store_id is not None
    assert upgraded.steps == [1, 2]
    assert sorted(p.name for p in Path(upgraded.path).iterdir()) == [
        ".lock",
        "base.safetensors",
        "manifest.safetensors",
        "mask.safetensors",
        "steps",
    ]
    upgraded.verify()
    for step in (1, 2):
        assert_state_bits_equal(upgraded.load(step), before[step])
        assert_state_bits_equal(upgraded.load(step), step_state(step))
    assert upgraded.info(2).metadata == {"note": "with buffers"}
    assert upgraded.info(2).created == created
    with pytest.warns(OutsideMaskWarning, match=r"counts \(5\)"):
        upgraded.save(step_state(2), 3)  # and it takes new steps
    assert_state_bits_equal(CheckpointStore.open(golden.path).load(3), step_state(2))
    with pytest.raises(FormatError, match="already format 2"):
        CheckpointStore.upgrade(golden.path)
