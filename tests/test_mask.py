"""Mask construction, queries and every file format Mask.load accepts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from fishckpt import FormatError, IntegrityError, Mask, MaskMismatchError


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
    with pytest.raises(MaskMismatchError, match="'w': duplicate indices"):
        Mask.from_indices({"w": [1, 1]}, {"w": (4,)})
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
