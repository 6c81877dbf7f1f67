"""Hypothesis strategies and builders for random states, masks and changes."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from fishckpt import Mask
from fishckpt.format.bits import element_words
from fishckpt.format.dtypes import supported_torch_dtypes

DTYPES = supported_torch_dtypes()


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Arbitrary bit patterns (NaN payloads, -0.0, denormals, infinities all occur)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (math.prod(shape) * itemsize,), dtype=torch.uint8, generator=generator)
    if dtype == torch.bool:
        return (raw & 1).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


@st.composite
def states_and_masks(draw: st.DrawFn) -> tuple[dict[str, torch.Tensor], Mask, int]:
    """A base state of random dtypes and shapes, a random mask over some of it, and a seed."""
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    count = draw(st.integers(1, 6))
    state: dict[str, torch.Tensor] = {}
    indices, shapes = {}, {}
    for number in range(count):
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 7), max_size=3)))
        name = f"t{number}.{draw(st.sampled_from(['weight', 'bias', 'running_mean']))}"
        state[name] = random_tensor(dtype, shape, generator)
        if draw(st.booleans()):
            numel = math.prod(shape)
            keep = draw(st.floats(0, 1))
            chosen = torch.nonzero(torch.rand(numel, generator=generator) < keep).reshape(-1)
            indices[name], shapes[name] = chosen, shape
    return state, Mask.from_indices(indices, shapes), seed


def changed(
    base: dict[str, torch.Tensor], mask: Mask, seed: int, *, inside: float, outside: float
) -> dict[str, torch.Tensor]:
    """A copy of ``base`` with a fraction of masked and of unmasked entries given new random bits."""
    generator = torch.Generator().manual_seed(seed + 1)
    out = {}
    for name, tensor in base.items():
        new = tensor.clone()
        flat = element_words(new)  # integer words: index_put works for every dtype
        numel = flat.shape[0]
        if numel:
            fresh = element_words(random_tensor(tensor.dtype, (numel,), generator))
            pick = torch.rand(numel, generator=generator)
            in_mask = torch.zeros(numel, dtype=torch.bool)
            if name in mask:
                in_mask[mask[name]] = True
            take = torch.where(in_mask, pick < inside, pick < outside)
            flat[take] = fresh[take]
        out[name] = new
    return out
