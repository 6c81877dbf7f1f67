"""Bit-exact round trips through CheckpointStore, for every dtype, shape and kind of change."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from _states import DTYPES, changed, random_tensor, states_and_masks
from conftest import assert_bits_equal, assert_state_bits_equal, bits
from hypothesis import HealthCheck, given, settings

from fishckpt import CheckpointStore, Mask, OutsideMaskWarning

ROUND_TRIP = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _save_quietly(store: CheckpointStore, state: dict[str, torch.Tensor], step: int, **kwargs: object):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutsideMaskWarning)
        return store.save(state, step, **kwargs)


@ROUND_TRIP
@given(states_and_masks())
def test_round_trip_random_states(new_location, scan_path: str, case) -> None:
    base, mask, seed = case
    # 64-byte chunks put many chunk boundaries inside even these small tensors.
    location = new_location()
    store = CheckpointStore.create(location, base, mask, chunk_bytes=64)
    first = changed(base, mask, seed, inside=0.7, outside=0.0)
    second = changed(base, mask, seed + 7, inside=0.5, outside=0.2)
    info = _save_quietly(store, first, 1)
    assert info.changed_outside_mask == {}
    _save_quietly(store, second, 2)
    reopened = CheckpointStore.open(location)
    assert_state_bits_equal(reopened.load(2), second)
    assert_state_bits_equal(reopened.load(1), first)
    assert_state_bits_equal(reopened.load(1, verify=False), first)
    reopened.verify()
    # load_into: a full write first, then O(k) switches back and forth
    target = {name: torch.empty_like(t) for name, t in base.items()}  # some dtypes cannot be filled
    for step, expected in [(1, first), (2, second), (1, first), (2, second)]:
        reopened.load_into(target, step)
        assert_state_bits_equal(target, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_with_changes_inside_and_outside(new_location, scan_path: str, dtype: torch.dtype) -> None:
    location = new_location()
    generator = torch.Generator().manual_seed(0)
    base = {
        "w": random_tensor(dtype, (40, 30), generator),
        "scalar": random_tensor(dtype, (), generator),
        "empty": random_tensor(dtype, (0, 3), generator),
    }
    mask = Mask.from_indices({"w": range(0, 1200, 7)}, {"w": (40, 30), "scalar": (), "empty": (0, 3)})
    store = CheckpointStore.create(location, base, mask, chunk_bytes=256)
    state = changed(base, mask, 3, inside=1.0, outside=0.05)
    state["scalar"] = random_tensor(dtype, (), torch.Generator().manual_seed(9))
    _save_quietly(store, state, 5)
    assert_state_bits_equal(store.load(5), state)


def test_nan_payloads_and_negative_zero_survive(new_location) -> None:
    location = new_location()
    base = {"w": torch.zeros(8)}
    mask = Mask.from_indices({"w": [0, 1, 2]}, {"w": (8,)})
    store = CheckpointStore.create(location, base, mask)
    state = {"w": torch.zeros(8)}
    payloads = torch.tensor([0x7FC00001, 0xFFC12345, 0x80000000, 0x7F800001], dtype=torch.int64).to(torch.int32)
    state["w"].view(torch.int32)[[0, 1, 2, 5]] = payloads  # 5 is outside the mask
    _save_quietly(store, state, 1)
    loaded = store.load(1)
    assert loaded["w"].view(torch.int32).tolist() == state["w"].view(torch.int32).tolist()


def test_non_contiguous_and_strided_states(new_location) -> None:
    location = new_location()
    base = {"w": torch.arange(48, dtype=torch.float32).reshape(6, 8), "v": torch.arange(10, dtype=torch.float64)}
    mask = Mask.from_indices({"w": [1, 9, 40]}, {"w": (6, 8)})
    store = CheckpointStore.create(location, {"w": base["w"].t().contiguous().t(), "v": base["v"]}, mask)
    transposed = torch.arange(48, dtype=torch.float32).reshape(8, 6).t()  # logical (6, 8), strided
    transposed_copy = transposed.contiguous()
    state = {"w": transposed, "v": torch.arange(20, dtype=torch.float64)[::2]}
    _save_quietly(store, state, 1)
    loaded = store.load(1)
    assert_bits_equal(loaded["w"], transposed_copy)
    assert_bits_equal(loaded["v"], state["v"].contiguous())
    assert loaded["w"].is_contiguous()


@pytest.mark.parametrize("check", [True, False], ids=["exact", "fast"])
def test_conjugate_and_negative_views_are_saved_as_their_values(new_location, check: bool) -> None:
    location = new_location()
    generator = torch.Generator().manual_seed(0)
    base = {"c": torch.randn(10, dtype=torch.complex64, generator=generator), "r": torch.randn(10, generator=generator)}
    mask = Mask.from_indices({"c": [1, 2], "r": [3]}, {"c": (10,), "r": (10,)})
    store = CheckpointStore.create(location, base, mask)
    moved = base["c"].clone()
    moved[[1, 2]] = torch.tensor([1 + 2j, -3 + 4j])
    # Equal in value to `moved` and to the base with r[3] = 7, held as a conj-bit and a neg-bit view.
    state = {
        "c": moved.conj_physical().conj(),
        "r": torch.complex(torch.zeros(10), -base["r"]).conj().imag,
    }
    state["r"][3] = 7.0
    assert state["c"].is_conj() and state["r"].is_neg()
    expected_r = base["r"].clone()
    expected_r[3] = 7.0
    expected = {"c": moved, "r": expected_r}
    _save_quietly(store, state, 1, check_outside_mask=check)
    assert_state_bits_equal(store.load(1), expected)


def test_tied_weights_restore_tied(new_location) -> None:
    location = new_location()
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied, as in language models
    mask = Mask.from_indices({"0.weight": [0, 5, 17]}, {"0.weight": (10, 4)})
    store = CheckpointStore.create(location, model, mask)
    with torch.no_grad():
        model[0].weight.view(-1)[[0, 5, 17]] += 1.0
    store.save(model, 1)
    loaded = store.load(1)
    assert loaded["1.weight"] is loaded["0.weight"]
    assert_bits_equal(loaded["0.weight"], model[0].weight)
    fresh = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    fresh[1].weight = fresh[0].weight
    store.load_into(fresh, 1)
    assert fresh[1].weight is fresh[0].weight
    assert_bits_equal(fresh[0].weight, model[0].weight)


def test_load_keeps_the_base_key_order_across_dtypes_and_tied_keys(new_location) -> None:
    # The mask table groups tensors by element width (int8 rows before fp64 ones) and stores a
    # tied key once, so the rows come in another order than the keys: load must restore it.
    shared = torch.arange(6, dtype=torch.float32)
    base = {
        "z.double": torch.arange(4, dtype=torch.float64),
        "m.tied": shared,
        "a.byte": torch.arange(5, dtype=torch.uint8),
        "k.half": torch.arange(3, dtype=torch.float16),
        "b.tied_again": shared,
        "c.long": torch.arange(2, dtype=torch.int64),
    }
    mask = Mask.from_indices({"m.tied": [1], "a.byte": [0, 4]}, {"m.tied": (6,), "a.byte": (5,)})
    store = CheckpointStore.create(new_location(), base, mask)
    moved = {name: tensor.clone() for name, tensor in base.items()}
    moved["b.tied_again"] = moved["m.tied"]
    moved["m.tied"][1] = -1.0
    moved["a.byte"][4] = 200
    store.save(moved, 1)
    loaded = store.load(1)
    assert list(loaded) == list(base)
    assert loaded["b.tied_again"] is loaded["m.tied"]
    assert_state_bits_equal(loaded, moved)


def test_module_state_and_load_into_module(new_location) -> None:
    location = new_location()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))
    mask = Mask.from_indices({"0.weight": [0, 7, 29], "2.bias": [1]}, {"0.weight": (5, 6), "2.bias": (2,)})
    store = CheckpointStore.create(location, model, mask)
    model.train()
    model(torch.randn(16, 6))  # moves BatchNorm running stats: outside the mask
    with torch.no_grad():
        model[0].weight.view(-1)[[0, 7]] -= 0.5
    with pytest.warns(OutsideMaskWarning, match=r"11 entries in 3 tensors, most in 1\.running_mean \(5\)"):
        info = store.save(model, 3)
    assert info.changed_outside_mask == {"1.running_mean": 5, "1.running_var": 5, "1.num_batches_tracked": 1}
    other = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))
    store.load_into(other, 3)
    assert_state_bits_equal(dict(other.state_dict()), dict(model.state_dict()))


def test_switch_touches_only_changed_entries(new_location) -> None:
    location = new_location()
    base = {"w": torch.zeros(1000), "b": torch.zeros(10)}
    mask = Mask.from_indices({"w": [3, 500]}, {"w": (1000,)})
    store = CheckpointStore.create(location, base, mask)
    one = {"w": torch.zeros(1000), "b": torch.zeros(10)}
    one["w"][[3, 500]] = 1.0
    one["b"][4] = 2.0  # outside the mask: must be undone when switching to step 2
    two = {"w": torch.zeros(1000), "b": torch.zeros(10)}
    two["w"][3] = 5.0
    _save_quietly(store, one, 1)
    _save_quietly(store, two, 2)
    target = {"w": torch.zeros(1000), "b": torch.zeros(10)}
    store.load_into(target, 1)
    assert_state_bits_equal(target, one)
    # ``.data`` writes bypass the version counter, so the store cannot see this sentinel.
    # It survives the switch only if the switch touches just the entries the two steps set.
    target["w"].data[7] = 9.0
    store.load_into(target, 2)
    assert target["w"][7].item() == 9.0
    target["w"].data[7] = 0.0
    assert_state_bits_equal(target, two)  # step 1's change outside the mask (b[4]) was undone
    # An ordinary in-place write bumps the version counter: the next load rewrites everything.
    target["w"][7] = 9.0
    store.load_into(target, 1)
    assert_state_bits_equal(target, one)


def test_deleting_a_step_breaks_no_other(new_location) -> None:
    location = new_location()
    base = {"w": torch.zeros(100)}
    mask = Mask.from_indices({"w": range(0, 100, 3)}, {"w": (100,)})
    store = CheckpointStore.create(location, base, mask)
    states = {}
    for step in (10, 20, 30):
        state = {"w": torch.zeros(100)}
        state["w"][mask["w"]] = float(step)
        store.save(state, step)
        states[step] = state
    store.delete(20)
    assert store.steps == [10, 30]
    reopened = CheckpointStore.open(location)
    for step in (10, 30):
        assert_state_bits_equal(reopened.load(step), states[step])
    reopened.verify()


def test_load_to_device_argument(new_location) -> None:
    location = new_location()
    base = {"w": torch.ones(4)}
    store = CheckpointStore.create(location, base, Mask.from_indices({"w": [1]}, {"w": (4,)}))
    store.save({"w": torch.tensor([1.0, 2.0, 1.0, 1.0])}, 0)
    loaded = store.load(0, device="cpu")
    assert torch.equal(bits(loaded["w"]), bits(torch.tensor([1.0, 2.0, 1.0, 1.0])))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_round_trip(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(300, 300, generator=generator), "b": torch.randn(300, generator=generator)}
    mask = Mask.from_indices({"w": torch.randperm(90000, generator=generator)[:900]}, {"w": (300, 300)})
    store = CheckpointStore.create(tmp_path / "store", {k: v.cuda() for k, v in base.items()}, mask)
    state = {k: v.clone().cuda() for k, v in base.items()}
    state["w"].view(-1)[mask["w"].cuda()] += 0.25
    state["b"][3] = 7.0
    for check in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OutsideMaskWarning)
            store.save(state, 1, overwrite=True, check_outside_mask=check)
        loaded = store.load(1, device="cuda")
        assert loaded["w"].device.type == "cuda"
        assert_bits_equal(loaded["w"], state["w"])
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    store.save(base, 2)
    store.load_into(target, 1)
    store.load_into(target, 2)
    assert_state_bits_equal({k: v.cpu() for k, v in target.items()}, base)


def test_load_into_conjugate_and_negative_views_writes_their_values(new_location) -> None:
    location = new_location()
    generator = torch.Generator().manual_seed(1)
    base = {"c": torch.randn(10, dtype=torch.complex64, generator=generator), "r": torch.randn(10, generator=generator)}
    mask = Mask.from_indices({"c": [1, 2], "r": [3]}, {"c": (10,), "r": (10,)})
    store = CheckpointStore.create(location, base, mask)
    steps = {}
    for step in (1, 2):
        state = {name: t.clone() for name, t in base.items()}
        state["c"][[1, 2]] = torch.tensor([step + 1j, -step - 2j])
        state["r"][3] = float(step)
        store.save(state, step)
        steps[step] = state
    target = {
        "c": torch.zeros(10, dtype=torch.complex64).conj(),
        "r": torch.complex(torch.zeros(10), torch.zeros(10)).conj().imag,
    }
    assert target["c"].is_conj() and target["r"].is_neg()
    for step in (1, 2, 1):  # a full write, then the O(k) switch path twice
        store.load_into(target, step)
        assert_state_bits_equal({name: t.resolve_conj().resolve_neg() for name, t in target.items()}, steps[step])
