"""Training state kept with a step: the optimizer, the LR scheduler and the random generators."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from ..format import tree


def capture(optimizer: Any, scheduler: Any, rng: bool) -> tuple[Any, list[torch.Tensor]] | None:
    """The training state to save as a JSON tree and its tensors, or None if nothing was asked for."""
    state: dict[str, Any] = {}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if rng:
        state["rng"] = capture_rng()
    if not state:
        return None
    tensors: list[torch.Tensor] = []
    encoded = tree.encode_tree(state, tensors, path="training state")
    # Copies, so that training on after the call (an optimizer step updates its moments in place)
    # can never change what is written, even when the write happens later on another thread.
    return encoded, [_cpu_copy(tensor) for tensor in tensors]


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    out = torch.empty(tensor.shape, dtype=tensor.dtype)
    out.copy_(tensor)
    return out


def capture_rng() -> dict[str, Any]:
    """The global random states a training loop draws from: torch (CPU and CUDA), Python, numpy."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Puts back what ``capture_rng`` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
