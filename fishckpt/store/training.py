"""Training state kept with a step: the optimizer, the LR scheduler and the random generators."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from ..errors import StateMismatchError
from ..format import tree
from ..sharding import process_group
from . import stepcodec


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


def restore(decoded: stepcodec.Decoded, optimizer: Any, scheduler: Any, *, rng: bool) -> None:
    """Loads a decoded step's optimizer, scheduler and RNG states into the objects given.

    What ``CheckpointStore.load_training_state`` does once the step is decoded.
    """
    step = decoded.record.step
    if decoded.parts is not None:  # a sharded step: each rank's training state is in its own part
        group = process_group()
        rank, world = group if group is not None else (0, 1)
        if world != len(decoded.parts):
            raise StateMismatchError(
                f"{decoded.where}: step {step} was saved by {len(decoded.parts)} ranks, each with its own "
                f"optimizer state; this is rank {rank} of {world}. Resume it on {len(decoded.parts)} ranks "
                "(the weights alone load on any number: load_into)"
            )
        decoded = decoded.parts[rank]
    state = stepcodec.decode_training(decoded)
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        if target is None:
            continue
        if name not in state:
            raise StateMismatchError(
                f"{decoded.where}: step {step} was saved without {name} state; pass {name}= to save"
            )
        target.load_state_dict(state[name])
    if rng and "rng" in state:
        restore_rng(state["rng"])
