"""The closed-form states stored in tests/data/store_v2 (format_version 2), shared by its maker and its test.

The values are chosen for format stability: thousands of masked values share a few
exponents, so the exponent order has long runs of ties, which an unstable sort would
reorder (docs/format.md, "Exponent order"); there are changes outside the mask stored
sparse and dense, 16-byte elements, an alias, training state and non-finite metadata.
"""

from __future__ import annotations

import torch

from fishckpt import Mask

WIDTH = 4096


def base_state() -> dict[str, torch.Tensor]:
    index = torch.arange(WIDTH, dtype=torch.float64)
    # 1 + (i mod 97)/128 times 2^-(i mod 3): only three exponents, so most values tie.
    weight = ((1 + (index % 97) / 128) * torch.pow(2.0, -(index % 3))).to(torch.float32).reshape(64, 64)
    weight[::2] *= -1
    state = {
        "layer.weight": weight,
        "layer.bias": torch.linspace(-1, 1, 64),
        "halves": (torch.arange(256, dtype=torch.float64) / 64).to(torch.bfloat16),
        "complex": torch.complex(torch.arange(32.0), -torch.arange(32.0)).to(torch.complex128),
        "counts": torch.arange(50, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
    }
    state["head.weight"] = state["layer.weight"]  # tied
    return state


def mask() -> Mask:
    shapes = {"layer.weight": (64, 64), "layer.bias": (64,), "halves": (256,), "complex": (32,)}
    indices = {
        "layer.weight": list(range(0, WIDTH, 3)),
        "layer.bias": [1, 5, 9],
        "halves": list(range(0, 256, 4)),
        "complex": [0, 31],
    }
    return Mask.from_indices(indices, shapes)


def step_state(step: int) -> dict[str, torch.Tensor]:
    """Step 1 moves masked entries only; step 2 also changes entries outside the mask, sparse and dense."""
    state = {name: tensor.clone() for name, tensor in base_state().items()}
    state["head.weight"] = state["layer.weight"]
    m = mask()
    for name in m:
        flat = state[name].view(-1)
        index = m[name]
        flat[index] = flat[index] * (1 + step / 1024) + step / 4096
    if step == 2:
        state["layer.weight"].view(-1)[[1, 2]] = torch.tensor([float("nan"), -0.0])  # outside: sparse
        state["counts"] += 7  # every entry: dense
        state["flags"][1] = True
    return state


def optimizer_state(step: int) -> dict[str, object]:
    """A small optimizer-like state dict: tensors of two dtypes, ints, floats, tuples."""
    return {
        "state": {0: {"step": step, "exp_avg": torch.full((5,), step / 3), "count": torch.arange(3) * step}},
        "param_groups": [{"lr": 0.125, "betas": (0.9, 0.999), "params": [0]}],
    }
