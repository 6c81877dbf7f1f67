"""Tensors as bit patterns: every integer-word, byte and numpy view of a tensor's bits lives here.

Exact means exact: fishckpt compares and codes elements as integer words, never
as floating-point values, so NaN payloads and -0.0 survive every round trip.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from .codec import UINT_BY_WIDTH, Words

# Integer word dtypes by width. Signed for 2/4/8 bytes because torch has no arithmetic on wide
# unsigned types; callers treat the words as bit patterns only.
WORD_DTYPE: dict[int, torch.dtype] = {
    1: torch.uint8,
    2: torch.int16,
    4: torch.int32,
    8: torch.int64,
}


def element_words(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's elements as integer words: shape (numel,), or (numel, 2) for 16-byte types."""
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8)
    size = flat.element_size()
    if size <= 8:
        return flat.view(WORD_DTYPE[size])
    return flat.view(torch.int64).reshape(-1, size // 8)


def word_view(tensor: torch.Tensor) -> torch.Tensor:
    """A flat view of a contiguous tensor's bit patterns as integer words (complex128: two per element)."""
    return element_words(tensor).reshape(-1)


def bytes_as_elements(data: torch.Tensor, itemsize: int) -> torch.Tensor:
    """``element_words`` of a uint8 byte range that holds elements of ``itemsize`` bytes."""
    if data.numel() == 0:  # an empty view may have a stride torch refuses to reinterpret
        words = torch.empty(0, dtype=WORD_DTYPE[min(itemsize, 8)])
        return words if itemsize <= 8 else words.reshape(0, itemsize // 8)
    if itemsize <= 8:
        return data.view(WORD_DTYPE[itemsize])
    return data.view(torch.int64).reshape(-1, itemsize // 8)


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous CPU tensor's bytes (0-d and empty included)."""
    flat = tensor.reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


def as_words(array: npt.NDArray[np.generic], width: int) -> Words:
    """Views any numpy array of bit patterns as unsigned words of ``width`` bytes."""
    return np.ascontiguousarray(array).view(UINT_BY_WIDTH[width])


def numpy_words(elements: torch.Tensor) -> Words:
    """Element words of a CPU tensor as an unsigned numpy array (a view), for the codec and hashing."""
    return as_words(elements.numpy().reshape(-1), elements.element_size())


def differs(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per element, whether two ``element_words`` tensors differ in any bit."""
    ne = current != reference
    return ne.any(dim=1) if ne.dim() == 2 else ne


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor, or a copy of its values if it is a lazily conjugated or negated view.

    Such views (``x.conj()``, ``x.conj().imag``) hold other bits than their values, so they
    can be neither read nor written as bit patterns; copying them costs one tensor.
    """
    return tensor.resolve_conj().resolve_neg()


def contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor, or a contiguous copy of it: one tensor's worth of temporary memory (docs/exactness.md)."""
    return tensor if tensor.is_contiguous() else tensor.contiguous()
