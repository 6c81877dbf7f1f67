"""Mask construction, queries and every file format Mask.load accepts."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from fishckpt import FormatError, IntegrityError, Mask, MaskMismatchError, MissingFileError


def test_from_bool_and_queries() -> None:
    mask = Mask.from_bool({"a": torch.tensor([[True, False], [False, True]]), "b": torch.zeros(3, dtype=torch.bool)})
    assert mask["a"].tolist() == [0, 3]
    assert mask["b"].tolist() == []
    assert (mask.k, mask.numel, mask.names) == (2, 7, ("a", "b"))
    assert mask.density == pytest.approx(2 / 7)
    assert mask.counts() == {"a": 2, "b": 0}
    assert torch.equal(mask.to_bool()["a"], torch.tensor([[True, False], [False, True]]))


def test_from_bool_accepts_zero_one_floats_only() -> None:
    assert Mask.from_bool({"w": torch.tensor([0.0, 1.0, 1.0])})["w"].tolist() == [1, 2]
    with pytest.raises(MaskMismatchError, match="'w' has values other than 0 and 1"):
        Mask.from_bool({"w": torch.tensor([0.0, 0.5])})


def test_from_indices_sorts_and_validates() -> None:
    mask = Mask.from_indices({"w": [5, 1, 3]}, {"w": (2, 3), "v": (4,)})
    assert mask["w"].tolist() == [1, 3, 5]
    assert mask["v"].tolist() == []
    for duplicated in ([1, 1], [3, 0, 3], [2, 0, 1, 2]):
        with pytest.raises(MaskMismatchError, match="'w': duplicate indices"):
            Mask.from_indices({"w": duplicated}, {"w": (4,)})
    with pytest.raises(MaskMismatchError, match="'w': index out of range"):
        Mask.from_indices({"w": [4]}, {"w": (4,)})
    with pytest.raises(MaskMismatchError, match="without a shape"):
        Mask.from_indices({"x": [0]}, {"w": (4,)})


masks = st.dictionaries(
    st.text("abcdef.", min_size=1, max_size=6),
    st.tuples(st.lists(st.integers(0, 5), max_size=3), st.randoms(use_true_random=False)),
    max_size=5,
)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(masks)
def test_save_load_round_trip(tmp_path_factory: pytest.TempPathFactory, spec: dict) -> None:
    shapes, indices = {}, {}
    for name, (shape, rng) in spec.items():
        numel = 1
        for s in shape:
            numel *= s
        shapes[name] = tuple(shape)
        indices[name] = rng.sample(range(numel), rng.randint(0, numel)) if numel else []
    mask = Mask.from_indices(indices, shapes)
    path = tmp_path_factory.mktemp("m") / "mask.fishmask"
    mask.save(path)
    loaded = Mask.load(path)
    assert loaded.names == mask.names
    for name in mask:
        assert loaded.shape(name) == mask.shape(name)
        assert torch.equal(loaded[name], mask[name])
    assert loaded.digest == mask.digest


def test_load_reference_formats(tmp_path) -> None:
    bools = {"a": torch.tensor([1.0, 0.0, 1.0]), "b": torch.tensor([[False, True]])}
    save_file(bools, tmp_path / "m.safetensors")
    torch.save(bools, tmp_path / "m.pt")
    expected = Mask.from_bool(bools)
    assert Mask.load(tmp_path / "m.safetensors") == expected
    assert Mask.load(tmp_path / "m.pt") == expected


def test_load_refuses_pickled_objects(tmp_path) -> None:
    class Evil:
        def __reduce__(self):  # would run on a plain torch.load
            return (print, ("pwned",))

    torch.save({"a": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(FormatError, match="evil.pt: refused: the file holds pickled Python objects, not just tensors"):
        Mask.load(tmp_path / "evil.pt")


def test_load_detects_corruption_and_junk(tmp_path) -> None:
    path = tmp_path / "mask.fishmask"
    Mask.from_indices({"w": [1, 2, 9]}, {"w": (10,)}).save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="mask.fishmask: mask file is corrupted"):
        Mask.load(path)
    path.write_bytes(b"FISHMASK")
    with pytest.raises(IntegrityError, match="truncated"):
        Mask.load(path)
    (tmp_path / "junk.bin").write_bytes(b"hello world, not a mask")
    with pytest.raises(FormatError, match="junk.bin: not a mask file"):
        Mask.load(tmp_path / "junk.bin")


# The constructor's own checks: from_bool and from_indices never make what these refuse. -------------------


def test_constructor_accepts_indices_at_both_ends_of_a_tensor() -> None:
    mask = Mask({"w": torch.tensor([0, 5]), "e": torch.zeros(0, dtype=torch.int64)}, {"w": (2, 3), "e": (0,)})
    assert mask["w"].tolist() == [0, 5] and mask["e"].tolist() == []
    assert (mask.k, mask.numel, mask.names) == (2, 6, ("w", "e"))


@pytest.mark.parametrize(
    ("indices", "shapes", "message"),
    [
        ({"w": torch.tensor([1, 1])}, {"w": (4,)}, "mask tensor 'w': indices must be sorted and unique"),
        ({"w": torch.tensor([0, 2, 2, 3])}, {"w": (4,)}, "mask tensor 'w': indices must be sorted and unique"),
        ({"w": torch.tensor([3, 1])}, {"w": (4,)}, "mask tensor 'w': indices must be sorted and unique"),
        ({"w": torch.tensor([0]), "v": torch.tensor([0])}, {"w": (4,), "u": (1,)},
         "mask indices and shapes name different tensors: ['u', 'v']"),
        ({"w": torch.tensor([0])}, {"w": (-2, -2)}, "mask tensor 'w' has a negative dimension in shape (-2, -2)"),
        ({"w": torch.tensor([0], dtype=torch.int32)}, {"w": (4,)}, "mask tensor 'w': indices must be a 1-d int64"),
        ({"w": torch.tensor([0.0])}, {"w": (4,)}, "mask tensor 'w': indices must be a 1-d int64"),
        ({"w": torch.tensor([[0, 1]])}, {"w": (4,)}, "mask tensor 'w': indices must be a 1-d int64"),
        ({"w": torch.tensor(0)}, {"w": (4,)}, "mask tensor 'w': indices must be a 1-d int64"),
        ({"w": torch.tensor([-1, 2])}, {"w": (4,)}, "mask tensor 'w': index out of range for shape (4,) (-1..2"),
        ({"w": torch.tensor([0, 4])}, {"w": (2, 2)}, "mask tensor 'w': index out of range for shape (2, 2) (0..4"),
    ],
    ids=["duplicate", "duplicate-inside", "unsorted", "names", "negative-dim", "int32", "float", "two-d", "scalar",
         "negative", "past-the-end"],
)  # fmt: skip
def test_constructor_refuses_malformed_indices(
    indices: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], message: str
) -> None:
    with pytest.raises(MaskMismatchError, match=f"^{re.escape(message)}"):
        Mask(indices, shapes)


def test_lookups_of_tensors_a_mask_does_not_cover() -> None:
    mask = Mask.from_indices({"w": [1]}, {"w": (4,), "v": (2,)})
    with pytest.raises(KeyError, match="the mask has no tensor 'missing'"):
        mask["missing"]
    assert "w" in mask and "v" in mask and "missing" not in mask
    assert list(mask) == ["w", "v"] and len(mask) == 2
    assert repr(mask) == "Mask(k=1, numel=6, density=16.6667%, tensors=2)"
    assert Mask.from_indices({}, {}).density == 0.0


def test_masks_hash_by_content() -> None:
    """Equal masks are one dict key however they were made; a mask differing in one index is another key."""
    built = Mask.from_indices({"w": [3, 1]}, {"w": (2, 2)})
    from_bool = Mask.from_bool({"w": torch.tensor([[False, True], [False, True]])})
    other = Mask.from_indices({"w": [1, 2]}, {"w": (2, 2)})
    assert built == from_bool and hash(built) == hash(from_bool)
    assert {built: "a"}[from_bool] == "a"
    assert len({built, from_bool, other}) == 2
    assert hash(built) != hash(other)
    assert built != other and (built == "w") is False and built.__eq__("w") is NotImplemented


def test_from_bool_refuses_complex_and_accepts_zero_one_integers() -> None:
    assert Mask.from_bool({"w": torch.tensor([1, 0, 1], dtype=torch.uint8)})["w"].tolist() == [0, 2]
    with pytest.raises(MaskMismatchError, match="'w' has values other than 0 and 1"):
        Mask.from_bool({"w": torch.tensor([1 + 0j, 0j])})


def test_load_names_a_missing_file(tmp_path) -> None:
    with pytest.raises(MissingFileError, match=f"^{re.escape(str(tmp_path / 'none.fishmask'))}: mask file not found"):
        Mask.load(tmp_path / "none.fishmask")


def test_save_replaces_a_mask_file_by_default(tmp_path) -> None:
    path = tmp_path / "mask.safetensors"
    Mask.from_indices({"w": [1]}, {"w": (4,)}).save(path)
    second = Mask.from_indices({"w": [2]}, {"w": (4,)})
    second.save(path)
    assert Mask.load(path) == second
