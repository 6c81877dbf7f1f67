"""Training state kept with a step: the optimizer, the LR scheduler and the random generators."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch

from ..errors import FormatError
from ..format import codec, training
from ..format.bits import WORD_DTYPE
from ..format.dtypes import dtype_by_name
from .stepcodec import Decoded


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
    return training.encode_tree(state, tensors, path="training state"), tensors


def decode(decoded: Decoded) -> dict[str, Any]:
    """The training state a step holds, as saved (``{}`` if none was)."""
    record, where = decoded.record.training, decoded.where
    if record is None:
        return {}
    tensors = []
    try:
        for stored in record.tensors:
            row = dtype_by_name(stored.dtype, where=where)
            numel = math.prod(stored.shape)
            words = codec.decode_words(
                [decoded.container.section(stored.first + i) for i in range(stored.count)],
                numel * (row.itemsize // row.word_bytes),
                row.word_bytes,
            )
            flat = torch.from_numpy(words.copy()).view(WORD_DTYPE[row.word_bytes])
            tensors.append(flat.view(row.torch_dtype).reshape(stored.shape))
        tree = training.decode_tree(record.tree, tensors, where=where)
    except (KeyError, TypeError, ValueError) as error:
        raise FormatError(f"{where}: malformed training state: {error!r}") from error
    if not isinstance(tree, dict):
        raise FormatError(f"{where}: malformed training state")
    return tree


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
