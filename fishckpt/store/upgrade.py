"""Rewriting a format v1 store as format v2: atomic, and every step proved bit for bit before the swap."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import FormatError, IntegrityError
from ..format import digests, stepfile
from ..format import tree as tree_format
from ..format.manifest import Manifest
from ..format.names import BASE_NAME, LOCK_NAME, MANIFEST_V2, STEPS_DIR, mask_name, step_key
from ..storage import Storage
from . import stepcodec
from .layout import StoreLayout

if TYPE_CHECKING:
    from .store import CheckpointStore

OWNED = frozenset({BASE_NAME, MANIFEST_V2, mask_name(2), STEPS_DIR, LOCK_NAME})


def upgrade(old: CheckpointStore, *, lock_timeout: float) -> None:
    """Replaces the format 1 store ``old`` with its format 2 equivalent (see ``CheckpointStore.upgrade``)."""
    if old.format_version >= 2:
        raise FormatError(f"{old.location}: the store is already format {old.format_version}; nothing to upgrade")
    storage = old.storage
    old.verify()
    manifest = old.layout.manifest
    new_manifest = Manifest(
        manifest.entries,
        manifest.chunk_bytes,
        manifest.mask_digest,
        manifest.created,
        version=2,
        store_id=secrets.token_hex(16),
        masked_digest=digests.masked_digest(old.layout.base_values()),
        k=old.mask.k,
        numel=old.mask.numel,
    )
    with storage.new_root(replace=True, marker=MANIFEST_V2, owned=OWNED, timeout=lock_timeout) as staging:
        staging.publish(BASE_NAME, pieces(storage, BASE_NAME), overwrite=False)
        staging.publish(mask_name(2), old.mask.file_bytes(), overwrite=False)
        staging.make_folder(STEPS_DIR)
        new_layout = StoreLayout(staging, new_manifest, old.mask)
        for step in old.steps:
            decoded = old.decoded(step)
            record = decoded.record
            training_state = None
            if record.training is not None:
                tensors: list[torch.Tensor] = []
                tree = stepcodec.decode_training(decoded)
                training_state = (tree_format.encode_tree(tree, tensors, path="training state"), tensors)
            encoded = stepcodec.encode(
                new_layout,
                step,
                decoded.values,
                decoded.changes,
                record.metadata,
                training_state,
                store_id=new_manifest.store_id or "",
            )
            encoded.content.created = record.created
            data = b"".join(stepfile.pack(encoded.content))
            where = staging.where(step_key(step, 2))
            again, file = stepfile.parse(data, where=where)
            proof = stepcodec.decode(new_layout, again, file, where=where)
            if not np.array_equal(proof.values, decoded.values) or proof.changes.keys() != decoded.changes.keys():
                raise IntegrityError(f"{old.location}: step {step} did not survive the upgrade; nothing was changed")
            staging.publish(step_key(step, 2), [data], overwrite=False)
        staging.publish(MANIFEST_V2, new_manifest.pack(), overwrite=False)


def pieces(storage: Storage, name: str, *, size: int = 64 << 20) -> Iterable[bytes]:
    """An object's bytes in ranged reads, so a large file is never held whole in memory."""
    found = storage.stat(name)
    total = 0 if found is None else found.size
    for start in range(0, total, size):
        yield storage.read_range(name, start, min(start + size, total))
