"""``CheckpointStore.create``: the base planned from the caller's state (ties found, keys checked),
then written with the mask into a new root, the manifest last."""

from __future__ import annotations

import secrets
import time
from typing import Any

import torch

from ..errors import MaskMismatchError, StateMismatchError
from ..format import digests
from ..format.bits import plain
from ..format.dtypes import DType, dtype_row
from ..format.manifest import Manifest, TensorEntry
from ..format.names import BASE_NAME, MANIFEST_V2, STEPS_DIR, mask_name
from ..mask import Mask
from ..sharding import any_dtensor
from ..storage import Storage
from . import batch, capture
from .basefile import BaseWriter
from .table import build_table


def create(
    storage: Storage,
    state: dict[str, torch.Tensor],
    mask: Mask,
    *,
    replace: bool,
    owned: frozenset[str],
    chunk_bytes: int,
    lock_timeout: float,
) -> Manifest | None:
    """Writes a new store at ``storage``: its manifest, or None for a sharded base (created by every rank together)."""
    if any_dtensor(state.values()):
        from . import sharded

        entries, tensors = plan_base(state, mask, sharded=True)
        sharded.create(
            storage,
            entries,
            tensors,
            mask,
            replace=replace,
            owned=owned,
            chunk_bytes=chunk_bytes,
            lock_timeout=lock_timeout,
        )
        return None
    entries, tensors = plan_base(state, mask)
    with storage.new_root(replace=replace, marker=MANIFEST_V2, owned=owned, timeout=lock_timeout) as staging:
        writer = BaseWriter(tensors, chunk_bytes)
        staging.publish(BASE_NAME, writer.pieces(), overwrite=False)
        for entry in entries:
            entry.chunk_digests = writer.chunk_digests.get(entry.name, []) if entry.alias_of is None else []
        manifest = Manifest(entries, chunk_bytes, mask.digest, time.time(), version=2, store_id=secrets.token_hex(16))
        manifest.masked_digest = _masked_digest(manifest, mask, {name: t for name, t, _ in tensors})
        manifest.k, manifest.numel = mask.k, mask.numel
        staging.publish(mask_name(2), mask.file_bytes(), overwrite=False)
        staging.make_folder(STEPS_DIR)
        # The manifest goes last: a folder without it is never taken for a store.
        staging.publish(MANIFEST_V2, manifest.pack(), overwrite=False)
    return manifest


def _masked_digest(manifest: Manifest, mask: Mask, tensors: dict[str, torch.Tensor]) -> str:
    table = build_table(manifest, mask)
    values = table.new_values()
    batch.gather(table, [tensors[entry.name] for entry in table.entries], values)
    return digests.masked_digest(values)


def plan_base(
    state: dict[str, torch.Tensor], mask: Mask, *, sharded: bool = False
) -> tuple[list[TensorEntry], list[tuple[str, torch.Tensor, DType]]]:
    """Validates a base state against a mask; finds tied tensors; returns entries and tensors to write.

    ``sharded``: the state holds DTensors, kept as they are (each rank writes its own part);
    tensors are tied when they are the same object.
    """
    bad = [name for name in state if not isinstance(name, str) or name == "__metadata__"]
    if bad:
        raise StateMismatchError(
            f"the base has key(s) a store cannot hold: {bad[:5]!r} (keys must be strings, and `__metadata__` "
            "is reserved by safetensors); rename them"
        )
    for name in mask.names:
        if name not in state:
            raise MaskMismatchError(f"mask tensor {name!r} is not in the base state; build the mask from this model")
        if tuple(state[name].shape) != mask.shape(name):
            raise MaskMismatchError(
                f"mask tensor {name!r} has shape {mask.shape(name)}, the base has {tuple(state[name].shape)}"
            )
    entries: list[TensorEntry] = []
    tensors: list[tuple[str, torch.Tensor, DType]] = []
    seen: dict[tuple[Any, ...], str] = {}
    for name, tensor in state.items():
        capture.check_tensor(name, tensor)
        row = dtype_row(tensor.dtype, key=name)
        if sharded:
            alias_of = seen.get((id(tensor),))
            entries.append(TensorEntry(name, row, tuple(tensor.shape), alias_of, []))
            if alias_of is None:
                seen[(id(tensor),)] = name
                tensors.append((name, tensor, row))
            elif name in mask and mask.counts()[name]:
                raise MaskMismatchError(
                    f"mask tensor {name!r} is tied to {alias_of!r}; put its mask entries on {alias_of!r}"
                )
            continue
        tensor = tensor.detach()
        view_key = (
            (
                tensor.device,
                tensor.untyped_storage().data_ptr(),
                tensor.storage_offset(),
                tuple(tensor.shape),
                tensor.stride(),
                tensor.dtype,
                tensor.is_conj(),
                tensor.is_neg(),
            )
            if tensor.numel()
            else None
        )
        alias_of = seen.get(view_key) if view_key is not None else None
        if alias_of is not None:
            if name in mask and mask.counts()[name]:
                raise MaskMismatchError(
                    f"mask tensor {name!r} is tied to {alias_of!r}; put its mask entries on {alias_of!r}"
                )
            entries.append(TensorEntry(name, row, tuple(tensor.shape), alias_of, []))
            continue
        if view_key is not None:
            seen[view_key] = name
        entries.append(TensorEntry(name, row, tuple(tensor.shape), None, []))
        tensors.append((name, plain(tensor).contiguous().cpu(), row))
    return entries, tensors
