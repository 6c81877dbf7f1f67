"""What a store derives once from its base and mask: the mapped base, the per-tensor mask plans, the value groups.

Every part of the store reads the base and the mask through one ``StoreLayout``,
built lazily and cached for the life of the store object, so saving, loading and
switching never recompute it and never reach into each other for it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from ..errors import IntegrityError
from ..format import codec, digests
from ..format.bits import byte_view, numpy_words
from ..format.manifest import Manifest, TensorEntry
from ..format.names import BASE_NAME
from ..mask import Mask
from ..storage import Storage
from .basefile import open_base
from .scan import MaskPlan


@dataclass
class ValueGroup:
    """Masked values of every tensor whose words have one width, coded as one stream."""

    width: int
    members: list[tuple[str, int, int]]  # (tensor, start word, stop word)
    base_words: npt.NDArray[np.unsignedinteger]
    order: npt.NDArray[np.intp]


class StoreLayout:
    """The base and mask of one store, and every fact derived from them (all O(k) but the mapping)."""

    def __init__(self, storage: Storage, manifest: Manifest, mask: Mask) -> None:
        self.storage = storage
        self.manifest = manifest
        self.mask = mask
        self.entries = {entry.name: entry for entry in manifest.entries}
        self.owners = [entry for entry in manifest.entries if entry.alias_of is None]  # tensors stored once
        self._base: dict[str, torch.Tensor] | None = None
        self._plans: dict[str, MaskPlan] | None = None
        self._groups: list[ValueGroup] | None = None
        self._scratch: torch.Tensor | None = None
        self.scratch_lock = threading.Lock()
        self._device_index: dict[tuple[str, torch.device], torch.Tensor] = {}

    @property
    def base_where(self) -> str:
        return self.storage.where(BASE_NAME)

    def base(self) -> dict[str, torch.Tensor]:
        """The base tensors, mapped from the base file (copy-on-write; nothing is read until used)."""
        if self._base is None:
            try:
                buffer = self.storage.map(BASE_NAME, cache_key=self.manifest.base_digest, verify=self._verify_whole)
            except FileNotFoundError:
                raise IntegrityError(f"{self.base_where}: the store's base file is missing") from None
            self._base = open_base(buffer, self.manifest.entries, where=self.base_where)
        return self._base

    def _verify_whole(self, buffer: memoryview) -> None:
        """Checks every chunk of a freshly downloaded base before a remote backend caches it."""
        tensors = open_base(buffer, self.manifest.entries, where=self.base_where)
        for entry in self.owners:
            failed = self.check_base_chunks(entry, byte_view(tensors[entry.name]))
            if failed is not None:
                raise self.base_chunk_error(entry, failed)

    def plans(self) -> dict[str, MaskPlan]:
        """Per stored tensor: its mask indices, chunk bounds and the base's words there."""
        if self._plans is None:
            base = self.base()
            plans = {}
            for entry in self.owners:
                index = self.mask[entry.name] if entry.name in self.mask else torch.zeros(0, dtype=torch.int64)
                plans[entry.name] = MaskPlan.build(entry, index, base[entry.name], self.manifest.chunk_bytes)
            self._plans = plans
        return self._plans

    def value_groups(self) -> list[ValueGroup]:
        """The masked values grouped by word width, in manifest order, with their exponent order."""
        if self._groups is None:
            plans = self.plans()
            by_width: dict[int, list[tuple[str, torch.Tensor]]] = {}
            for entry in self.owners:
                if plans[entry.name].index.numel():
                    by_width.setdefault(entry.dtype.word_bytes, []).append((entry.name, plans[entry.name].base_masked))
            groups = []
            for width in sorted(by_width):
                members, parts, start = [], [], 0
                for name, words in by_width[width]:
                    flat = numpy_words(words)
                    members.append((name, start, start + flat.size))
                    parts.append(flat)
                    start += flat.size
                base_words = np.concatenate(parts)
                groups.append(ValueGroup(width, members, base_words, codec.exponent_order(base_words)))
            self._groups = groups
        return self._groups

    def scratch(self) -> torch.Tensor:
        """One chunk of CPU bytes for the pure-Python scan; hold ``scratch_lock`` while using it."""
        if self._scratch is None:
            self._scratch = torch.empty(self.manifest.chunk_bytes, dtype=torch.uint8)
        return self._scratch

    def device_index(self, name: str, device: torch.device) -> torch.Tensor:
        """Tensor ``name``'s mask indices on ``device``, copied there once."""
        key = (name, device)
        found = self._device_index.get(key)
        if found is None:
            found = self._device_index[key] = self.plans()[name].index.to(device)
        return found

    def per_chunk_bytes(self, entry: TensorEntry) -> int:
        return digests.chunk_elements(entry.dtype.itemsize, self.manifest.chunk_bytes) * entry.dtype.itemsize

    def check_base_chunks(self, entry: TensorEntry, data: torch.Tensor, *, first: int = 0) -> int | None:
        """The first chunk of ``data`` (bytes of base tensor ``entry``, from chunk ``first``) that fails its digest.

        This is the one place base bytes are checked against the manifest: at load
        (on the copy), in ``verify`` (on the file) and before naming changes at save.
        """
        per_chunk = self.per_chunk_bytes(entry)
        for offset, (start, stop) in enumerate(digests.chunk_ranges(data.numel(), per_chunk)):
            if digests.of_tensor_bytes(data[start:stop]) != entry.chunk_digests[first + offset]:
                return first + offset
        return None

    def base_chunk_error(self, entry: TensorEntry, number: int) -> IntegrityError:
        return IntegrityError(
            f"{self.base_where}: the base file is corrupted: tensor {entry.name!r}, chunk {number} does not "
            "match its digest; restore the base file from a copy"
        )

    def base_bytes(self, entry: TensorEntry) -> torch.Tensor:
        return byte_view(self.base()[entry.name])
