"""Never wrong weights, nothing lost: each hole the hostile run found, with the test that failed on the old code."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from _cli_support import flip_byte, safetensors_offset
from conftest import assert_bits_equal, assert_state_bits_equal

from fishckpt import (
    BaseMismatchError,
    CheckpointStore,
    FormatError,
    IntegrityError,
    Mask,
    OutsideMaskWarning,
    StateMismatchError,
    StoreReplacedError,
    VerifyError,
    save_state_file,
)


def _model_state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 16, generator=generator), "b": torch.randn(16, generator=generator)}


MASK = Mask.from_indices({"w": [0, 3, 100, 513, 1000], "b": [2]}, {"w": (64, 16), "b": (16,)})


def _moved(base: dict[str, torch.Tensor], by: float) -> dict[str, torch.Tensor]:
    state = {name: tensor.clone() for name, tensor in base.items()}
    for name in MASK:
        state[name].view(-1)[MASK[name]] += by
    return state


def _quiet_save(store: CheckpointStore, state: dict[str, torch.Tensor], step: int, **kwargs: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutsideMaskWarning)
        store.save(state, step, **kwargs)


# 1. Wrong weights: an O(k) switch after a re-save ------------------------------------------------------


def test_switch_undoes_what_it_wrote_even_after_the_step_was_saved_again(tmp_path: Path) -> None:
    base = _model_state()
    store = CheckpointStore.create(tmp_path / "s", base, MASK)
    a = _moved(base, 1.0)
    a["w"].view(-1)[5] = 123.0  # outside the mask
    b = _moved(base, 2.0)
    _quiet_save(store, a, 1)
    _quiet_save(store, b, 2)
    model = {name: torch.zeros_like(tensor) for name, tensor in base.items()}
    store.load_into(model, 1)
    assert model["w"].view(-1)[5].item() == 123.0
    other = CheckpointStore.open(tmp_path / "s")  # another store object re-saves step 1, without the change
    _quiet_save(other, _moved(base, 1.0), 1, overwrite=True)
    store.load_into(model, 2, verify=True)
    assert_state_bits_equal(model, store.load(2))
    assert_state_bits_equal(model, b)


def test_load_registers_what_it_returns_for_an_o_k_switch(tmp_path: Path) -> None:
    base = _model_state()
    store = CheckpointStore.create(tmp_path / "s", base, MASK)
    _quiet_save(store, _moved(base, 1.0), 1)
    _quiet_save(store, _moved(base, 2.0), 2)
    state = store.load(1)
    # A sentinel written behind PyTorch's back survives only if the switch touches the masked entries alone.
    state["w"].data.view(-1)[7] = 9.0
    store.load_into(state, 2)
    assert state["w"].view(-1)[7].item() == 9.0
    state["w"].data.view(-1)[7] = base["w"].view(-1)[7]
    assert_state_bits_equal(state, _moved(base, 2.0))


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("held", [False, True], ids=["full-write", "o-k-switch"])
def test_a_target_whose_keys_share_memory_unlike_the_saved_state_is_refused(
    tmp_path: Path, verify: bool, held: bool
) -> None:
    # Writing "w" changes "b": no write leaves both right. Before, a verified load found its own
    # copy of the base changed underneath and told the user to restore a healthy base file, and an
    # unverified one returned "b"'s values in "w" without a word.
    base = {"w": torch.zeros(16), "b": torch.ones(16)}
    mask = Mask.from_indices({"w": [1, 7], "b": [2]}, {"w": (16,), "b": (16,)})
    store = CheckpointStore.create(tmp_path / "s", base, mask)
    for step in (1, 2):
        moved = {name: tensor.clone() for name, tensor in base.items()}
        moved["w"][1], moved["b"][2] = float(step), -float(step)
        store.save(moved, step)
    buffer = torch.full((24,), 5.0)
    target = {"w": buffer[:16], "b": buffer[8:]}
    if held:  # the switch's path: as if both were written by a load of step 1
        store._residency.remember([target["b"], target["w"]], store._reader.decode(1))
    with pytest.raises(StateMismatchError, match="keys 'w' and 'b' of the target share memory, and the step"):
        store.load_into(target, 2, verify=verify)
    columns = torch.zeros(16, 2)  # interleaved views of one buffer without a common byte: fine
    target = {"w": columns[:, 0], "b": columns[:, 1]}
    store.load_into(target, 2, verify=verify)
    assert_state_bits_equal({name: tensor.contiguous() for name, tensor in target.items()}, store.load(2))


@pytest.mark.parametrize("verify", [True, False])
def test_a_model_whose_tensors_overlap_as_they_did_at_save_loads(tmp_path: Path, verify: bool) -> None:
    # A buffer that is a view of part of a weight: the base stores both, their bytes agree where they meet.
    def model_state(storage: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight": storage[:12], "window": storage[8:20], "bias": torch.zeros(3)}

    storage = torch.arange(20, dtype=torch.float32)
    store = CheckpointStore.create(
        tmp_path / "s", model_state(storage), Mask.from_indices({"weight": [9]}, {"weight": (12,)})
    )
    storage[9] = -9.0  # the masked entry, seen by "window" too (outside its mask: recorded as its change)
    _quiet_save(store, model_state(storage), 1)
    expected = {name: tensor.clone() for name, tensor in model_state(storage).items()}
    fresh = torch.zeros(20)
    target = model_state(fresh)
    store.load_into(target, 1, verify=verify)
    assert_state_bits_equal(target, expected)
    assert fresh[9].item() == -9.0 and fresh[19].item() == 19.0


# 2. Wrong weights: a step file from another store with the same base and mask ---------------------------


def test_a_step_file_from_another_store_with_the_same_base_and_mask_is_refused(tmp_path: Path) -> None:
    base = _model_state()
    run_a = CheckpointStore.create(tmp_path / "run-a", base, MASK)  # two runs of a sweep: same base, same mask
    run_b = CheckpointStore.create(tmp_path / "run-b", base, MASK)
    assert run_a.base_digest == run_b.base_digest and run_a.store_id != run_b.store_id
    _quiet_save(run_a, _moved(base, 1.0), 5)
    Path(run_b.step_path(5)).write_bytes(Path(run_a.step_path(5)).read_bytes())
    with pytest.raises(BaseMismatchError, match=f"store id {run_a.store_id}.*this store's id is {run_b.store_id}"):
        run_b.load(5)
    with pytest.raises(VerifyError, match="belongs to another store"):
        run_b.verify()
    with pytest.raises(BaseMismatchError):
        run_b.info(5)


def test_a_step_renamed_to_another_step_number_is_refused(tmp_path: Path) -> None:
    base = _model_state()
    store = CheckpointStore.create(tmp_path / "s", base, MASK)
    _quiet_save(store, _moved(base, 1.0), 5)
    os.rename(store.step_path(5), store.step_path(6))
    with pytest.raises(FormatError, match="holds step 5, not step 6"):
        store.load(6)


# 3. Data lost: a fast-path save over a damaged base --------------------------------------------------------


def _flip_base_at_masked_entry(store: CheckpointStore) -> Path:
    base_file = Path(store.files()["base"])
    masked = int(MASK["w"][2])  # w[100]
    flip_byte(base_file, safetensors_offset(base_file, "w") + 4 * masked + 1)
    return base_file


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "exact"])
def test_a_save_over_a_damaged_base_is_refused_and_writes_nothing(tmp_path: Path, fast: bool) -> None:
    base = _model_state()
    store = CheckpointStore.create(tmp_path / "s", base, MASK)
    _quiet_save(store, _moved(base, 1.0), 10)
    original = Path(store.files()["base"]).read_bytes()
    base_file = _flip_base_at_masked_entry(store)
    fresh = CheckpointStore.open(tmp_path / "s")
    with pytest.raises(IntegrityError, match=f"{base_file}: the base file is corrupted"):
        fresh.save(_moved(base, 2.0), 30, check_outside_mask=not fast)
    assert fresh.steps == [10]
    base_file.write_bytes(original)  # repaired from a copy: everything restores
    repaired = CheckpointStore.open(tmp_path / "s")
    repaired.verify()
    assert_state_bits_equal(repaired.load(10), _moved(base, 1.0))


# 4. Data lost: init --force while another process saves ----------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys, torch, warnings
    from fishckpt import CheckpointStore, StoreReplacedError
    warnings.simplefilter("ignore")
    store = CheckpointStore.open(sys.argv[1])
    state = {"w": torch.zeros(64, 16), "b": torch.zeros(16)}
    step = 0
    try:
        while step < 100000:
            step += 1
            state["w"].view(-1)[0] = float(step)
            store.save(state, step, check_outside_mask=False)
            if step == 5:
                print("saving", flush=True)
    except StoreReplacedError as error:
        print("replaced", step, flush=True)
        sys.exit(0)
    print("never noticed", flush=True)
    """
)


def test_replacing_a_store_makes_its_writers_fail_and_nothing_lands_in_the_new_one(tmp_path: Path) -> None:
    path = tmp_path / "fr"
    CheckpointStore.create(path, {"w": torch.zeros(64, 16), "b": torch.zeros(16)}, MASK)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "saving\n"
        new = CheckpointStore.create(path, _model_state(1), MASK, overwrite=True)
        out, _ = writer.communicate(timeout=120)
    finally:
        writer.kill()
    assert out.startswith("replaced"), out
    reopened = CheckpointStore.open(path)
    assert reopened.store_id == new.store_id
    assert reopened.steps == []  # no save of the old store's writer landed here
    reopened.verify()


def test_a_replaced_store_object_refuses_to_save(tmp_path: Path) -> None:
    path = tmp_path / "fr"
    old = CheckpointStore.create(path, _model_state(), MASK)
    CheckpointStore.create(path, _model_state(1), MASK, overwrite=True)
    with pytest.raises(StoreReplacedError, match="the store was replaced since it was opened"):
        old.save(_model_state(), 1, check_outside_mask=False)
    with pytest.raises(StoreReplacedError):
        old.delete(1)
    assert CheckpointStore.open(path).steps == []


# 5. Wrong blame: a damaged base is the base's fault ----------------------------------------------------------


def test_a_damaged_base_is_blamed_and_the_steps_are_not(tmp_path: Path) -> None:
    base = _model_state()
    store = CheckpointStore.create(tmp_path / "s", base, MASK)
    for step in (10, 20):
        _quiet_save(store, _moved(base, step / 10), step)
    base_file = _flip_base_at_masked_entry(store)
    fresh = CheckpointStore.open(tmp_path / "s")
    with pytest.raises(IntegrityError, match=f"^{base_file}: the base file is corrupted") as raised:
        fresh.load(10)
    assert "step" not in str(raised.value).split(":")[0]
    for steps in (None, 10):
        with pytest.raises(VerifyError) as failed:
            CheckpointStore.open(tmp_path / "s").verify(steps)
        assert [str(failure.file) for failure in failed.value.failures] == [str(base_file)]
        assert failed.value.report.base_ok is False


def test_a_damaged_base_is_blamed_in_a_format_1_store_too(tmp_path: Path) -> None:
    import shutil

    golden = Path(__file__).parent / "data" / "store_v1"
    shutil.copytree(golden, tmp_path / "v1")
    base_file = tmp_path / "v1" / "base.safetensors"
    flip_byte(base_file, safetensors_offset(base_file, "layer.weight") + 4 * 3)  # a masked entry
    store = CheckpointStore.open(tmp_path / "v1")
    with pytest.raises(IntegrityError, match=f"^{base_file}: the base file is corrupted"):
        store.load(1)
    with pytest.raises(VerifyError) as failed:
        CheckpointStore.open(tmp_path / "v1").verify(1)
    assert [str(failure.file) for failure in failed.value.failures] == [str(base_file)]


# 6. One bad step hides the rest -----------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["corrupted", "folder", "dangling-link"])
def test_a_damaged_step_is_reported_and_the_others_still_listed(tmp_path: Path, damage: str) -> None:
    base = _model_state()
    store = CheckpointStore.create(tmp_path / "s", base, MASK)
    for step in (10, 20, 30):
        _quiet_save(store, _moved(base, step / 10), step)
    victim = Path(store.step_path(20))
    if damage == "corrupted":
        flip_byte(victim, victim.stat().st_size // 2)
    else:
        victim.unlink()
        if damage == "folder":
            victim.mkdir()
        else:
            victim.symlink_to(tmp_path / "nowhere")
    report = CheckpointStore.open(tmp_path / "s").report()
    assert [info.step for info in report.steps] == [10, 30]
    assert list(report.problems) == [20]
    assert str(victim) in report.problems[20]
    with pytest.raises(IntegrityError, match=f"{victim}"):
        store.load(20)


# 7. Verify and report during a prune ---------------------------------------------------------------------


def test_a_step_pruned_while_verify_runs_is_gone_not_corrupt(tmp_path: Path) -> None:
    base = _model_state()
    store = CheckpointStore.create(tmp_path / "s", base, MASK)
    for step in range(1, 6):
        _quiet_save(store, _moved(base, step), step)
    pruner = CheckpointStore.open(tmp_path / "s")

    def prune_while_verifying(steps: list[int]):
        for step in steps:
            if step == 2:
                pruner.delete(3)  # another process prunes step 3 just before verify reaches it
            yield step

    report = store.verify(progress=prune_while_verifying)
    assert report.gone == [3] and report.steps == [1, 2, 4, 5]
    summary = store.report(steps=iter([1, 2, 3, 4]))
    assert [info.step for info in summary.steps] == [1, 2, 4] and summary.problems == {}


PRUNER = textwrap.dedent(
    """
    import sys, torch
    from fishckpt import CheckpointStore
    store = CheckpointStore.open(sys.argv[1])
    for step in list(store.steps)[:-1]:
        store.delete(step)
    print("done", flush=True)
    """
)


def test_verify_racing_a_real_prune_never_reports_corruption(tmp_path: Path) -> None:
    base = _model_state()
    store = CheckpointStore.create(tmp_path / "s", base, MASK)
    for step in range(1, 41):
        _quiet_save(store, _moved(base, step), step)
    pruner = subprocess.Popen([sys.executable, "-c", PRUNER, str(tmp_path / "s")], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while pruner.poll() is None and time.monotonic() < deadline:
            reader = CheckpointStore.open(tmp_path / "s")
            reader.verify(base=False)  # raises VerifyError on any failure; steps that vanish are only "gone"
            reader.report()
    finally:
        pruner.wait(timeout=60)
    assert CheckpointStore.open(tmp_path / "s").steps == [40]


# 8. Keys the base file cannot hold -----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["__metadata__", 7], ids=["metadata-key", "int-key"])
def test_keys_a_base_file_cannot_hold_are_refused_at_create(tmp_path: Path, key: object) -> None:
    state = {"w": torch.zeros(3), key: torch.zeros(2)}
    mask = Mask.from_indices({"w": [0]}, {"w": (3,)})
    with pytest.raises(StateMismatchError, match=f"the base has key\\(s\\) a store cannot hold: \\[{key!r}\\]"):
        CheckpointStore.create(tmp_path / "s", state, mask)  # type: ignore[arg-type]
    assert not (tmp_path / "s").exists()
    with pytest.raises(FormatError, match="cannot be stored in a safetensors file"):
        save_state_file(tmp_path / "f.safetensors", state)  # type: ignore[arg-type]
    assert not (tmp_path / "f.safetensors").exists()


# 10. NaN in metadata ----------------------------------------------------------------------------------------


def test_non_finite_metadata_is_stored(tmp_path: Path) -> None:
    base = _model_state()
    store = CheckpointStore.create(tmp_path / "s", base, MASK)
    metadata = {"loss": float("nan"), "grad_norm": float("inf"), "low": -math.inf, "pair": (1, 2), "$odd": 1}
    store.save(_moved(base, 1.0), 1, metadata=metadata)
    saved = store.info(1).metadata
    assert math.isnan(saved["loss"]) and saved["grad_norm"] == math.inf and saved["low"] == -math.inf
    assert saved["pair"] == (1, 2) and saved["$odd"] == 1


# 11. SIGKILL during init --------------------------------------------------------------------------------------

CREATOR = textwrap.dedent(
    """
    import sys, torch
    from fishckpt import CheckpointStore, Mask
    state = {f"t{i}": torch.zeros(1 << 20) for i in range(64)}  # 256 MiB: slow enough to be killed mid-way
    CheckpointStore.create(sys.argv[1], state, Mask.from_indices({}, {}))
    """
)


def test_a_create_killed_midway_leaves_no_store_and_the_next_create_cleans_up(tmp_path: Path) -> None:
    path = tmp_path / "store"
    creator = subprocess.Popen([sys.executable, "-c", CREATOR, str(path)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir()):
        time.sleep(0.01)
    time.sleep(0.2)
    creator.send_signal(signal.SIGKILL)
    creator.wait()
    assert not CheckpointStore.is_store(path)
    assert any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())  # the partial base
    CheckpointStore.create(path, _model_state(), MASK)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_init_in_an_existing_empty_folder_and_after_a_killed_init_there(tmp_path: Path) -> None:
    folder = tmp_path / "here"
    folder.mkdir()
    (folder / "base.safetensors").write_bytes(b"partial")  # what an interrupted create could leave
    (folder / "steps").mkdir()
    store = CheckpointStore.create(folder, _model_state(), MASK)
    assert store.steps == []
    assert sorted(p.name for p in folder.iterdir()) == [
        "base.safetensors",
        "manifest.safetensors",
        "mask.safetensors",
        "steps",
    ]


# 12. Disk full and read-only folders name the store and the step ---------------------------------------------


def test_a_full_disk_names_the_store_and_the_step_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    base = _model_state()
    store = CheckpointStore.create(tmp_path / "s", base, MASK)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("fishckpt.storage.local.os.fsync", full)
    with pytest.raises(OSError) as raised:
        store.save(_moved(base, 1.0), 7)
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(store.step_path(7))
    assert f"saving step 7 of {tmp_path / 's'}" in str(raised.value)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "s" / "steps").iterdir()) == []


def test_a_refused_write_names_the_step_file_not_the_temp_file(tmp_path: Path, monkeypatch) -> None:
    base = _model_state()
    store = CheckpointStore.create(tmp_path / "s", base, MASK)
    real_open = open

    def refusing(file, mode="r", *args, **kwargs):  # what a read-only folder does, even to root
        if "x" in mode and ".tmp-" in str(file):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing)
    with pytest.raises(PermissionError) as raised:
        store.save(_moved(base, 1.0), 7)
    assert raised.value.filename == str(store.step_path(7))


# 14. Scale in the number of tensors: bytes ------------------------------------------------------------------


def test_step_size_does_not_grow_with_the_number_of_tensors(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    flat = torch.randn(2000 * 16, generator=generator) * 0.02
    chosen = torch.rand(flat.numel(), generator=generator) < 0.05
    moves = torch.randn(flat.numel(), generator=generator) * 1e-3
    one = {"w": flat.clone()}
    many = {f"experts.{i}.w": flat[16 * i : 16 * (i + 1)].clone() for i in range(2000)}
    mask_one = Mask.from_bool({"w": chosen})
    mask_many = Mask.from_bool({name: chosen[16 * i : 16 * (i + 1)] for i, name in enumerate(many)})
    sizes = {}
    for label, state, mask in (("one", one, mask_one), ("many", many, mask_many)):
        store = CheckpointStore.create(tmp_path / label, state, mask)
        moved = {name: tensor.clone() for name, tensor in state.items()}
        offset = 0
        for tensor in moved.values():
            numel = tensor.numel()
            part = chosen[offset : offset + numel]
            tensor[part] += moves[offset : offset + numel][part]
            offset += numel
        sizes[label] = store.save(moved, 1).bytes_per_masked_value
    assert sizes["many"] <= 1.10 * sizes["one"], sizes


# Small things ---------------------------------------------------------------------------------------------------


def test_the_outside_mask_warning_stays_short_on_a_big_model(tmp_path: Path) -> None:
    state = {f"layer.{i}.weight": torch.zeros(50) for i in range(300)}
    mask = Mask.from_indices({"layer.0.weight": [0]}, {"layer.0.weight": (50,)})
    store = CheckpointStore.create(tmp_path / "s", state, mask)
    moved = {name: tensor.clone() for name, tensor in state.items()}
    for i in range(2, 300, 2):
        moved[f"layer.{i}.weight"][7] = 1.0  # 149 tensors with one change each
    moved["layer.4.weight"][:] = 2.0
    moved["layer.6.weight"][:25] = 3.0
    with pytest.warns(OutsideMaskWarning) as caught:
        info = store.save(moved, 1)
    message = str(caught[0].message)
    assert len(message) < 400, message
    assert (
        "222 entries in 149 tensors, most in layer.4.weight (50), layer.6.weight (25), layer.10.weight (1)" in message
    )
    assert "and 146 more" in message
    assert len(info.changed_outside_mask) == 149  # the full list stays in SaveInfo


def test_training_state_is_counted_apart_from_the_model(tmp_path: Path) -> None:
    base = _model_state()
    store = CheckpointStore.create(tmp_path / "s", base, MASK)
    parameter = torch.nn.Parameter(torch.zeros(4096))
    optimizer = torch.optim.Adam([parameter], lr=0.1)
    parameter.grad = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    optimizer.step()
    plain = store.save(_moved(base, 1.0), 1)
    with_state = store.save(_moved(base, 1.0), 2, optimizer=optimizer, rng=True)
    assert with_state.training_state_bytes > 4096 * 4  # two moments of 4096 fp32 values, mostly incompressible
    assert store.info(2).training_state_bytes == with_state.training_state_bytes
    # What remains is the header entries of the training sections (a few hundred bytes each, whatever the
    # optimizer's size): the optimizer's own JSON tree is a section, counted as training state.
    assert abs((with_state.bytes_written - with_state.training_state_bytes) - plain.bytes_written) < 2048


def test_a_tied_alias_must_stay_tied_and_typed(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    store = CheckpointStore.create(tmp_path / "s", model, Mask.from_indices({"0.weight": [1]}, {"0.weight": (10, 4)}))
    state = dict(model.state_dict())
    state["1.weight"] = state["1.weight"].double()
    with pytest.raises(StateMismatchError, match="key '1.weight'"):
        store.save(state, 1)


def test_metadata_in_json_output_survives_nan(tmp_path: Path) -> None:
    from _cli_support import run

    base = _model_state()
    store = CheckpointStore.create(tmp_path / "s", base, MASK)
    store.save(_moved(base, 1.0), 1, metadata={"loss": float("nan")})
    document = json.loads(run("ls", tmp_path / "s", "--json").stdout)
    assert document["checkpoints"][0]["metadata"] == {"loss": "nan"}


def test_bits_of_a_bool_mask(tmp_path: Path) -> None:
    mask = Mask.from_indices({"w": [1, 3]}, {"w": (2, 2)})
    as_bool = mask.to_bool()["w"]
    assert as_bool.dtype == torch.bool
    assert_bits_equal(as_bool, torch.tensor([[False, True], [False, True]]))
