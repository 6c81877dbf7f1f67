"""Checkpoints of training across processes: sharded (FSDP2) steps, resharding, kills, and DDP's one writer.

Ranks run tests/_ckpt_worker.py on gloo (spawned and killed at a deadline); the tests read what
they wrote and compare it bit for bit with single-process loads of the same store.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _dist_cases import FSDP_DIMS, make_mask, make_net, spawn
from conftest import assert_state_bits_equal
from safetensors.torch import load_file

import fishckpt
from fishckpt import CheckpointStore
from fishckpt.format.names import part_step_of

WORKER = Path(__file__).with_name("_ckpt_worker.py")


def _same_bits(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Bit-for-bit equality whatever the key order (safetensors files come back sorted by name)."""
    assert_state_bits_equal(dict(sorted(actual.items())), dict(sorted(expected.items())))


def _split(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        prefix, _, name = key.partition("/")
        out.setdefault(prefix, {})[name] = value
    return out


_RUNS: dict[int, tuple[int, Path, Path]] = {}


def _train_run(world: int, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, Path]:
    """The ``train`` suite on ``world`` ranks, run once per session: (world, its output, its store)."""
    if world not in _RUNS:
        out = tmp_path_factory.mktemp(f"train{world}")
        store = out / "store"
        spawn("train", world, out, worker=WORKER, extra=(str(store),), timeout=300)
        _RUNS[world] = (world, out, store)
    return _RUNS[world]


@pytest.fixture(params=[2, 3], ids=["2ranks", "3ranks"])
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, Path]:
    return _train_run(request.param, tmp_path_factory)


def test_a_sharded_create_writes_the_base_a_single_process_would(
    trained: tuple[int, Path, Path], tmp_path: Path
) -> None:
    _, out, store_path = trained
    sharded = CheckpointStore.open(store_path)
    loaded = load_file(out / "initial.safetensors")
    initial = {name: loaded[name] for name in sharded.tensor_names}  # the model's key order, as the ranks had it
    assert set(initial) == set(loaded) and len(initial) == 7
    single = CheckpointStore.create(tmp_path / "single", initial, make_mask(make_net(FSDP_DIMS)), chunk_bytes=64)
    assert (store_path / "base.safetensors").read_bytes() == (tmp_path / "single" / "base.safetensors").read_bytes()
    assert sharded.base_digest == single.base_digest
    assert sharded._layout.manifest.masked_digest == single._layout.manifest.masked_digest
    assert sharded.verify(steps=[]).base_ok


def test_every_sharded_step_loads_whole_on_one_process_bit_for_bit(trained: tuple[int, Path, Path]) -> None:
    _, out, store_path = trained
    store = CheckpointStore.open(store_path)
    # Steps 1-2 of the first run, then 3-6 (4-6 saved again by the resumed run, keep_last=4).
    assert store.steps == [3, 4, 5, 6]
    for step in store.steps:  # 4-6 were saved again after the resume: the same bits if it was exact
        _same_bits(store.load(step), load_file(out / f"full-{step}.safetensors"))
    assert store.verify().steps == [3, 4, 5, 6]
    info = store.info(6)
    assert info.changed_outside_mask == {"seen": 3}  # the buffer, stored by one rank only
    record = json.loads((out / "train.rank0.json").read_text())
    assert record["resumed"] == 3


def test_a_resumed_sharded_run_ends_bit_for_bit_where_the_uninterrupted_one_did(
    trained: tuple[int, Path, Path],
) -> None:
    _, out, store_path = trained
    straight = load_file(out / "full-6.safetensors")
    _same_bits(load_file(out / "resumed.safetensors"), straight)
    _same_bits(CheckpointStore.open(store_path).load(6), straight)


def test_each_rank_writes_its_own_part_of_k_over_world_values(trained: tuple[int, Path, Path]) -> None:
    world, _, store_path = trained
    files = sorted(path.name for path in (store_path / "steps").iterdir())
    parts = [name for name in files if part_step_of(name) == 6]
    assert len(parts) == world
    assert {re.search(r"part-(\d+)-of-(\d+)", name).groups() for name in parts} == {  # type: ignore[union-attr]
        (f"{rank:05d}", f"{world:05d}") for rank in range(world)
    }
    # No part of a step that was saved again (4-6) or pruned (1-2) is left behind.
    assert {part_step_of(name) for name in files if part_step_of(name) is not None} == {3, 4, 5, 6}
    assert len([name for name in files if part_step_of(name) is not None]) == 4 * world


def test_load_into_a_sharded_model_switches_steps_in_place(trained: tuple[int, Path, Path]) -> None:
    _, out, store_path = trained
    store = CheckpointStore.open(store_path)
    switched = _split(load_file(out / "switched.safetensors"))
    for step in ("4", "5", "6"):
        _same_bits(switched[step], store.load(int(step)))
    record = json.loads((out / "train.rank0.json").read_text())
    assert record["write_full_calls"] == 1, "only the first load rewrote the shards; the switches were O(k)"


@pytest.mark.parametrize(("saved_by", "loaded_by"), [(2, 3), (3, 2)])
def test_a_step_saved_by_one_number_of_ranks_loads_on_another(
    saved_by: int, loaded_by: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    out = tmp_path_factory.mktemp(f"reshard{saved_by}to{loaded_by}")
    _, _, store_path = _train_run(saved_by, tmp_path_factory)
    spawn("reshard", loaded_by, out, worker=WORKER, extra=(str(store_path),), timeout=240)
    store = CheckpointStore.open(store_path)
    loaded = _split(load_file(out / "resharded.safetensors"))
    assert sorted(map(int, loaded)) == store.steps
    for step, state in loaded.items():
        _same_bits(state, store.load(int(step)))
    records = [json.loads((out / f"reshard.rank{rank}.json").read_text()) for rank in range(loaded_by)]
    # This world's own sharding (torch.chunk's rule), not the one that saved: 5 rows over 3 ranks is 2+2+1.
    assert [r["local_rows"]["embed.weight"] for r in records] == _rows(5, loaded_by)
    for record in records:
        assert f"saved by {saved_by} ranks" in record["training_state"]


def _rows(rows: int, world: int) -> list[int]:
    chunk = -(-rows // world)
    return [max(0, min(rows, (rank + 1) * chunk) - rank * chunk) for rank in range(world)]


# Killed writers ----------------------------------------------------------------------------------------


def _start(suite: str, world: int, out: Path, store: Path) -> list[tuple[subprocess.Popen[str], Path]]:
    init = out / f"rendezvous-{suite}"
    ranks = []
    for rank in range(world):
        log = out / f"{suite}.rank{rank}.log"
        with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                [sys.executable, str(WORKER), suite, str(rank), str(world), str(init), str(out), str(store)],
                stdout=handle,
                stderr=subprocess.STDOUT,
                text=True,
                env={**_env(), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
            )
        ranks.append((proc, log))
    return ranks


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def _saves(log: Path) -> int:
    return log.read_text().count("saved ")


def _wait_for_saves(ranks: list[tuple[subprocess.Popen[str], Path]], count: int, *, deadline: float) -> None:
    while min(_saves(log) for _, log in ranks) < count:
        for proc, log in ranks:
            if proc.poll() is not None:
                raise AssertionError(f"a rank exited early:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("no saves before the deadline:\n" + ranks[0][1].read_text()[-3000:])
        time.sleep(0.05)


def _stop(ranks: list[tuple[subprocess.Popen[str], Path]]) -> None:
    for proc, _ in ranks:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    for proc, _ in ranks:
        proc.wait()


@pytest.mark.parametrize("seed", [0, *(pytest.param(seed, marks=pytest.mark.slow) for seed in range(1, 8))])
def test_a_rank_killed_at_a_random_instant_leaves_no_partial_step(seed: int, tmp_path: Path) -> None:
    world = 2
    rng = random.Random(seed)
    store_path = tmp_path / "store"
    ranks = _start("kill", world, tmp_path, store_path)
    _wait_for_saves(ranks, 2, deadline=time.monotonic() + 120)
    time.sleep(rng.uniform(0.0, 0.4))  # somewhere inside a save: its part, the gather, the step file
    victim = rng.randrange(world)
    ranks[victim][0].send_signal(signal.SIGKILL)
    time.sleep(1.0)  # the survivor may finish what it was doing, or wait on the dead rank
    _stop(ranks)

    store = CheckpointStore.open(store_path)
    steps = store.steps
    assert steps, "the saves before the kill are there"
    report = store.verify()  # every listed step is whole: all its parts, each proved
    assert report.steps == steps
    for step in steps:
        store.load(step)

    # One more sharded save by a fresh group of ranks removes what the killed save left.
    out = tmp_path / "again"
    out.mkdir()
    spawn("again", world, out, worker=WORKER, extra=(str(store_path),), timeout=120)
    reopened = CheckpointStore.open(store_path)
    assert reopened.steps == [*steps, 100_000]
    listed = {part for step in reopened.steps for part in reopened._reader.part_files(step)}
    on_disk = {name for name in (store_path / "steps").iterdir() if part_step_of(name.name) is not None}
    assert {path.name for path in on_disk} == listed
    assert not [path for path in (store_path / "steps").iterdir() if path.name.startswith(".")]


# DDP: one writer ---------------------------------------------------------------------------------------


def test_under_ddp_rank_zero_writes_and_every_rank_resumes_the_same_step(tmp_path: Path) -> None:
    world = 2
    spawn("ddp", world, tmp_path, worker=WORKER, extra=(str(tmp_path / "store"),), timeout=180)
    records = [json.loads((tmp_path / f"ddp.rank{rank}.json").read_text()) for rank in range(world)]
    assert records[1]["touched"] == [], "a rank other than 0 wrote to the store"
    assert records[0]["steps"] == [1, 2, 3, 4]
    results = [_split(load_file(tmp_path / f"ddp.rank{rank}.safetensors")) for rank in range(world)]
    for rank in range(1, world):
        _same_bits(results[rank]["straight"], results[0]["straight"])
        _same_bits(results[rank]["resumed"], results[0]["resumed"])
    # Resumed from step 2 (weights, SparseAdamW moments) on every rank, then steps 3-4 again: the same bits.
    _same_bits(results[0]["resumed"], results[0]["straight"])
    store = CheckpointStore.open(tmp_path / "store")
    _same_bits(
        {name: value for name, value in store.load(4).items() if name in results[0]["straight"]},
        results[0]["straight"],
    )


# Damaged sharded steps ----------------------------------------------------------------------------------


def _parts(store_path: Path, step: int) -> list[Path]:
    return sorted(path for path in (store_path / "steps").iterdir() if part_step_of(path.name) == step)


@pytest.mark.parametrize("damage", ["missing", "other step's part", "ranks swapped", "flipped byte", "truncated"])
def test_a_damaged_part_is_named_and_never_loaded(
    damage: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import shutil

    _, out, trained_store = _train_run(2, tmp_path_factory)
    store_path = tmp_path / "store"
    shutil.copytree(trained_store, store_path)
    parts = _parts(store_path, 5)
    victim = parts[1]
    if damage == "missing":
        victim.unlink()
    elif damage == "other step's part":  # a valid part of step 6, same rank, under step 5's part name
        victim.write_bytes(_parts(store_path, 6)[1].read_bytes())
    elif damage == "ranks swapped":
        first, second = parts[0].read_bytes(), parts[1].read_bytes()
        parts[0].write_bytes(second)
        victim.write_bytes(first)
    elif damage == "flipped byte":
        data = bytearray(victim.read_bytes())
        data[-3] ^= 0x04
        victim.write_bytes(bytes(data))
    else:
        victim.write_bytes(victim.read_bytes()[:-10])
    store = CheckpointStore.open(store_path)
    with pytest.raises(fishckpt.IntegrityError, match=re.escape(str(store_path / "steps"))):
        store.load(5)
    with pytest.raises(fishckpt.VerifyError) as caught:
        store.verify([4, 5, 6])
    step_file = store_path / "steps" / "step-000000000005.safetensors"
    assert [failure.file for failure in caught.value.failures] == [step_file]
    _same_bits(store.load(6), load_file(out / "full-6.safetensors"))  # the other steps are untouched


def test_parts_that_do_not_cover_the_tensors_are_refused() -> None:
    from fishckpt.store.shards import check_coverage

    numels = torch.tensor([5, 0, 3]).numpy()
    names = ["a", "empty", "b"]
    whole = ([0, 0, 0], [5, 0, 3])
    halves = [([0, 0, 0], [2, 0, 3]), ([2, 0, 3], [5, 0, 3])]
    import numpy as np

    def arrays(parts: list[tuple[list[int], list[int]]]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(np.array(a, dtype=np.int64), np.array(b, dtype=np.int64)) for a, b in parts]

    check_coverage(numels, names, arrays([whole]), where="x")
    check_coverage(numels, names, arrays(halves), where="x")
    for bad in (
        [([0, 0, 0], [2, 0, 3])],  # a hole in "a"
        [whole, ([0, 0, 0], [0, 0, 1])],  # "b"'s first entry twice
        [([0, 0, 0], [3, 0, 3]), ([2, 0, 0], [5, 0, 0])],  # an overlap inside "a"
        [([1, 0, 0], [5, 0, 3])],  # "a" does not start at 0
    ):
        with pytest.raises(fishckpt.IntegrityError, match="exactly once"):
            check_coverage(numels, names, arrays(bad), where="x")


def test_a_sharded_step_pruned_while_it_is_read_is_not_found_never_damaged(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step file is read first, then its parts: a prune in between must look like "not saved"."""
    import shutil

    from fishckpt.storage import LocalStorage

    _, out, trained_store = _train_run(2, tmp_path_factory)
    store_path = tmp_path / "store"
    shutil.copytree(trained_store, store_path)
    reader, pruner = CheckpointStore.open(store_path), CheckpointStore.open(store_path)
    original = LocalStorage.read
    pruned = []

    def read(self: LocalStorage, name: str) -> bytes:
        if part_step_of(name.rpartition("/")[2]) == 5 and not pruned:
            pruned.append(name)
            pruner.delete(5)  # step file first, then its parts
        return original(self, name)

    monkeypatch.setattr(LocalStorage, "read", read)
    with pytest.raises(fishckpt.StepNotFoundError, match="step 5 is not in the store"):
        reader.load(5)
    assert pruned and 5 not in reader.steps
    assert not _parts(store_path, 5)
    _same_bits(reader.load(6), load_file(out / "full-6.safetensors"))


def test_a_failure_on_one_rank_is_raised_on_every_rank_and_writes_nothing(trained: tuple[int, Path, Path]) -> None:
    world, out, store_path = trained
    for rank in range(world):
        record = json.loads((out / f"train.rank{rank}.json").read_text())
        assert record["strict"].startswith(f"rank {world - 1}: step 99 not saved: entries outside the mask changed")
        assert "embed.bias (1 entries)" in record["strict"]
        assert 99 not in record["steps"]
    assert not _parts(store_path, 99)
