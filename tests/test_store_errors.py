"""Refusals: every bad input gets a clear error naming the key or file, and nothing is written."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fishckpt import (
    BaseMismatchError,
    CheckpointStore,
    FormatError,
    InvalidArgumentError,
    Mask,
    MaskMismatchError,
    OutsideMaskError,
    StateMismatchError,
    StepExistsError,
    StepNotFoundError,
    StoreExistsError,
    StoreLockedError,
)
from fishckpt.storage.local import exclusive_lock


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    base = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
    return CheckpointStore.create(tmp_path / "store", base, Mask.from_indices({"w": [0, 5]}, {"w": (4, 3)}))


def _step_files(store: CheckpointStore) -> list[str]:
    return sorted(p.name for p in (store.path / "steps").iterdir())


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"w": torch.zeros(4, 3)}, "missing key(s) ['b']"),
        ({"w": torch.zeros(4, 3), "b": torch.zeros(3), "c": torch.zeros(1)}, "unexpected key(s) ['c']"),
        (
            {"w": torch.zeros(3, 4), "b": torch.zeros(3)},
            "key 'w': state has torch.float32 (3, 4), the base has torch.float32 (4, 3)",
        ),
        ({"w": torch.zeros(4, 3, dtype=torch.float64), "b": torch.zeros(3)}, "key 'w': state has torch.float64 (4, 3)"),
        (
            {"w": torch.zeros(4, 3).to_sparse(), "b": torch.zeros(3)},
            "key 'w': torch.sparse_coo tensors are not supported; make it dense with .to_dense()",
        ),
        (
            {"w": torch.zeros(4, 3), "b": torch.zeros(3, device="meta")},
            "key 'b' is on the meta device and holds no data",
        ),
    ],
)
def test_mismatched_state_is_refused_and_nothing_written(store: CheckpointStore, state, message: str) -> None:
    with pytest.raises(StateMismatchError, match=re.escape(message)):
        store.save(state, 1)
    assert _step_files(store) == []


def test_existing_step_needs_overwrite(store: CheckpointStore) -> None:
    state = {"w": torch.ones(4, 3), "b": torch.zeros(3)}
    state["w"].view(-1)[[0, 5]] = 2.0
    state["w"].view(-1)[[1, 2, 3, 4, 6, 7, 8, 9, 10, 11]] = 0.0
    store.save(state, 1)
    with pytest.raises(StepExistsError, match=r"step 1 is already saved; pass overwrite=True"):
        store.save(state, 1)
    store.save({"w": torch.zeros(4, 3), "b": torch.zeros(3)}, 1, overwrite=True)
    assert store.load(1)["w"].abs().sum().item() == 0.0


def test_strict_refuses_changes_outside_mask(store: CheckpointStore) -> None:
    state = {"w": torch.zeros(4, 3), "b": torch.tensor([0.0, 1.0, 0.0])}
    with pytest.raises(OutsideMaskError, match=r"step 2 not saved: entries outside the mask changed: b \(1 entries\)"):
        store.save(state, 2, strict=True)
    assert _step_files(store) == []
    with pytest.raises(InvalidArgumentError, match="strict=True needs check_outside_mask=True"):
        store.save(state, 2, strict=True, check_outside_mask=False)


def test_missing_step_and_bad_step_numbers(store: CheckpointStore) -> None:
    with pytest.raises(StepNotFoundError, match=r"step 7 is not in the store \(saved steps: none\)"):
        store.load(7)
    with pytest.raises(StepNotFoundError, match="step 7 is not in the store"):
        store.delete(7)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(InvalidArgumentError, match="step must be a non-negative integer"):
            store.save({"w": torch.zeros(4, 3), "b": torch.zeros(3)}, bad)  # type: ignore[arg-type]


def test_metadata_must_be_json(store: CheckpointStore) -> None:
    with pytest.raises(InvalidArgumentError, match="metadata key 'when' is not JSON-serialisable"):
        store.save({"w": torch.zeros(4, 3), "b": torch.zeros(3)}, 1, metadata={"lr": 0.1, "when": object()})
    assert _step_files(store) == []


def test_create_refuses_non_empty_folder_and_other_stores(tmp_path: Path) -> None:
    base = {"w": torch.zeros(2)}
    mask = Mask.from_indices({"w": [0]}, {"w": (2,)})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(StoreExistsError, match="folder is not empty; choose a new path$"):
        CheckpointStore.create(tmp_path / "full", base, mask, overwrite=True)
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
    CheckpointStore.create(tmp_path / "s", base, mask)
    with pytest.raises(StoreExistsError, match=r"pass overwrite=True to replace the fishckpt store there"):
        CheckpointStore.create(tmp_path / "s", base, mask)
    CheckpointStore.create(tmp_path / "s", {"w": torch.ones(2)}, mask, overwrite=True)
    assert CheckpointStore.open(tmp_path / "s").steps == []
    (tmp_path / "empty").mkdir()
    CheckpointStore.create(tmp_path / "empty", base, mask)  # an empty folder is fine
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_create_checks_mask_against_base(tmp_path: Path) -> None:
    base = {"w": torch.zeros(2, 2)}
    with pytest.raises(MaskMismatchError, match="mask tensor 'v' is not in the base state"):
        CheckpointStore.create(tmp_path / "a", base, Mask.from_indices({"v": [0]}, {"v": (2,)}))
    with pytest.raises(MaskMismatchError, match=r"mask tensor 'w' has shape \(4,\), the base has \(2, 2\)"):
        CheckpointStore.create(tmp_path / "b", base, Mask.from_indices({"w": [0]}, {"w": (4,)}))
    with pytest.raises(FormatError, match="tensor 'q' has dtype torch.bits8, which fishckpt cannot store"):
        CheckpointStore.create(tmp_path / "c", {"q": torch.empty(2, dtype=torch.bits8)}, Mask.from_indices({}, {}))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_checkpoint_from_another_store_is_refused(tmp_path: Path) -> None:
    mask = Mask.from_indices({"w": [0]}, {"w": (3,)})
    one = CheckpointStore.create(tmp_path / "one", {"w": torch.zeros(3)}, mask)
    two = CheckpointStore.create(tmp_path / "two", {"w": torch.ones(3)}, mask)
    one.save({"w": torch.tensor([5.0, 0.0, 0.0])}, 4)
    (two.path / "steps" / one.step_path(4).name).write_bytes(one.step_path(4).read_bytes())
    with pytest.raises(BaseMismatchError, match="this step file belongs to another store"):
        two.load(4)


def test_open_refuses_non_store(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="no such store folder"):
        CheckpointStore.open(tmp_path / "missing")
    with pytest.raises(FormatError, match=r"not a fishckpt store \(no fishckpt.json or manifest.safetensors\)"):
        CheckpointStore.open(tmp_path)


def test_second_writer_is_refused_while_the_lock_is_held(store: CheckpointStore) -> None:
    impatient = CheckpointStore.open(store.path, lock_timeout=0)
    with exclusive_lock(store.path / ".lock"), pytest.raises(StoreLockedError, match="another process is writing"):
        impatient.save({"w": torch.zeros(4, 3), "b": torch.zeros(3)}, 1)
    store.save({"w": torch.zeros(4, 3), "b": torch.zeros(3)}, 1)  # released: works again
    assert store.steps == [1]


def test_tied_key_that_came_apart_is_refused(tmp_path: Path) -> None:
    shared = torch.zeros(3)
    store = CheckpointStore.create(
        tmp_path / "s", {"a": shared, "b": shared}, Mask.from_indices({"a": [0]}, {"a": (3,)})
    )
    with pytest.raises(StateMismatchError, match="key 'b' was tied to 'a' in the base but now differs from it"):
        store.save({"a": torch.tensor([1.0, 0, 0]), "b": torch.zeros(3)}, 1)
    store.save({"a": torch.zeros(3), "b": torch.zeros(3)}, 1)  # untied but equal is fine


def test_another_process_holding_the_lock_is_refused(store: CheckpointStore) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(store.path / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        patient = CheckpointStore.open(store.path, lock_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(StoreLockedError, match=r"another process is writing to this store \(it holds \.lock; wai"):
            patient.save({"w": torch.zeros(4, 3), "b": torch.zeros(3)}, 1)
        assert time.monotonic() - started >= 0.3  # a bounded wait, not an immediate failure nor a hang
        assert _step_files(store) == []
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    store.save({"w": torch.zeros(4, 3), "b": torch.zeros(3)}, 1)  # the kernel dropped the dead holder's lock
    assert store.steps == [1]


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""
