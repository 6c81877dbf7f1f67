"""Matching a mask to a model's parameters by name: shared by the optimizer, gradient masking and clipping."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import InvalidArgumentError

__all__ = ["NamedParams", "trainable_named_params"]

NamedParams = nn.Module | Iterable[tuple[str, torch.Tensor]]


def trainable_named_params(model_or_named_params: NamedParams) -> dict[str, torch.Tensor]:
    """``{name: parameter}`` of the parameters with ``requires_grad``, from a module or (name, parameter) pairs."""
    if isinstance(model_or_named_params, nn.Module):
        return {name: p for name, p in model_or_named_params.named_parameters() if p.requires_grad}
    named: dict[str, torch.Tensor] = {}
    for item in model_or_named_params:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise InvalidArgumentError(
                "expected an nn.Module or an iterable of (name, parameter) pairs, such as model.named_parameters()"
            )
        name, param = item
        if not isinstance(param, torch.Tensor):
            raise InvalidArgumentError(f"parameter {name!r} is a {type(param).__name__}, not a tensor")
        if name in named:
            raise InvalidArgumentError(f"parameter name {name!r} appears twice")
        if param.requires_grad:
            named[name] = param
    return named
