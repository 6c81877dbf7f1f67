"""The store seen through one process's shards: the local layout, a sharded step's parts, and resharding.

A process of sharded training (FSDP2) holds a flat range of each tensor (fishckpt/sharding.py).
``Shard`` is the store restricted to those ranges: a ``StoreLayout`` whose tensors are the
ranges, whose mask is the mask's entries inside them, and whose base is a view of the base file.
Everything a save or a load does (the exact check, the gather, coding, the checked copy, O(k)
switching) then runs on it unchanged. A part file is a step file of that local layout; a
sharded step is read by decoding every part and placing its values where its ranges say, so a
step saved by any number of ranks loads on any number (docs/format.md, "Sharded steps").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from ..errors import FormatError, IntegrityError
from ..format import codec, digests
from ..format.bits import byte_view
from ..format.codec import Section
from ..format.manifest import Manifest, TensorEntry
from ..format.stepfile import PART_RANGES, StepFile
from ..mask import Mask
from .layout import StoreLayout
from .stepcodec import Change, Decoded
from .table import MaskTable

I64 = npt.NDArray[np.int64]


@dataclass
class Shard:
    """The store restricted to flat ranges ``[starts[row], stops[row])`` of each mask-table row.

    ``value_spans[row]`` are the byte offsets of the row's masked values inside the whole
    store's value buffer: the shard's values are those spans, end to end, in row order.
    ``checked``: the layout carries chunk digests of its ranges, so the exact check and the
    checked copy can run on it; a layout built only to decode a part has none.
    """

    layout: StoreLayout
    starts: I64
    stops: I64
    value_spans: I64  # (rows, 2)
    checked: bool

    @property
    def ranges(self) -> I64:
        return np.stack([self.starts, self.stops], axis=1)

    def gather(self, values: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """The shard's masked values, taken from a whole-store value buffer."""
        pieces = [values[lo:hi] for lo, hi in self.value_spans if hi > lo]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint8)

    def place(self, local: npt.NDArray[np.uint8], values: npt.NDArray[np.uint8]) -> None:
        """Writes the shard's masked values ``local`` into their places in a whole-store value buffer."""
        offset = 0
        for lo, hi in self.value_spans:
            if hi > lo:
                values[lo:hi] = local[offset : offset + hi - lo]
                offset += hi - lo


def build(parent: StoreLayout, starts: I64, stops: I64, *, checked: bool) -> Shard:
    """The shard of the store ``parent`` that holds ``[starts[row], stops[row])`` of each table row.

    With ``checked``, its chunk digests are made: where a local chunk is a chunk of the base's own
    chunking, the recorded digest is used as it is; otherwise the base chunks it overlaps are
    first checked against their recorded digests (so a damaged base is never baked in) and the
    local chunk is hashed. That reads the base's part of the range once, when a chunk boundary
    falls inside it.
    """
    table = parent.table
    base = parent.base()
    parent_values = parent.base_values()  # checked against the masked digest: a damaged base stops here
    entries: list[TensorEntry] = []
    indices: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    local_base: dict[str, torch.Tensor] = {}
    spans = np.zeros((len(table.entries), 2), dtype=np.int64)
    for row, entry in enumerate(table.entries):
        start, stop = int(starts[row]), int(stops[row])
        index = table.index[table.index_starts[row] : table.index_starts[row + 1]]
        first, last = np.searchsorted(index, [start, stop])
        offset, itemsize = int(table.value_offsets[row]), entry.dtype.itemsize
        spans[row] = (offset + int(first) * itemsize, offset + int(last) * itemsize)
        view = base[entry.name].reshape(-1)[start:stop]
        local_base[entry.name] = view
        chunks = _local_chunk_digests(parent, row, start, stop, view) if checked else []
        entries.append(TensorEntry(entry.name, entry.dtype, (stop - start,), None, chunks))
        if entry.name in parent.mask:
            indices[entry.name] = torch.from_numpy(index[first:last] - start)
            shapes[entry.name] = (stop - start,)
    ranges = np.stack([starts, stops], axis=1)
    manifest = Manifest(
        entries,
        parent.manifest.chunk_bytes,
        digests.part_mask_digest(parent.manifest.mask_digest, ranges),
        parent.manifest.created,
        version=2,
        store_id=parent.manifest.store_id,
    )
    manifest.__dict__["base_digest"] = parent.manifest.base_digest  # the store's base, not a base of its own
    values = [parent_values[lo:hi] for lo, hi in spans if hi > lo]
    layout = StoreLayout(
        parent.storage,
        manifest,
        Mask(indices, shapes),
        base=local_base,
        base_values=np.concatenate(values) if values else np.zeros(0, dtype=np.uint8),
    )
    return Shard(layout, starts.copy(), stops.copy(), spans, checked)


def value_spans(table: MaskTable, starts: I64, stops: I64) -> I64:
    """Byte offsets ``[lo, hi)`` in a whole-store value buffer of the masked values inside each row's range."""
    spans = np.zeros((len(table.entries), 2), dtype=np.int64)
    for row in range(len(table.entries)):
        index = table.index[table.index_starts[row] : table.index_starts[row + 1]]
        first, last = np.searchsorted(index, [int(starts[row]), int(stops[row])])
        offset, itemsize = int(table.value_offsets[row]), int(table.itemsizes[row])
        spans[row] = (offset + int(first) * itemsize, offset + int(last) * itemsize)
    return spans


def _local_chunk_digests(parent: StoreLayout, row: int, start: int, stop: int, view: torch.Tensor) -> list[bytes]:
    entry = parent.table.entries[row]
    per_chunk = int(parent.table.chunk_elements[row])
    if stop == start:
        return [digests.of_bytes(b"")]  # an empty tensor has one (empty) chunk, as in the base
    out = []
    for low in range(start, stop, per_chunk):
        high = min(low + per_chunk, stop)
        number = low // per_chunk
        if low % per_chunk == 0 and high == min(low + per_chunk, entry.numel):
            out.append(entry.chunk_digests[number])  # the base's own chunk
            continue
        for overlapped in range(number, (high - 1) // per_chunk + 1):
            parent.check_base_chunk(entry, overlapped)
        out.append(digests.of_tensor_bytes(byte_view(view[low - start : high - start])))
    return out


# A part's ranges ----------------------------------------------------------------------------------


def ranges_section(shard: Shard) -> Section:
    """The part's ranges as stored: (start, stop) of each table row, little-endian int64, compressed."""
    return codec.compress(np.ascontiguousarray(shard.ranges, dtype="<i8").tobytes())


def read_ranges(parent: StoreLayout, file: StepFile, *, where: str) -> tuple[I64, I64]:
    """A part file's ranges, checked to lie inside their tensors."""
    raw = np.frombuffer(file.section(PART_RANGES), dtype="<i8")
    rows = len(parent.table.entries)
    if raw.size != 2 * rows:
        raise FormatError(f"{where}: the part's ranges name {raw.size // 2} tensors, the store has {rows}")
    pairs = raw.reshape(rows, 2).astype(np.int64)
    starts, stops = pairs[:, 0].copy(), pairs[:, 1].copy()
    if bool(((starts < 0) | (stops < starts) | (stops > parent.table.numels)).any()):
        raise FormatError(f"{where}: a range of the part lies outside its tensor")
    return starts, stops


def check_coverage(numels: I64, names: list[str], parts: list[tuple[I64, I64]], *, where: str) -> None:
    """Raises unless the parts' ranges cover every element of every tensor exactly once.

    Args:
        numels: Each row's element count; ``names`` name the rows in errors.
        parts: Each part's ``(starts, stops)``, one entry per row.
    """
    rows, starts, stops = [], [], []
    for part_starts, part_stops in parts:
        held = np.flatnonzero(part_stops > part_starts)
        rows.append(held)
        starts.append(part_starts[held])
        stops.append(part_stops[held])
    row = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    start = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
    stop = np.concatenate(stops) if stops else np.zeros(0, dtype=np.int64)
    order = np.lexsort((start, row))
    row, start, stop = row[order], start[order], stop[order]
    first = np.ones(row.size, dtype=bool)
    first[1:] = row[1:] != row[:-1]
    last = np.ones(row.size, dtype=bool)
    last[:-1] = row[1:] != row[:-1]
    follows = np.ones(row.size, dtype=bool)
    follows[1:] = first[1:] | (start[1:] == stop[:-1])
    covered = np.zeros(numels.size, dtype=bool)
    covered[row[last]] = True
    ok = (
        bool((start[first] == 0).all())
        and bool(follows.all())
        and bool((stop[last] == numels[row[last]]).all())
        and bool((covered | (numels == 0)).all())
    )
    if not ok:
        holes = [names[int(r)] for r in np.flatnonzero(~(covered | (numels == 0)))[:3]]
        raise IntegrityError(
            f"{where}: the parts of this sharded step do not cover every tensor exactly once"
            + (f" (nothing holds {', '.join(map(repr, holes))})" if holes else " (two parts hold the same entries)")
            + "; the step is incomplete or mixed with parts of another save: delete it"
        )


# Moving a decoded step between the whole store and a shard ------------------------------------------


def localize(shard: Shard, decoded: Decoded) -> Decoded:
    """The part of a whole-store decoded step that falls in ``shard`` (for writing it into local tensors)."""
    changes: dict[str, Change] = {}
    table = shard.layout.table
    for name, change in decoded.changes.items():
        row = table.row_of[name]
        start, stop = int(shard.starts[row]), int(shard.stops[row])
        inside = (change.positions >= start) & (change.positions < stop)
        if bool(inside.any()):
            changes[name] = Change(change.positions[inside] - start, change.words[inside])
    return Decoded(decoded.where, decoded.record, decoded.file, shard.gather(decoded.values), changes)


def place_changes(shard: Shard, local: Decoded, into: dict[str, list[Change]]) -> None:
    """Adds a decoded part's outside-mask changes, in whole-tensor positions, to ``into``."""
    table = shard.layout.table
    for name, change in local.changes.items():
        start = int(shard.starts[table.row_of[name]])
        into.setdefault(name, []).append(Change(change.positions + start, change.words))


def merge_changes(parent: StoreLayout, found: dict[str, list[Change]]) -> dict[str, Change]:
    """Each tensor's changes from every part, as one ascending record, in manifest order."""
    merged: dict[str, Change] = {}
    for name in sorted(found, key=lambda name: parent.position[name]):
        pieces = found[name]
        positions = torch.cat([piece.positions for piece in pieces])
        words = torch.cat([piece.words for piece in pieces])
        order = torch.argsort(positions)
        merged[name] = Change(positions[order], words[order])
    return merged
