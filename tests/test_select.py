"""Mask selection: exact global top-k with the tie rule, budgets, and the random / BitFit / diff baselines."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import pytest
import torch
from torch import nn

from fishckpt import (
    HeadNotTrainableWarning,
    InvalidArgumentError,
    Mask,
    StateMismatchError,
    bitfit_mask,
    diff_mask,
    fish_mask,
    random_mask,
)
from fishckpt.method import select as _select


def _brute_force(scores: dict[str, torch.Tensor], k: int, always: set[str], excluded: set[str]) -> Mask:
    """Reference: a full sort by (score descending, tensor order, flat index), plain Python."""
    shapes = {name: tuple(t.shape) for name, t in scores.items()}
    fixed = {name: list(range(t.numel())) for name, t in scores.items() if name in always}
    budget = k - sum(len(v) for v in fixed.values())
    entries = [
        (-float(value), order, index, name)
        for order, (name, t) in enumerate(scores.items())
        if name not in always and name not in excluded
        for index, value in enumerate(t.reshape(-1).tolist())
    ]
    chosen: dict[str, list[int]] = dict(fixed)
    for _, _, index, name in sorted(entries)[:budget]:
        chosen.setdefault(name, []).append(index)
    return Mask.from_indices(chosen, shapes)


def _tied_scores(generator: torch.Generator, levels: int) -> dict[str, torch.Tensor]:
    shapes = [(3, 4), (7,), (2, 2, 3), (1,), (5,)]
    return {
        f"t{i}": torch.randint(0, levels, shape, generator=generator).float() / levels for i, shape in enumerate(shapes)
    }


def test_matches_brute_force_with_many_ties() -> None:
    generator = torch.Generator().manual_seed(0)
    for case in range(300):
        scores = _tied_scores(generator, levels=1 + case % 5)
        total = sum(t.numel() for t in scores.values())
        always = {"t3"} if case % 3 == 0 else set()
        excluded = {"t4"} if case % 4 == 0 else set()
        low = 1 if always else 0
        high = total - (5 if excluded else 0)
        k = int(torch.randint(low, high + 1, (), generator=generator))
        mask = fish_mask(scores, k=k, always_trainable=always, exclude=excluded)
        expected = _brute_force(scores, k, always, excluded)
        assert mask == expected, f"case {case}: k={k}"
        assert mask.k == k and mask.names == tuple(scores)


@pytest.mark.parametrize("sigmas", [6.0, -50.0])  # -50 forces the "sample missed" retry
def test_sampled_threshold_path_is_exact(monkeypatch: pytest.MonkeyPatch, sigmas: float) -> None:
    monkeypatch.setattr(_select, "_DIRECT_LIMIT", 64)
    monkeypatch.setattr(_select, "_SAMPLE_SIZE", 32)
    monkeypatch.setattr(_select, "_BRACKET_SIGMAS", sigmas)
    generator = torch.Generator().manual_seed(1)
    for case in range(100):
        scores = _tied_scores(generator, levels=2 + case % 7)
        scores["big"] = torch.randint(0, 9, (40,), generator=generator).double() / 9
        k = 1 + case % 60
        assert fish_mask(scores, k=k) == _brute_force(scores, k, set(), set()), f"case {case}"


def test_large_input_matches_stable_sort() -> None:
    # Above the direct limit, with heavy ties at the threshold (values quantised to 1/64).
    generator = torch.Generator().manual_seed(2)
    scores = {
        f"t{i}": torch.randint(0, 64, (n,), generator=generator).float() for i, n in enumerate([3_000_000, 2_500_000])
    }
    k = 123_457
    mask = fish_mask(scores, k=k)
    flat = torch.cat([t.reshape(-1) for t in scores.values()])
    # A stable descending sort keeps equal scores in (tensor, index) order: the tie rule exactly.
    order = torch.sort(flat, descending=True, stable=True).indices[:k].sort().values
    split = scores["t0"].numel()
    assert torch.equal(mask["t0"], order[order < split])
    assert torch.equal(mask["t1"], order[order >= split] - split)


def test_always_trainable_counts_toward_the_budget_and_exclude_gets_nothing() -> None:
    scores = {
        "encoder.weight": torch.tensor([[5.0, 1.0], [4.0, 3.0]]),
        "encoder.bias": torch.tensor([9.0, 0.0]),
        "classifier.weight": torch.zeros(2, 2),
        "classifier.bias": torch.zeros(2),
    }
    mask = fish_mask(scores, k=8, always_trainable=["classifier.*"], exclude=["encoder.bias"])
    assert mask.counts() == {"encoder.weight": 2, "encoder.bias": 0, "classifier.weight": 4, "classifier.bias": 2}
    assert mask["encoder.weight"].tolist() == [0, 2]  # 5.0 and 4.0; the 9.0 is excluded
    # keep_ratio is a fraction of all entries, head included: round(0.75 x 12) = 9.
    assert fish_mask(scores, keep_ratio=0.75, always_trainable="classifier.*").k == 9


def test_selection_errors() -> None:
    scores = {"w": torch.arange(6.0), "head": torch.zeros(3)}
    with pytest.raises(InvalidArgumentError, match="exactly one of keep_ratio and k"):
        fish_mask(scores)
    with pytest.raises(InvalidArgumentError, match="exactly one of keep_ratio and k"):
        fish_mask(scores, k=2, keep_ratio=0.1)
    with pytest.raises(InvalidArgumentError, match="k=10 is out of range"):
        fish_mask(scores, k=10)
    with pytest.raises(InvalidArgumentError, match="k must be an int"):
        fish_mask(scores, k=2.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="keep_ratio must be between 0 and 1"):
        fish_mask(scores, keep_ratio=1.5)
    with pytest.raises(InvalidArgumentError, match="k=2 is smaller than the 3 entries of the always-trainable"):
        fish_mask(scores, k=2, always_trainable=["head"])
    with pytest.raises(
        InvalidArgumentError, match=r"k=8 is more than the 6 entries that can be selected \(9 in all, 3 excluded\)"
    ):
        fish_mask(scores, k=8, exclude=["head"])
    with pytest.raises(InvalidArgumentError, match="pattern 'classifier' matches no tensor"):
        fish_mask(scores, k=3, always_trainable=["classifier"])
    with pytest.raises(InvalidArgumentError, match="match both always_trainable and exclude"):
        fish_mask(scores, k=3, always_trainable=["head"], exclude=["h*"])
    with pytest.raises(InvalidArgumentError, match="scores for 'w' contain NaN"):
        fish_mask({"w": torch.tensor([1.0, math.nan])}, k=1)
    with pytest.raises(InvalidArgumentError, match="must be a floating-point tensor"):
        fish_mask({"w": torch.arange(3)}, k=1)


def test_mixed_dtypes_and_infinities() -> None:
    scores = {
        "a": torch.tensor([1.0, math.inf, -math.inf], dtype=torch.float16),
        "b": torch.tensor([1.0, 2.0], dtype=torch.float64),
    }
    assert fish_mask(scores, k=3) == Mask.from_indices({"a": [0, 1], "b": [1]}, {"a": (3,), "b": (2,)})
    assert fish_mask(scores, k=0).k == 0 and fish_mask(scores, k=5).k == 5


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.BatchNorm1d(30), nn.Linear(30, 4))
    model[1].weight.requires_grad_(False)
    return model


def test_random_mask_is_seeded_and_respects_the_budget() -> None:
    model = _model()
    first = random_mask(model, 0.3, seed=3, always_trainable=["2.*"], exclude=["1.bias"])
    assert first == random_mask(model, 0.3, seed=3, always_trainable=["2.*"], exclude=["1.bias"])
    assert first != random_mask(model, 0.3, seed=4, always_trainable=["2.*"], exclude=["1.bias"])
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert "1.weight" not in first.names  # frozen parameters are not covered
    assert first.k == round(0.3 * numel)
    assert first.counts()["2.weight"] == 120 and first.counts()["1.bias"] == 0
    # State dicts: every floating tensor, buffers included; num_batches_tracked (int) is skipped.
    from_state = random_mask(model.state_dict(), 0.5, seed=0)
    assert "1.running_mean" in from_state.names and "1.num_batches_tracked" not in from_state.names


def test_random_mask_is_roughly_uniform() -> None:
    state = {"a": torch.zeros(40_000), "b": torch.zeros(200, 300)}
    mask = random_mask(state, 0.05, seed=0)
    assert mask.counts()["a"] == pytest.approx(2_000, rel=0.1)
    assert mask.counts()["b"] == pytest.approx(3_000, rel=0.1)


def test_bitfit_mask_takes_whole_bias_tensors() -> None:
    mask = bitfit_mask(_model())
    assert mask.counts() == {"0.weight": 0, "0.bias": 30, "1.bias": 30, "2.weight": 0, "2.bias": 4}
    assert bitfit_mask({"x.bias": torch.zeros(2, 2), "x.weight": torch.zeros(3)}).counts() == {
        "x.bias": 4,
        "x.weight": 0,
    }


def test_diff_mask_selects_the_largest_exact_changes() -> None:
    generator = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(50, generator=generator), "b": torch.randn(5, 6, generator=generator)}
    tuned = {name: t + torch.randn(t.shape, generator=generator) * 1e-3 for name, t in base.items()}
    tuned["a"][::3] = base["a"][::3]  # unchanged entries
    mask = diff_mask(base, tuned, k=20)

    def exact(name: str) -> list[Fraction]:
        return [
            abs(Fraction(x) - Fraction(y))
            for x, y in zip(tuned[name].reshape(-1).tolist(), base[name].reshape(-1).tolist(), strict=True)
        ]

    ranked = sorted(
        (
            (-delta, order, index, name)
            for order, name in enumerate(base)
            for index, delta in enumerate(exact(name))
            if delta
        ),
    )[:20]
    expected = Mask.from_indices(
        {name: [index for _, _, index, n in ranked if n == name] for name in base},
        {n: tuple(t.shape) for n, t in base.items()},
    )
    assert mask == expected
    assert diff_mask(base, tuned, keep_ratio=0.1).k == 8


def test_diff_mask_never_selects_unchanged_bits() -> None:
    base = {"w": torch.tensor([1.0, 0.0, math.nan, 2.0, 3.0])}
    tuned = {"w": torch.tensor([1.0, -0.0, 5.0, 2.0, 3.5])}
    mask = diff_mask(base, tuned, k=5)  # only 3 entries changed bits
    assert mask["w"].tolist() == [1, 2, 4]  # the 0.0 -> -0.0 flip counts, as a change of size 0
    assert diff_mask(base, tuned, k=1)["w"].tolist() == [2]  # NaN -> 5.0 ranks as infinite
    with pytest.raises(StateMismatchError, match="tuned weights have no tensor 'w'"):
        diff_mask(base, {"v": torch.zeros(5)}, k=1)
    with pytest.raises(StateMismatchError, match="'w' is torch.float64"):
        diff_mask(base, {"w": torch.zeros(5, dtype=torch.float64)}, k=1)


def _with_head(head: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return {
        "body.weight": torch.rand(4, 4, generator=generator),
        f"{head}.weight": torch.rand(3, 4, generator=generator),
        f"{head}.bias": torch.rand(3, generator=generator),
    }


@pytest.mark.parametrize("head", ["classifier", "fc", "lm_head", "score"])
def test_warns_when_an_obvious_head_is_left_to_compete_for_k(head: str) -> None:
    scores = _with_head(head)
    with pytest.warns(HeadNotTrainableWarning, match=rf"fish_mask: '{head}.weight', '{head}.bias' look like") as caught:
        fish_mask(scores, k=16)
    assert f"always_trainable=['{head}.*']" in str(caught[0].message)
    # The warning's frame is the caller's, so the message points at the user's line.
    assert caught[0].filename == __file__
    with pytest.warns(HeadNotTrainableWarning, match=rf"fish_mask: '{head}.bias' look like"):
        fish_mask(scores, k=16, always_trainable=[f"{head}.weight"])  # half a head is still left out
    with pytest.warns(HeadNotTrainableWarning, match="random_mask"):
        random_mask(scores, 0.5, seed=0)


def test_no_head_warning_when_the_head_is_covered_or_absent() -> None:
    scores = _with_head("classifier")
    generator = torch.Generator().manual_seed(6)
    others = {name: torch.rand(2, 3, generator=generator) for name in ("encoder.fc.weight", "fc1.weight", "scores.w")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mask = fish_mask(scores, k=16, always_trainable=(name for name in ["classifier.*"]))  # a generator, read twice
        assert mask.counts()["classifier.weight"] == 12 and mask.counts()["classifier.bias"] == 3
        fish_mask(scores, k=4, exclude=["classifier.*"])  # frozen on purpose
        fish_mask(others, k=3)  # heads only at the top level; "fc1" and "scores" are other names
        random_mask(scores, 0.8, seed=0, always_trainable="classifier.*")
