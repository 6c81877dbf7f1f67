"""The closed-form states stored in tests/data/store_v1 (format_version 1), shared by its maker and its test."""

from __future__ import annotations

import torch

from fishckpt import Mask

MASKED = {"layer.weight": [0, 3, 7, 8, 15, 23], "layer.bias": [1], "halves": [2, 5]}


def base_state() -> dict[str, torch.Tensor]:
    weight = (torch.arange(24, dtype=torch.float32).reshape(4, 6) - 11.5) / 8
    state = {
        "layer.weight": weight,
        "layer.bias": torch.tensor([0.5, -0.25, 0.0]),
        "halves": torch.arange(8, dtype=torch.float64).to(torch.bfloat16),
        "counts": torch.arange(5, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float16),
    }
    state["head.weight"] = state["layer.weight"]  # tied
    return state


def mask() -> Mask:
    shapes = {"layer.weight": (4, 6), "layer.bias": (3,), "halves": (8,)}
    return Mask.from_indices(MASKED, shapes)


def step_state(step: int) -> dict[str, torch.Tensor]:
    """Step 1 changes masked entries only; step 2 also changes buffers outside the mask."""
    state = {name: tensor.clone() for name, tensor in base_state().items()}
    state["head.weight"] = state["layer.weight"]
    for name, index in MASKED.items():
        flat = state[name].view(-1)
        flat[index] = flat[index] + step * 0.125
    if step == 2:
        state["counts"] += 7  # every entry: stored dense
        state["layer.weight"].view(-1)[1] = -0.0  # one entry outside the mask: stored sparse
        state["flags"][1] = True
    return state
