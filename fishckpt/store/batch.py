"""Work over every tensor of a state at once: gather, scatter, the exact check and checked copies.

Each function takes a ``MaskTable`` and one tensor per row. Rows whose tensor is a
contiguous CPU tensor go to one call of the C extension (store/_native.c), split in
two halves by bytes and run on two threads with the GIL released; the rest (CUDA
tensors, non-contiguous ones, or everything when the extension was not built) go
through the same work in torch, one tensor at a time. Both give identical bytes.

This is what keeps the per-tensor cost of a save or a load to a few microseconds:
a mixture-of-experts state has tens of thousands of tensors (docs/benchmarks.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from ..format.bits import byte_view, bytes_as_elements, element_words, plain
from ..format.digests import chunk_ranges
from ..format.digests import of_tensor_bytes as digest_of
from . import native, scan
from .table import MaskTable

Values = npt.NDArray[np.uint8]
Pairs = list[tuple[int, int]]

_TWO_THREADS_FROM = 8 << 20  # bytes of tensors (a scan, a checked copy) below which one thread does it faster
# Masked elements (a gather, a scatter) below which one thread does it faster: each element is a
# cache miss of ~25 ns, so 64k of them take ~1.5 ms, well above a thread hand-off's ~50 µs.
_TWO_THREADS_FROM_ELEMENTS = 1 << 16
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fishckpt")
        return _pool


def _c() -> ModuleType:
    """The C extension; callers reach here only when ``Rows`` found rows for it."""
    assert native.module is not None
    return native.module


def native_row(tensor: torch.Tensor | None) -> bool:
    """Whether a row's tensor can go to the C extension: built, and the tensor is contiguous in CPU memory."""
    return native.module is not None and tensor is not None and _plain_cpu(tensor)


def _plain_cpu(tensor: torch.Tensor) -> bool:
    # A conjugate or negative view (``x.conj().imag``) holds other bits than its values.
    return tensor.is_cpu and tensor.is_contiguous() and not tensor.is_conj() and not tensor.is_neg()


class Rows:
    """One tensor per table row, with the data addresses of the rows the C extension takes (0 for the others).

    Build it once per set of tensors: finding which rows C can take is most of the
    per-tensor cost of a save (~0.4 µs a tensor, kept to one loop of attribute reads).
    """

    __slots__ = ("addresses", "fallback", "tensors")

    def __init__(self, tensors: Sequence[torch.Tensor], *, only: Collection[int] | None = None) -> None:
        """``only``: the rows to work on (default: all); the others are left alone by every function."""
        self.tensors = tensors
        fallback: list[int] = []
        if native.module is None:
            addresses = [0] * len(tensors)
            fallback.extend(range(len(tensors)) if only is None else sorted(only))
        elif only is None:
            addresses = []
            address = addresses.append
            for row, tensor in enumerate(tensors):  # _plain_cpu inlined: a call per tensor costs 0.1 µs
                if tensor.is_cpu and tensor.is_contiguous() and not tensor.is_conj() and not tensor.is_neg():
                    address(tensor.data_ptr())
                else:
                    address(0)
                    fallback.append(row)
        else:
            addresses = [0] * len(tensors)
            for row in sorted(only):
                if _plain_cpu(tensors[row]):
                    addresses[row] = tensors[row].data_ptr()
                else:
                    fallback.append(row)
        self.addresses = np.array(addresses, dtype=np.uint64)
        self.fallback = fallback

    @classmethod
    def fresh(cls, tensors: Sequence[torch.Tensor]) -> Rows:
        """Rows of tensors just allocated with ``torch.empty`` on the CPU: contiguous and plain, so
        only their addresses are read (a fraction of a microsecond per tensor, for loads of
        tens of thousands of tensors)."""
        if native.module is None:
            return cls(tensors)
        found = cls.__new__(cls)
        found.tensors = tensors
        found.addresses = np.fromiter(map(torch.Tensor.data_ptr, tensors), dtype=np.uint64, count=len(tensors))
        found.fallback = []
        return found

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def any_native(self) -> bool:
        return len(self.fallback) < len(self.tensors)


def rows(tensors: Sequence[torch.Tensor] | Rows) -> Rows:
    return tensors if isinstance(tensors, Rows) else Rows(tensors)


def _halves(sizes: npt.NDArray[np.int64], threshold: int = _TWO_THREADS_FROM) -> list[tuple[int, int]]:
    """Row ranges for the threads: two halves of about equal ``sizes``, or one range below ``threshold``."""
    rows = len(sizes)
    total = int(sizes.sum())
    if rows < 2 or total < threshold:
        return [(0, rows)]
    split = int(np.searchsorted(np.cumsum(sizes), total / 2)) + 1
    split = min(max(split, 1), rows - 1)
    return [(0, split), (split, rows)]


def _run(ranges: list[tuple[int, int]], call: Callable[[int, int], Any]) -> list[Any]:
    if len(ranges) == 1:
        return [call(*ranges[0])]
    return list(_executor().map(lambda bounds: call(*bounds), ranges))


def _value_addresses(table: MaskTable, values: Values) -> npt.NDArray[np.uint64]:
    return np.uint64(values.ctypes.data) + table.value_offsets[:-1].astype(np.uint64)


def _row_words(table: MaskTable, values: Values, row: int) -> torch.Tensor:
    return bytes_as_elements(torch.from_numpy(table.row_values(values, row)), int(table.itemsizes[row]))


def _nbytes(table: MaskTable) -> npt.NDArray[np.int64]:
    return table.numels * table.itemsizes


# Gather and scatter -----------------------------------------------------------------------------


def gather(
    table: MaskTable,
    tensors: Sequence[torch.Tensor] | Rows,
    values: Values,
    *,
    index_on: Callable[[int, torch.device], torch.Tensor] | None = None,
    pinned: Callable[[int], torch.Tensor] | None = None,
) -> None:
    """Copies every tensor's masked elements into ``values`` (the table's buffer layout).

    ``index_on(row, device)`` gives a row's indices on a device, for tensors not on the CPU.
    The masked values of all tensors on one device are gathered there into one buffer and
    cross to the host in one copy, into ``pinned(nbytes)`` (a reused page-locked buffer) if given.
    """
    found = rows(tensors)
    if found.any_native:
        targets = _value_addresses(table, values)
        args = (found.addresses, table.numels, table.itemsizes, table.index_starts, table.index, targets)
        _run(
            _halves(np.diff(table.index_starts), _TWO_THREADS_FROM_ELEMENTS),
            lambda a, b: _c().gather_table(a, b, *args),
        )
    by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for row in found.fallback:
        tensor = plain(found.tensors[row].detach())
        index = table.row_index(row)
        if not tensor.is_cpu:
            index = index_on(row, tensor.device) if index_on is not None else index.to(tensor.device)
        words = element_words(tensor.contiguous()).index_select(0, index)
        if tensor.is_cpu:
            _row_words(table, values, row).copy_(words)
        else:
            by_device.setdefault(tensor.device, []).append((row, words.reshape(-1).view(torch.uint8)))
    for parts in by_device.values():
        on_device = torch.cat([part for _, part in parts])
        host = (
            pinned(on_device.numel())[: on_device.numel()]
            if pinned is not None
            else torch.empty_like(on_device, device="cpu")
        )
        host.copy_(on_device)  # one device-to-host copy of O(k) bytes
        offset = 0
        for row, part in parts:
            size = part.numel()
            table.row_values(values, row)[:] = host[offset : offset + size].numpy()
            offset += size


def scatter(
    table: MaskTable,
    tensors: Sequence[torch.Tensor] | Rows,
    values: Values,
    *,
    index_on: Callable[[int, torch.device], torch.Tensor] | None = None,
    read_back: bool = False,
) -> int | None:
    """Writes ``values`` (the table's buffer layout) into every tensor at its masked positions, in place.

    Tensors that are not contiguous are written through a contiguous copy. With ``read_back``,
    what was written is read back and compared with ``values``, a few thousand elements at a
    time just after writing them (while they are in cache: a second pass over 1 GiB would miss
    it and cost as much as the writes); returns the first row whose memory does not hold its
    values, or None. Where rows share memory (``overlapping``), a later row's writes can change
    an earlier row's after it was read back: the caller checks those rows once all is written.
    """
    found = rows(tensors)
    unwritten: list[int] = []
    if found.any_native:
        sources = _value_addresses(table, values)
        args = (found.addresses, table.numels, table.itemsizes, table.index_starts, table.index, sources)
        move = _c().scatter_checked_table if read_back else _c().scatter_table
        results = _run(_halves(np.diff(table.index_starts), _TWO_THREADS_FROM_ELEMENTS), lambda a, b: move(a, b, *args))
        unwritten.extend(row for row in results if read_back and row >= 0)
    for row in found.fallback:
        tensor = found.tensors[row].detach()
        index = table.row_index(row)
        if not tensor.is_cpu:
            index = index_on(row, tensor.device) if index_on is not None else index.to(tensor.device)
        words = _row_words(table, values, row).to(tensor.device)
        work = tensor if tensor.is_contiguous() else tensor.contiguous()
        element_words(work).index_copy_(0, index, words)
        if work is not tensor:
            tensor.copy_(work)
        if read_back and not torch.equal(element_words(plain(tensor).contiguous()).index_select(0, index), words):
            unwritten.append(row)
    return min(unwritten) if unwritten else None


def overlapping(table: MaskTable, found: Rows) -> list[tuple[int, int]]:
    """Every pair of rows whose tensors share memory (lower row first): none, in almost every state.

    Each row's bytes span an address range on its device. Contiguous rows whose ranges meet
    share memory; where a non-contiguous row is one of them (interleaved columns of one buffer,
    say), its elements are compared one by one. The C extension's rows (most of a state) cost
    a sort in numpy; the others are looked at one by one.
    """
    nbytes = _nbytes(table)
    taken = (found.addresses != 0) & (nbytes > 0)
    rows_of = {torch.device("cpu"): [np.flatnonzero(taken)]}
    starts_of = {torch.device("cpu"): [found.addresses[taken].astype(np.int64)]}
    for row in found.fallback:
        tensor = found.tensors[row]
        if nbytes[row]:
            nbytes[row] = (_last_element(tensor) + 1) * tensor.element_size()  # the span
            rows_of.setdefault(tensor.device, []).append(np.array([row]))
            starts_of.setdefault(tensor.device, []).append(np.array([tensor.data_ptr()], dtype=np.int64))
    pairs: list[tuple[int, int]] = []
    for device, parts in rows_of.items():
        rows = np.concatenate(parts)
        starts = np.concatenate(starts_of[device])
        order = np.argsort(starts, kind="stable")
        rows, starts = rows[order], starts[order]
        stops = starts + nbytes[rows]
        # Rows after position i that start before row i stops: none for disjoint contiguous rows.
        reach = np.searchsorted(starts, stops, side="left")
        ranges: dict[int, tuple[npt.NDArray[np.int64], int]] = {}  # one strided view may meet many rows
        for position in np.flatnonzero(reach > np.arange(len(rows)) + 1):
            for other in range(position + 1, int(reach[position])):
                first, second = sorted((int(rows[position]), int(rows[other])))
                for row in (first, second):
                    if row not in ranges:
                        ranges[row] = _byte_ranges(found.tensors[row])
                if _share_bytes(ranges[first], ranges[second]):
                    pairs.append((first, second))
    return sorted(pairs)


def _share_bytes(first: tuple[npt.NDArray[np.int64], int], second: tuple[npt.NDArray[np.int64], int]) -> bool:
    """Whether two tensors' byte ranges (``_byte_ranges``) have a byte in common."""
    (starts, width), (others, other_width) = first, second
    # For each range of the second: the last range of the first that starts before it ends.
    before = np.searchsorted(starts, others + other_width, side="left") - 1
    return bool(((before >= 0) & (starts[np.maximum(before, 0)] + width > others)).any())


def _byte_ranges(tensor: torch.Tensor) -> tuple[npt.NDArray[np.int64], int]:
    """A tensor's bytes as sorted, disjoint ranges of one width: the whole tensor, or one per element."""
    if tensor.is_contiguous():
        return np.array([tensor.data_ptr()], dtype=np.int64), tensor.numel() * tensor.element_size()
    positions = torch.arange(_last_element(tensor) + 1, dtype=torch.int64).as_strided(tensor.shape, tensor.stride())
    return np.unique(positions.reshape(-1).numpy()) * tensor.element_size() + tensor.data_ptr(), tensor.element_size()


def _last_element(tensor: torch.Tensor) -> int:
    """How many elements past its first the tensor's last one lies (torch strides are never negative)."""
    return sum((extent - 1) * step for extent, step in zip(tensor.shape, tensor.stride(), strict=True))


# The exact check --------------------------------------------------------------------------------


def scan_all(
    table: MaskTable,
    tensors: Sequence[torch.Tensor] | Rows,
    values: Values,
    base_values: Values,
    *,
    row_plan: Callable[[int], scan.RowPlan],
    scratch: Callable[[], torch.Tensor],
    scratch_lock: threading.Lock,
) -> Pairs:
    """The exact check of every tensor: gathers masked values into ``values``; returns the (row, chunk) that differ."""
    found = rows(tensors)
    differing: Pairs = []
    if found.any_native:
        args = (
            found.addresses,
            table.numels,
            table.itemsizes,
            table.index_starts,
            table.index,
            _value_addresses(table, values),
            _value_addresses(table, base_values),
            table.chunk_elements,
            table.digest_starts,
            table.digests,
        )
        for pairs in _run(_halves(_nbytes(table)), lambda a, b: _c().scan_table(a, b, *args)):
            differing.extend(pairs)
    for row in found.fallback:
        entry = table.entries[row]
        tensor = plain(found.tensors[row].detach()).contiguous()
        with scratch_lock:
            words, chunks = scan.scan(entry, row_plan(row), tensor, scratch())
        _row_words(table, values, row).copy_(words.cpu())
        differing.extend((row, chunk) for chunk in chunks)
    return sorted(differing)


# Checked copies ---------------------------------------------------------------------------------


def _chunk_bytes(table: MaskTable) -> npt.NDArray[np.int64]:
    return table.chunk_elements * table.itemsizes


def copy_check(
    table: MaskTable,
    targets: Sequence[torch.Tensor | None] | Rows,
    sources: Sequence[torch.Tensor] | Rows,
    *,
    verify: bool = True,
) -> Pairs:
    """Copies each base tensor ``sources[row]`` into ``targets[row]`` (contiguous CPU, or None to only hash) and
    hashes every chunk of what was copied against the manifest; returns (row, first failing chunk) per failing row.

    Hashing the copy, not the source, proves the bytes the caller gets; copying and hashing
    one block at a time reads the source from memory once. ``verify=False`` only copies.
    """
    found = rows(sources)
    source_addresses, fallback = found.addresses.copy(), set(found.fallback)
    if isinstance(targets, Rows):
        target_list: Sequence[torch.Tensor | None] = targets.tensors
        target_addresses = targets.addresses.copy()
        fallback.update(targets.fallback)
    else:
        target_list = targets
        target_addresses = np.zeros(len(found), dtype=np.uint64)
        for row, target in enumerate(targets):
            if target is None:
                continue
            if native_row(target):
                target_addresses[row] = target.data_ptr()
            else:
                fallback.add(row)
    for row in fallback:
        source_addresses[row] = 0
    failing: Pairs = []
    if native.module is not None and source_addresses.any():
        args = (
            target_addresses,
            source_addresses,
            _nbytes(table),
            _chunk_bytes(table),
            table.digest_starts,
            table.digests,
            verify,
        )
        for pairs in _run(_halves(_nbytes(table)), lambda a, b: _c().copy_check(a, b, *args)):
            failing.extend(pairs)
    for row in sorted(fallback):
        entry = table.entries[row]
        target = target_list[row]
        data = byte_view(plain(found.tensors[row].detach()).contiguous().cpu())
        if target is not None:
            byte_view(target).copy_(data)
            data = byte_view(target)
        if not verify:
            continue
        per_chunk = int(_chunk_bytes(table)[row])
        for number, (start, stop) in enumerate(chunk_ranges(data.numel(), per_chunk)):
            if digest_of(data[start:stop]) != entry.chunk_digests[number]:
                failing.append((row, number))
                break
    return sorted(failing)


def check_chunks(table: MaskTable, tensors: Sequence[torch.Tensor] | Rows) -> Pairs:
    """Hashes every chunk of each tensor in place against the manifest; (row, first failing chunk) per failing row."""
    found = rows(tensors)
    return copy_check(table, [None] * len(found), found)
