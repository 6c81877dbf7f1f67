"""What a save reads from the live state: the checks on it, the masked values, and every change outside the mask."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from ..errors import InvalidArgumentError, StateMismatchError
from ..format.bits import byte_view, bytes_as_elements, contiguous, differs, element_words, plain
from ..format.manifest import TensorEntry
from . import batch, devicecheck, scan
from .layout import StoreLayout
from .stepcodec import Change

StateLike = Mapping[str, torch.Tensor] | torch.nn.Module


@dataclass
class Captured:
    """A state's masked values (the mask table's byte layout) and its changes outside the mask, by tensor."""

    values: npt.NDArray[np.uint8]
    changes: dict[str, Change]  # in manifest order


def state_of(state: StateLike) -> dict[str, torch.Tensor]:
    """The state dict of a module (its own tensor objects), or a copy of a mapping's items."""
    if isinstance(state, torch.nn.Module):
        return dict(state.state_dict(keep_vars=True))
    if not isinstance(state, Mapping):
        raise InvalidArgumentError(f"expected a state dict or an nn.Module, got {type(state).__name__}")
    return dict(state)


def validated(layout: StoreLayout, state: dict[str, torch.Tensor], *, where: str) -> list[torch.Tensor]:
    """The tensors of ``state`` in mask-table row order, checked key by key against the base (~1 µs each).

    They are the caller's own tensor objects (Parameters for a module), not detached copies.

    Raises:
        StateMismatchError: A key is missing or extra, a shape or dtype differs, tied keys came apart,
            or a value is not a dense tensor that holds data.
    """
    entries = layout.entries
    if state.keys() != entries.keys():
        missing = [name for name in entries if name not in state]
        extra = [name for name in state if name not in entries]
        parts = []
        if missing:
            parts.append(f"missing key(s) {missing[:5]}")
        if extra:
            parts.append(f"unexpected key(s) {extra[:5]}")
        raise StateMismatchError(
            f"{where}: state does not match the store's base: {'; '.join(parts)}. "
            "Save the same model the store was created from"
        )
    out = []
    strided, tensor_type = torch.strided, torch.Tensor
    for name, dtype, shape in layout.row_specs:
        tensor = state[name]
        if not isinstance(tensor, tensor_type) or tensor.layout is not strided or tensor.is_meta:
            check_tensor(name, tensor)
        if tensor.dtype is not dtype or tensor.shape != shape:
            raise StateMismatchError(
                f"key {name!r}: state has {tensor.dtype} {tuple(tensor.shape)}, the base has "
                f"{dtype} {tuple(shape)}; cast or reshape it to match"
            )
        out.append(tensor)
    for name, entry in layout.aliases:
        tied, source = state[name], state[entry.alias_of]  # type: ignore[index]
        check_tensor(name, tied)
        if tied.dtype is not entry.dtype.torch_dtype or tied.shape != layout.torch_shapes[name]:
            raise StateMismatchError(f"key {name!r}: state has {tied.dtype} {tuple(tied.shape)}, unlike the base")
        same_view = (
            tied.data_ptr() == source.data_ptr() and tied.stride() == source.stride() and tied.device == source.device
        )
        if not same_view and not torch.equal(
            element_words(plain(tied.detach()).contiguous()), element_words(plain(source.detach()).contiguous())
        ):
            raise StateMismatchError(
                f"key {name!r} was tied to {entry.alias_of!r} in the base but now differs from it; "
                "keep the weights tied, or create a new store from an untied base"
            )
    return out


def check_tensor(name: str, tensor: object) -> None:
    """Refuses what is not a dense tensor holding data (StateMismatchError, naming the key)."""
    if not isinstance(tensor, torch.Tensor):
        raise StateMismatchError(f"key {name!r}: expected a tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise StateMismatchError(
            f"key {name!r}: {tensor.layout} tensors are not supported; make it dense with .to_dense()"
        )
    if tensor.is_meta:
        raise StateMismatchError(f"key {name!r} is on the meta device and holds no data; materialise it first")


def collect(
    layout: StoreLayout, tensors: list[torch.Tensor], *, check: bool, device_check: bool | None = None
) -> Captured:
    """Gathers the masked values of ``tensors`` (table rows) and, if ``check``, every change outside the mask.

    ``device_check`` picks the exact check's method: the xxh3 scan (on the host) or the
    checksum computed where the tensor lives (store/devicecheck.py). None: the checksum
    for tensors off the CPU, the scan for the others; True: the checksum for all.
    """
    table = layout.table
    values = table.new_values()
    if not check:
        batch.gather(table, batch.Rows(tensors), values, index_on=layout.row_index_on, pinned=layout.pinned)
        return Captured(values, {})
    on_device = {
        row
        for row, tensor in enumerate(tensors)
        if device_check is True or (device_check is None and not tensor.is_cpu)
    }
    differing = batch.scan_all(
        table,
        batch.Rows(tensors, only=None if not on_device else set(range(len(tensors))) - on_device),
        values,
        layout.base_values(),
        row_plan=layout.row_plan,
        scratch=layout.scratch,
        scratch_lock=layout.scratch_lock,
    )
    if on_device:
        batch.gather(
            table, batch.Rows(tensors, only=on_device), values, index_on=layout.row_index_on, pinned=layout.pinned
        )
        for row in sorted(on_device):
            tensor = contiguous(plain(tensors[row].detach()))
            index = layout.row_index_on(row, tensor.device)
            chunks = devicecheck.differing_chunks(
                table.entries[row],
                tensor,
                index,
                element_words(tensor).index_select(0, index),
                layout.device_base_words(row, tensor.device),
                layout.base_sums(row),
                int(table.chunk_elements[row]),
            )
            differing.extend((row, chunk) for chunk in chunks)
    by_row: dict[int, list[int]] = {}
    for row, chunk in differing:
        by_row.setdefault(row, []).append(chunk)
    changes = {}
    for row, chunks in by_row.items():
        entry = table.entries[row]
        tensor = contiguous(plain(tensors[row].detach()))
        positions = torch.cat([_chunk_changes(layout, row, number, tensor) for number in chunks])
        index = positions if tensor.is_cpu else positions.to(tensor.device)
        changes[entry.name] = Change(positions, element_words(tensor).index_select(0, index).cpu())
    return Captured(values, dict(sorted(changes.items(), key=lambda item: layout.position[item[0]])))


def _chunk_changes(layout: StoreLayout, row: int, number: int, tensor: torch.Tensor) -> torch.Tensor:
    """Positions in chunk ``number`` where ``tensor``, its masked entries reset, differs from the base."""
    entry: TensorEntry = layout.table.entries[row]
    plan = layout.row_plan(row)
    itemsize = entry.dtype.itemsize
    start, stop = plan.span(entry, number)
    # The base itself may be what changed: never record a damaged base as changes of the state.
    layout.check_base_chunk(entry, number)
    base_chunk = byte_view(layout.base()[entry.name])[start * itemsize : stop * itemsize]
    with layout.scratch_lock:
        chunk = scan.reset_chunk(entry, plan, byte_view(tensor), number, layout.scratch())
        current = bytes_as_elements(chunk, itemsize)
        reference = bytes_as_elements(base_chunk, itemsize)
        where = torch.nonzero(differs(current, reference))
    return where.reshape(-1) + start
