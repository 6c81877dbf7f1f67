"""What a store derives once from its base and mask: the mapped base, the mask table, the base's masked values.

Every part of the store reads the base and the mask through one ``StoreLayout``,
built lazily and cached for the life of the store object, so saving, loading and
switching never recompute it and never reach into each other for it.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import numpy.typing as npt
import torch

from ..errors import IntegrityError
from ..format import codec, digests
from ..format.bits import byte_view, bytes_as_elements
from ..format.manifest import Manifest, TensorEntry
from ..format.names import BASE_NAME
from ..mask import Mask
from ..storage import Storage
from . import batch, devicecheck
from .basefile import open_base
from .scan import RowPlan
from .table import build_table


class StoreLayout:
    """The base and mask of one store, and every fact derived from them (all O(k) but the mapping)."""

    def __init__(
        self,
        storage: Storage,
        manifest: Manifest,
        mask: Mask,
        *,
        base: dict[str, torch.Tensor] | None = None,
        base_values: npt.NDArray[np.uint8] | None = None,
    ) -> None:
        """``base`` and ``base_values`` preset what would be read from the base file (store/shards.py's views)."""
        self.storage = storage
        self.manifest = manifest
        self.mask = mask
        self.entries = {entry.name: entry for entry in manifest.entries}
        self.owners = [entry for entry in manifest.entries if entry.alias_of is None]  # tensors stored once
        self.position = {entry.name: number for number, entry in enumerate(manifest.entries)}
        self.aliases = [(entry.name, entry) for entry in manifest.entries if entry.alias_of is not None]
        self.torch_shapes = {entry.name: torch.Size(entry.shape) for entry in manifest.entries}
        self.table = build_table(manifest, mask)
        self.dense_bytes = sum(entry.nbytes for entry in self.owners)
        self._base_rows: batch.Rows | None = None
        self._row_plans: dict[int, RowPlan] = {}
        self._base: dict[str, torch.Tensor] | None = base
        self._base_values: npt.NDArray[np.uint8] | None = None
        if base_values is not None:
            self._set_base_values(base_values)
        self._scratch: torch.Tensor | None = None
        self.scratch_lock = threading.Lock()
        self._device_index: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._device_base_words: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._base_sums: dict[int, torch.Tensor] = {}
        self._pinned: torch.Tensor | None = None

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

    def base_rows(self) -> batch.Rows:
        """The base tensors in mask-table order, ready for the batch functions."""
        if self._base_rows is None:
            base = self.base()
            self._base_rows = batch.Rows([base[entry.name] for entry in self.table.entries])
        return self._base_rows

    def stored_base_failures(self) -> list[tuple[int, int]]:
        """Every (row, chunk) of the stored base that fails its digest: the whole base read again.

        A remote backend serves the base from a local cache that was checked when it was
        downloaded; this downloads the stored object again (a damaged object must not pass
        because this machine kept a good copy) and, if it passes, replaces the cached copy.
        """
        if not self.storage.caches_objects:
            return batch.check_chunks(self.table, self.base_rows())
        failed: list[tuple[int, int]] = []

        def check(buffer: memoryview) -> None:
            tensors = open_base(buffer, self.manifest.entries, where=self.base_where)
            failed.extend(batch.check_chunks(self.table, [tensors[entry.name] for entry in self.table.entries]))
            if failed:
                raise self.base_chunk_error(self.table.entries[failed[0][0]], failed[0][1])

        try:
            buffer = self.storage.map(BASE_NAME, cache_key=self.manifest.base_digest, verify=check, refresh=True)
        except FileNotFoundError:
            raise IntegrityError(f"{self.base_where}: the store's base file is missing") from None
        except IntegrityError:
            if not failed:
                raise
            return failed
        self._base = open_base(buffer, self.manifest.entries, where=self.base_where)
        self._base_rows = None
        return []

    def _verify_whole(self, buffer: memoryview) -> None:
        """Checks every chunk of a freshly downloaded base before a remote backend caches it."""
        tensors = open_base(buffer, self.manifest.entries, where=self.base_where)
        failed = batch.check_chunks(self.table, [tensors[entry.name] for entry in self.table.entries])
        if failed:
            raise self.base_chunk_error(self.table.entries[failed[0][0]], failed[0][1])

    @functools.cached_property
    def row_specs(self) -> list[tuple[str, torch.dtype, torch.Size]]:
        """(name, torch dtype, shape) per table row: what a save checks and a load allocates, per tensor."""
        return [(entry.name, entry.dtype.torch_dtype, torch.Size(entry.shape)) for entry in self.table.entries]

    @functools.cached_property
    def _key_rows(self) -> tuple[list[str], list[int]]:
        row_of = {entry.name: row for row, entry in enumerate(self.table.entries)}
        names = [entry.name for entry in self.manifest.entries]
        return names, [row_of[entry.alias_of or entry.name] for entry in self.manifest.entries]

    def state_dict(self, rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The state dict of tensors given one per table row: in the base's key order, tied keys sharing one tensor."""
        names, key_rows = self._key_rows
        return dict(zip(names, [rows[row] for row in key_rows], strict=True))

    def new_rows(self) -> list[torch.Tensor]:
        """Uninitialised CPU tensors, one per table row, with the row's shape and dtype."""
        empty = torch.empty
        # empty(*shape) parses 0.5 µs faster than empty(shape); a 0-d shape needs the tuple.
        return [
            empty(*shape, dtype=dtype) if shape else empty(shape, dtype=dtype) for _, dtype, shape in self.row_specs
        ]

    def base_values(self) -> npt.NDArray[np.uint8]:
        """The base's bytes at the mask's indices, in stream order; checked against the manifest where v2 records it.

        A save codes values against these bytes and a load decodes against them, so a
        damaged base must never get this far: the check costs O(k) once per store object.
        """
        if self._base_values is None:
            values = self.table.new_values()
            batch.gather(self.table, self.base_rows(), values)
            recorded = self.manifest.masked_digest
            if recorded is not None and digests.masked_digest(values) != recorded:
                raise IntegrityError(
                    f"{self.base_where}: the base file is corrupted: its values at the mask's indices do not "
                    "match the digest recorded at create; restore the base file from a copy (the step files "
                    "are coded against these values, so no step can be saved or restored until then)"
                )
            self._set_base_values(values)
        assert self._base_values is not None
        return self._base_values

    def _set_base_values(self, values: npt.NDArray[np.uint8]) -> None:
        for group in self.table.groups:
            group.order = codec.exponent_order(self.table.group_words(values, group))
        self._base_values = values

    def base_row_values(self, row: int) -> torch.Tensor:
        """The base's element words at row ``row``'s mask indices."""
        entry = self.table.entries[row]
        raw = self.table.row_values(self.base_values(), row)
        return bytes_as_elements(torch.from_numpy(raw), entry.dtype.itemsize)

    def base_sums(self, row: int) -> torch.Tensor:
        """The device check's chunk sums of base tensor ``row`` (store/devicecheck.py), computed once on the CPU."""
        found = self._base_sums.get(row)
        if found is None:
            entry = self.table.entries[row]
            base = self.base()[entry.name]
            found = self._base_sums[row] = devicecheck.chunk_sums(entry, base, int(self.table.chunk_elements[row]))
        return found

    def device_base_words(self, row: int, device: torch.device) -> torch.Tensor:
        """The base's element words at row ``row``'s mask indices, on ``device`` (copied there once)."""
        key = (row, device)
        found = self._device_base_words.get(key)
        if found is None:
            found = self._device_base_words[key] = self.base_row_values(row).to(device)
        return found

    def pinned(self, nbytes: int) -> torch.Tensor:
        """A page-locked host buffer of at least ``nbytes``, reused across saves (plain memory without CUDA)."""
        if self._pinned is None or self._pinned.numel() < nbytes:
            self._pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        return self._pinned

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
            found = self._device_index[key] = self.table.row_index(self.table.row_of[name]).to(device)
        return found

    def index(self, name: str) -> torch.Tensor:
        return self.table.row_index(self.table.row_of[name])

    def row_index_on(self, row: int, device: torch.device) -> torch.Tensor:
        return self.device_index(self.table.entries[row].name, device)

    def row_plan(self, row: int) -> RowPlan:
        """Row ``row``'s indices split by hashing chunk, for the torch scan (built on first need)."""
        plan = self._row_plans.get(row)
        if plan is None:
            entry = self.table.entries[row]
            per_chunk = int(self.table.chunk_elements[row])
            plan = RowPlan.build(entry, self.table.row_index(row), self.base_row_values(row), per_chunk)
            self._row_plans[row] = plan
        return plan

    def per_chunk_bytes(self, entry: TensorEntry) -> int:
        return digests.chunk_elements(entry.dtype.itemsize, self.manifest.chunk_bytes) * entry.dtype.itemsize

    def check_base_chunk(self, entry: TensorEntry, number: int) -> None:
        """Raises unless chunk ``number`` of base tensor ``entry`` matches its digest."""
        per_chunk = self.per_chunk_bytes(entry)
        data = byte_view(self.base()[entry.name])[number * per_chunk : (number + 1) * per_chunk]
        if digests.of_tensor_bytes(data) != entry.chunk_digests[number]:
            raise self.base_chunk_error(entry, number)

    def base_chunk_error(self, entry: TensorEntry, number: int) -> IntegrityError:
        return IntegrityError(
            f"{self.base_where}: the base file is corrupted: tensor {entry.name!r}, chunk {number} does not "
            "match its digest; restore the base file from a copy"
        )
