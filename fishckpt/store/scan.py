"""The exact check at save, one tensor at a time in torch: the fallback of the C scan (store/_native.c).

A state changed nothing outside the mask exactly when, for every hashing chunk,
the chunk with its masked entries reset to the base's values has the base
chunk's digest (docs/exactness.md). The same pass gathers the masked values.

``store/batch.py`` runs the C extension over whole tables of tensors with the GIL
released. Where it was not built (no compiler at install time), or for a tensor
not in CPU memory, the loop below does the same with torch ops and a scratch
buffer. Both give the same values and the same differing chunks; tests/test_scan.py
holds them to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..format.bits import byte_view, bytes_as_elements
from ..format.digests import chunk_ranges
from ..format.digests import of_tensor_bytes as digest_of
from ..format.manifest import TensorEntry


@dataclass
class RowPlan:
    """One tensor's mask indices split by hashing chunk, with the base's words there (built when needed)."""

    index: torch.Tensor  # sorted flat indices (int64)
    per_chunk: int  # elements per hashing chunk
    chunk_bounds: list[int]  # index[bounds[c]:bounds[c+1]] fall in hashing chunk c
    local_index: torch.Tensor  # index minus its chunk's first element
    base_words: torch.Tensor  # the base's element words at index

    @classmethod
    def build(cls, entry: TensorEntry, index: torch.Tensor, base_words: torch.Tensor, per_chunk: int) -> RowPlan:
        edges = torch.arange(0, max(entry.numel, 1) + per_chunk, per_chunk)
        chunk_of = torch.div(index, per_chunk, rounding_mode="floor")
        return cls(
            index=index,
            per_chunk=per_chunk,
            chunk_bounds=torch.searchsorted(index, edges).tolist(),
            local_index=index - chunk_of * per_chunk,
            base_words=base_words,
        )

    def span(self, entry: TensorEntry, number: int) -> tuple[int, int]:
        """Element range [start, stop) of hashing chunk ``number``."""
        start = number * self.per_chunk
        return start, min(start + self.per_chunk, entry.numel)


def reset_chunk(
    entry: TensorEntry,
    plan: RowPlan,
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
    start, stop = plan.span(entry, number)
    source = data[start * itemsize : stop * itemsize]
    chunk = scratch[: source.numel()]
    chunk.copy_(source)
    low, high = plan.chunk_bounds[number], plan.chunk_bounds[number + 1]
    if low != high:
        words = bytes_as_elements(chunk, itemsize)
        local = plan.local_index[low:high]
        if values is not None:
            torch.index_select(words, 0, local, out=values[low:high])
        words.index_copy_(0, local, plan.base_words[low:high])
    return chunk


def scan(
    entry: TensorEntry, plan: RowPlan, tensor: torch.Tensor, scratch: torch.Tensor
) -> tuple[torch.Tensor, list[int]]:
    """One pass over a contiguous ``tensor`` in torch: its masked words, and the chunks that differ from the base.

    ``scratch`` is CPU bytes of at least one chunk; callers scanning in parallel
    must give each scan its own, or hold a lock.
    """
    values = torch.empty_like(plan.base_words)
    data = byte_view(tensor)
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
