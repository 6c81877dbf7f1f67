"""The mask table: every stored tensor once, in the order of the value streams, ready for one C call.

Rows are ordered by word width, then by manifest order: exactly the order of the
value streams (docs/format.md). So the masked values of a whole state are one byte
buffer, each stream is a slice of it, and one call of store/_native.c can walk
every tensor, however many there are (store/batch.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from ..format import digests
from ..format.codec import UINT_BY_WIDTH
from ..format.manifest import Manifest, TensorEntry
from ..mask import Mask

I64 = npt.NDArray[np.int64]


@dataclass
class ValueGroup:
    """The masked values of every tensor whose words have one width: one stream, a byte range of the buffer."""

    width: int
    start: int  # byte offsets in the values buffer
    stop: int
    order: npt.NDArray[np.intp]  # exponent order of the base's words (format.md, "Exponent order")

    @property
    def count(self) -> int:
        return (self.stop - self.start) // self.width


@dataclass
class MaskTable:
    """Every stored tensor, one row each, in stream order, with its masked entries and base chunk digests.

    Arrays are numpy, ready to pass to the C functions of store/_native.c.
    """

    entries: list[TensorEntry]
    row_of: dict[str, int]
    numels: I64
    itemsizes: I64
    index_starts: I64  # row t's mask indices are index[index_starts[t]:index_starts[t + 1]]
    index: I64
    value_offsets: I64  # row t's masked values are bytes [value_offsets[t], value_offsets[t + 1]) of a buffer
    chunk_elements: I64
    digest_starts: I64  # row t's chunk digests are digests[16 * digest_starts[t]: ...]
    digests: bytes
    groups: list[ValueGroup]

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self.entries]

    @property
    def value_bytes(self) -> int:
        return int(self.value_offsets[-1])

    def rows(self) -> range:
        return range(len(self.entries))

    def row_index(self, row: int) -> torch.Tensor:
        """Row ``row``'s mask indices as an int64 tensor (a view)."""
        return torch.from_numpy(self.index[self.index_starts[row] : self.index_starts[row + 1]])

    def row_values(self, values: npt.NDArray[np.uint8], row: int) -> npt.NDArray[np.uint8]:
        return values[self.value_offsets[row] : self.value_offsets[row + 1]]

    def group_words(self, values: npt.NDArray[np.uint8], group: ValueGroup) -> npt.NDArray[np.unsignedinteger]:
        return values[group.start : group.stop].view(UINT_BY_WIDTH[group.width])

    def new_values(self) -> npt.NDArray[np.uint8]:
        return np.empty(self.value_bytes, dtype=np.uint8)


def build_table(manifest: Manifest, mask: Mask) -> MaskTable:
    """The table of a manifest's stored tensors and the mask's indices (no base bytes are read)."""
    owners = [entry for entry in manifest.entries if entry.alias_of is None]
    owners.sort(key=lambda entry: entry.dtype.word_bytes)  # stable: manifest order within a width
    counts = np.array([mask[e.name].numel() if e.name in mask else 0 for e in owners], dtype=np.int64)
    itemsizes = np.array([e.dtype.itemsize for e in owners], dtype=np.int64)
    index_starts = np.zeros(len(owners) + 1, dtype=np.int64)
    np.cumsum(counts, out=index_starts[1:])
    parts = [mask[e.name].numpy() for e in owners if e.name in mask and mask[e.name].numel()]
    index = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    value_offsets = np.zeros(len(owners) + 1, dtype=np.int64)
    np.cumsum(counts * itemsizes, out=value_offsets[1:])
    chunk_counts = np.array([len(e.chunk_digests) for e in owners], dtype=np.int64)
    digest_starts = np.zeros(len(owners) + 1, dtype=np.int64)
    np.cumsum(chunk_counts, out=digest_starts[1:])
    groups: list[ValueGroup] = []
    for row, entry in enumerate(owners):
        width = entry.dtype.word_bytes
        start, stop = int(value_offsets[row]), int(value_offsets[row + 1])
        if stop == start:
            continue
        if groups and groups[-1].width == width:
            groups[-1].stop = stop
        else:
            groups.append(ValueGroup(width, start, stop, np.zeros(0, dtype=np.intp)))
    return MaskTable(
        entries=owners,
        row_of={entry.name: row for row, entry in enumerate(owners)},
        numels=np.array([e.numel for e in owners], dtype=np.int64),
        itemsizes=itemsizes,
        index_starts=index_starts,
        index=index,
        value_offsets=value_offsets,
        chunk_elements=np.array(
            [digests.chunk_elements(e.dtype.itemsize, manifest.chunk_bytes) for e in owners], dtype=np.int64
        ),
        digest_starts=digest_starts,
        digests=b"".join(d for e in owners for d in e.chunk_digests),
        groups=groups,
    )
