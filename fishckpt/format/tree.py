"""Nested Python values as JSON plus a list of tensors, without pickle: training state and user metadata.

No torch import is needed here: a value can only be a tensor if torch is loaded
already, so ``sys.modules`` tells, and reading metadata (``fishckpt ls``) stays torch-free.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from ..errors import FormatError, InvalidArgumentError

_TAGS = ("$tensor", "$tuple", "$items", "$float", "$ndarray")


def encode_tree(value: Any, tensors: list[Any] | None, *, path: str = "state") -> Any:
    """Turns nested dicts, lists, tuples, scalars and tensors into JSON; tensors go to ``tensors``.

    Tagged forms keep what JSON would lose: tuples, dicts with non-string keys (an
    optimizer's integer parameter ids), non-finite floats and numpy arrays. Tensors
    are appended as they are (the caller copies them); ``tensors=None`` refuses them.

    Raises:
        InvalidArgumentError: A value of another type, naming where it sits in the tree.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    torch = sys.modules.get("torch")
    if tensors is not None and torch is not None and isinstance(value, torch.Tensor | np.ndarray):
        if isinstance(value, torch.Tensor):
            tensors.append(value.detach())
            return {"$tensor": len(tensors) - 1}
        tensors.append(torch.from_numpy(np.ascontiguousarray(value)))
        return {"$ndarray": len(tensors) - 1}
    if isinstance(value, np.generic):
        return encode_tree(value.item(), tensors, path=path)
    if isinstance(value, list):
        return [encode_tree(item, tensors, path=f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, tuple):
        return {"$tuple": [encode_tree(item, tensors, path=f"{path}[{i}]") for i, item in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("$") for key in value):
            return {key: encode_tree(item, tensors, path=f"{path}[{key!r}]") for key, item in value.items()}
        return {
            "$items": [
                [encode_tree(key, tensors, path=f"{path} key"), encode_tree(item, tensors, path=f"{path}[{key!r}]")]
                for key, item in value.items()
            ]
        }
    if tensors is None:
        raise InvalidArgumentError(
            f"{path} is not JSON-serialisable: it holds a {type(value).__name__}; metadata may hold numbers "
            "(NaN and infinities too), strings, booleans, None, and lists, tuples and dicts of them"
        )
    raise InvalidArgumentError(
        f"{path}: cannot store a {type(value).__name__} without pickle; training state may hold "
        "tensors, numbers, strings, None, and lists, tuples and dicts of them"
    )


def decode_tree(value: Any, tensors: list[Any], *, where: str) -> Any:
    """Inverts ``encode_tree``; ``where`` names the file in errors."""
    if isinstance(value, list):
        return [decode_tree(item, tensors, where=where) for item in value]
    if not isinstance(value, dict):
        return value
    tags = [key for key in value if key in _TAGS]
    if not tags:
        return {key: decode_tree(item, tensors, where=where) for key, item in value.items()}
    if len(value) != 1:
        raise FormatError(f"{where}: malformed training state node {sorted(value)}")
    tag, body = tags[0], value[tags[0]]
    if tag in ("$tensor", "$ndarray"):
        if not isinstance(body, int) or not 0 <= body < len(tensors):
            raise FormatError(f"{where}: training state refers to missing tensor {body!r}")
        return tensors[body] if tag == "$tensor" else tensors[body].numpy()
    if tag == "$tuple":
        return tuple(decode_tree(item, tensors, where=where) for item in body)
    if tag == "$items":
        return {decode_tree(k, tensors, where=where): decode_tree(v, tensors, where=where) for k, v in body}
    if body not in ("nan", "inf", "-inf"):
        raise FormatError(f"{where}: bad float {body!r} in training state")
    return float(body)
