"""clip_masked_grad_norm_: the reference's mask-then-clip, and docs that clip the trainable entries only."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import assert_bits_equal
from torch import nn

from fishckpt import InvalidArgumentError, Mask, MaskMismatchError, clip_masked_grad_norm_, mask_gradients

ROOT = Path(__file__).resolve().parent.parent


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3), nn.Tanh(), nn.Linear(3, 2))


def _mask(model: nn.Module) -> Mask:
    """A few entries of the first weight, the whole middle weight, nothing of the rest."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    indices = {"0.weight": torch.randperm(60, generator=generator)[:7], "2.weight": torch.arange(30)}
    return Mask.from_indices(indices, shapes)


def _backward(model: nn.Module, scale: float = 1.0) -> None:
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 6, generator=generator), torch.randint(0, 2, (8,), generator=generator)
    (scale * nn.functional.cross_entropy(model(x), y)).backward()


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_matches_masking_then_clip_grad_norm(norm_type: float) -> None:
    """The reference: multiply gradients by the mask after backward, then clip every parameter at max_norm."""
    model, reference = _model(), _model()
    mask = _mask(model)
    _backward(model, scale=50.0)
    with mask_gradients(reference, mask):
        _backward(reference, scale=50.0)
    expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0, norm_type=norm_type)
    norm = clip_masked_grad_norm_(model, mask, 1.0, norm_type=norm_type)
    assert float(norm) > 1.0  # so clipping really happened
    torch.testing.assert_close(norm, expected_norm, rtol=1e-6, atol=0.0)
    for name, param in model.named_parameters():
        index = mask[name]
        assert param.grad is not None
        got, want = reference.get_parameter(name).grad, param.grad
        assert got is not None
        torch.testing.assert_close(want.reshape(-1)[index], got.reshape(-1)[index], rtol=1e-6, atol=0.0, msg=name)


def test_differs_from_clipping_every_gradient() -> None:
    """What the docs' example used to do: frozen entries inflate the norm, so the trainable ones shrink more."""
    clipped_all, clipped_masked = _model(), _model()
    mask = _mask(clipped_all)
    _backward(clipped_all, scale=50.0)
    _backward(clipped_masked, scale=50.0)
    everything = torch.nn.utils.clip_grad_norm_(clipped_all.parameters(), 1.0)
    masked = clip_masked_grad_norm_(clipped_masked, mask, 1.0)
    assert float(masked) < float(everything)
    index = mask["0.weight"]
    kept_all = clipped_all[0].weight.grad.reshape(-1)[index]  # type: ignore[union-attr]
    kept_masked = clipped_masked[0].weight.grad.reshape(-1)[index]  # type: ignore[union-attr]
    assert float(kept_masked.norm()) > 1.5 * float(kept_all.norm())


def test_leaves_unmasked_parameters_and_small_gradients_alone() -> None:
    model = _model()
    mask = _mask(model)
    _backward(model, scale=50.0)
    model[2].bias.grad = None
    before = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    clip_masked_grad_norm_(model, mask, 1.0)
    assert model[2].bias.grad is None
    for name in ("0.bias", "4.weight", "4.bias"):  # no mask entries: never scaled
        assert_bits_equal(model.get_parameter(name).grad, before[name], key=name)  # type: ignore[arg-type]
    assert not torch.equal(model[2].weight.grad, before["2.weight"])  # type: ignore[arg-type]

    small = _model()
    _backward(small, scale=1e-3)
    untouched = copy.deepcopy([p.grad for p in small.parameters()])
    norm = clip_masked_grad_norm_(small, mask, 1.0)
    assert float(norm) < 1.0
    for grad, saved in zip((p.grad for p in small.parameters()), untouched, strict=True):
        assert_bits_equal(grad, saved)  # type: ignore[arg-type]


def test_named_parameters_and_no_gradients() -> None:
    model = _model()
    mask = _mask(model)
    assert float(clip_masked_grad_norm_(model.named_parameters(), mask, 1.0)) == 0.0  # nothing to clip yet


def test_errors() -> None:
    model = _model()
    mask = _mask(model)
    _backward(model)
    with pytest.raises(InvalidArgumentError, match="max_norm must be >= 0"):
        clip_masked_grad_norm_(model, mask, -1.0)
    other = Mask.from_indices({"weight": [0]}, {"weight": (2, 2)})
    with pytest.raises(MaskMismatchError, match="'weight'"):
        clip_masked_grad_norm_(model, other, 1.0)
    model[0].weight.grad[0, 0] = math.nan  # type: ignore[index]
    full = Mask.from_indices({"0.weight": torch.arange(60)}, {n: tuple(p.shape) for n, p in model.named_parameters()})
    with pytest.raises(InvalidArgumentError, match="norm of order 2.0 of the masked gradients is nan"):
        clip_masked_grad_norm_(model, full, 1.0, error_if_nonfinite=True)


@pytest.mark.parametrize("doc", ["README.md", "docs/method.md"])
def test_docs_never_clip_frozen_gradients(doc: str) -> None:
    """An example that clips model.parameters() measures frozen entries too (issue 11)."""
    code = "\n".join(re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), flags=re.DOTALL))
    assert not re.search(r"clip_grad_norm_\(\s*model\.parameters\(\)", code), f"{doc} clips every gradient"
    assert "clip_masked_grad_norm_(model, mask" in code, f"{doc} should show the mask-aware clip"
