"""The exact check at save: hash each chunk with its masked entries reset to the base, and compare.

A state changed nothing outside the mask exactly when, for every hashing chunk,
the chunk with its masked entries reset to the base's values has the base
chunk's digest (docs/exactness.md). The same pass gathers the masked values.

The C extension ``fishckpt.store._native`` runs this loop over a CPU tensor's own
memory with the GIL released, so two tensors scan at once. Where it was not
built (no compiler at install time) or the tensor is on another device, the
loop below does the same with torch ops and a scratch buffer. Both give the
same values and the same differing chunks; tests/test_scan.py holds them to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from ..format.bits import byte_view, bytes_as_elements, element_words
from ..format.digests import chunk_elements, chunk_ranges
from ..format.digests import of_tensor_bytes as digest_of
from ..format.manifest import TensorEntry

_native: ModuleType | None
try:
    from . import _native
except ImportError:  # built without a C compiler: the torch loop below gives identical results
    _native = None


def native_available() -> bool:
    """Whether the C scan was built; without it an exact-check save takes about twice as long."""
    return _native is not None


def runs_native(tensor: torch.Tensor) -> bool:
    """Whether ``scan`` takes the C path for this tensor: built, and the tensor is in CPU memory."""
    return _native is not None and tensor.device.type == "cpu"


@dataclass
class MaskPlan:
    """Per-tensor facts derived once from the base and the mask, all O(k)."""

    index: torch.Tensor  # sorted flat indices (int64)
    per_chunk: int  # elements per hashing chunk
    chunk_bounds: list[int]  # index[bounds[c]:bounds[c+1]] fall in hashing chunk c
    local_index: torch.Tensor  # index minus its chunk's first element
    base_masked: torch.Tensor  # the base's element words at index
    chunk_digests: bytes  # the base's chunk digests, concatenated

    @classmethod
    def build(cls, entry: TensorEntry, index: torch.Tensor, base: torch.Tensor, chunk_bytes: int) -> MaskPlan:
        per_chunk = chunk_elements(entry.dtype.itemsize, chunk_bytes)
        edges = torch.arange(0, max(entry.numel, 1) + per_chunk, per_chunk)
        chunk_of = torch.div(index, per_chunk, rounding_mode="floor")
        return cls(
            index=index,
            per_chunk=per_chunk,
            chunk_bounds=torch.searchsorted(index, edges).tolist(),
            local_index=index - chunk_of * per_chunk,
            base_masked=element_words(base).index_select(0, index),
            chunk_digests=b"".join(entry.chunk_digests),
        )


def chunk_span(entry: TensorEntry, plan: MaskPlan, number: int) -> tuple[int, int]:
    """Element range [start, stop) of hashing chunk ``number``."""
    start = number * plan.per_chunk
    return start, min(start + plan.per_chunk, entry.numel)


def reset_chunk(
    entry: TensorEntry,
    plan: MaskPlan,
    data: torch.Tensor,
    number: int,
    scratch: torch.Tensor,
    values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunk ``number`` of ``data`` (a byte view) copied into ``scratch`` with its masked entries reset.

    If ``values`` is given, the state's masked words of this chunk are stored
    into it first. Returns the part of ``scratch`` that holds the chunk.
    """
    itemsize = entry.dtype.itemsize
    start, stop = chunk_span(entry, plan, number)
    source = data[start * itemsize : stop * itemsize]
    chunk = scratch[: source.numel()]
    chunk.copy_(source)
    low, high = plan.chunk_bounds[number], plan.chunk_bounds[number + 1]
    if low != high:
        words = bytes_as_elements(chunk, entry.dtype.itemsize)
        local = plan.local_index[low:high]
        if values is not None:
            torch.index_select(words, 0, local, out=values[low:high])
        words.index_copy_(0, local, plan.base_masked[low:high])
    return chunk


def scan(
    entry: TensorEntry, plan: MaskPlan, tensor: torch.Tensor, scratch: torch.Tensor | None
) -> tuple[torch.Tensor, list[int]]:
    """One pass over a contiguous ``tensor``: its masked words, and the chunks that differ from the base.

    ``scratch`` (CPU bytes, at least one chunk) is needed only where ``runs_native``
    is false; callers scanning in parallel must give each scan its own, or hold a lock.
    """
    values = torch.empty_like(plan.base_masked)
    data = byte_view(tensor)
    if _native is not None and runs_native(tensor):
        differing: list[int] = _native.masked_scan(
            data.numpy(),
            entry.dtype.itemsize,
            plan.per_chunk,
            plan.index.numpy(),
            plan.base_masked.numpy(),
            values.numpy(),
            plan.chunk_digests,
        )
        return values, differing
    if scratch is None:
        raise ValueError(f"tensor {entry.name!r}: the torch scan needs a scratch buffer")  # a bug, not user input
    on_cpu = tensor.device.type == "cpu"
    itemsize = entry.dtype.itemsize
    differing = []
    for number, (start, stop) in enumerate(chunk_ranges(entry.numel, plan.per_chunk)):
        if plan.chunk_bounds[number] == plan.chunk_bounds[number + 1] and on_cpu:
            chunk = data[start * itemsize : stop * itemsize]  # no masked entries: hash the state's own memory
        else:
            chunk = reset_chunk(entry, plan, data, number, scratch, values)
        if digest_of(chunk) != entry.chunk_digests[number]:
            differing.append(number)
    return values, differing
