"""What a save reads from the live state: the checks on it, the masked values, and every change outside the mask."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError, StateMismatchError
from ..format.bits import byte_view, bytes_as_elements, contiguous, differs, element_words, plain
from ..format.manifest import TensorEntry
from . import scan
from .layout import StoreLayout

StateLike = Mapping[str, torch.Tensor] | torch.nn.Module


@dataclass
class Captured:
    """A state's masked element words, and its changes outside the mask as (positions, words), per tensor."""

    masked: dict[str, torch.Tensor]
    extras: dict[str, tuple[torch.Tensor, torch.Tensor]]


def state_of(state: StateLike) -> dict[str, torch.Tensor]:
    """The state dict of a module (its own tensor objects), or a copy of a mapping's items."""
    if isinstance(state, torch.nn.Module):
        return dict(state.state_dict(keep_vars=True))
    if not isinstance(state, Mapping):
        raise InvalidArgumentError(f"expected a state dict or an nn.Module, got {type(state).__name__}")
    return dict(state)


def validated(layout: StoreLayout, state: dict[str, torch.Tensor], *, where: str) -> dict[str, torch.Tensor]:
    """Detached tensors of ``state``, checked key by key against the base.

    Raises:
        StateMismatchError: A key is missing or extra, a shape or dtype differs, tied keys came apart,
            or a value is not a dense tensor that holds data.
    """
    entries = layout.entries
    missing = [name for name in entries if name not in state]
    extra = [name for name in state if name not in entries]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing key(s) {missing[:5]}")
        if extra:
            parts.append(f"unexpected key(s) {extra[:5]}")
        raise StateMismatchError(
            f"{where}: state does not match the store's base: {'; '.join(parts)}. "
            "Save the same model the store was created from"
        )
    out = {}
    for name, entry in entries.items():
        tensor = state[name]
        check_tensor(name, tensor)
        if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype.torch_dtype:
            raise StateMismatchError(
                f"key {name!r}: state has {tensor.dtype} {tuple(tensor.shape)}, the base has "
                f"{entry.dtype.torch_dtype} {entry.shape}; cast or reshape it to match"
            )
        out[name] = tensor.detach()
    for name, entry in entries.items():
        if entry.alias_of is not None:
            tied, source = out[name], out[entry.alias_of]
            same_view = (
                tied.data_ptr() == source.data_ptr()
                and tied.stride() == source.stride()
                and tied.device == source.device
            )
            same_bits = same_view or torch.equal(
                element_words(plain(tied).contiguous()), element_words(plain(source).contiguous())
            )
            if not same_bits:
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


def collect(layout: StoreLayout, tensors: dict[str, torch.Tensor], *, check: bool) -> Captured:
    """Gathers masked element words and, if ``check``, every change outside the mask."""
    plans = layout.plans()
    owners = layout.owners
    if not check:
        # index_select releases the GIL, so gathers of different tensors overlap (13 -> 8 ms per GiB here).
        # Each worker makes its own contiguous copy, so at most two exist at once.
        with ThreadPoolExecutor(max_workers=2) as pool:
            gathered = pool.map(
                lambda e: gather(layout, e.name, plans[e.name].index, contiguous(tensors[e.name])), owners
            )
            return Captured({entry.name: values for entry, values in zip(owners, gathered, strict=True)}, {})

    # The C scan releases the GIL, so two tensors scan at once; the torch fallback shares one
    # scratch buffer under a lock. Each worker makes its own contiguous copy: at most two exist.
    def scan_one(entry: TensorEntry) -> tuple[torch.Tensor, list[int]]:
        tensor = contiguous(tensors[entry.name])
        if scan.runs_native(tensor):
            return scan.scan(entry, plans[entry.name], tensor, scratch=None)
        with layout.scratch_lock:
            return scan.scan(entry, plans[entry.name], tensor, layout.scratch())

    with ThreadPoolExecutor(max_workers=2) as pool:
        scanned = list(pool.map(scan_one, owners))
    masked: dict[str, torch.Tensor] = {}
    extras: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for entry, (values, differing) in zip(owners, scanned, strict=True):
        masked[entry.name] = values
        if differing:
            tensor = contiguous(tensors[entry.name])
            positions = torch.cat([_chunk_changes(layout, entry, number, tensor) for number in differing])
            extras[entry.name] = (positions, gather(layout, entry.name, positions, tensor, cache=False))
    return Captured(masked, extras)


def gather(
    layout: StoreLayout, name: str, index: torch.Tensor, tensor: torch.Tensor, *, cache: bool = True
) -> torch.Tensor:
    """Element words of ``tensor`` at ``index``, gathered where the tensor lives; returns CPU words."""
    if tensor.device.type != "cpu":
        device_index = layout.device_index(name, tensor.device) if cache else index.to(tensor.device)
        return element_words(tensor).index_select(0, device_index).cpu()
    return element_words(tensor).index_select(0, index)


def _chunk_changes(layout: StoreLayout, entry: TensorEntry, number: int, tensor: torch.Tensor) -> torch.Tensor:
    """Positions in chunk ``number`` where ``tensor``, its masked entries reset, differs from the base."""
    plan = layout.plans()[entry.name]
    itemsize = entry.dtype.itemsize
    start, stop = scan.chunk_span(entry, plan, number)
    base_chunk = layout.base_bytes(entry)[start * itemsize : stop * itemsize]
    # The base itself may be what changed: never record a damaged base as changes of the state.
    if layout.check_base_chunks(entry, base_chunk, first=number) is not None:
        raise layout.base_chunk_error(entry, number)
    with layout.scratch_lock:
        chunk = scan.reset_chunk(entry, plan, byte_view(tensor), number, layout.scratch())
        current = bytes_as_elements(chunk, itemsize)
        reference = bytes_as_elements(base_chunk, itemsize)
        where = torch.nonzero(differs(current, reference))
    return where.reshape(-1) + start
