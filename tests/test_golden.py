"""Stores written by format_version 1 keep loading, bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import assert_state_bits_equal
from golden_v1 import base_state, mask, step_state

from fishckpt import CheckpointStore, OutsideMaskWarning

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


def test_golden_store_accepts_new_steps(golden: CheckpointStore) -> None:
    with pytest.warns(OutsideMaskWarning, match=r"counts \(5 entries, dense\)"):
        golden.save(step_state(2), 3)  # a version-1 store written to by this version
    assert_state_bits_equal(golden.load(3), step_state(2))
    assert_state_bits_equal(golden.load(1), step_state(1))  # the old steps are untouched
    assert list(golden.load(3)) == list(base_state())  # key order is the base's
