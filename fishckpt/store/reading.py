"""Reading a store's steps: each step file read, checked, decoded and proved, with the caches that
make switching between steps O(k) (the last decoded steps, and for sharded training the store
cut to each rank's ranges)."""

from __future__ import annotations

import numpy as np

from ..errors import FishckptError, IntegrityError
from ..format import stepfile
from ..storage import Storage
from . import batch, shards, stepcodec
from .catalog import Catalog
from .layout import StoreLayout


class StepReader:
    """Decodes the steps of one store object; ``CheckpointStore`` reads every step through it."""

    def __init__(self, storage: Storage, catalog: Catalog, layout: StoreLayout) -> None:
        self._storage = storage
        self._catalog = catalog
        self._layout = layout
        # The last few decoded steps (O(k) each), keyed by step and the file's version, so
        # switching between steps decodes only the step switched to.
        self._decoded: dict[int, tuple[object, stepcodec.Decoded]] = {}
        # Shards of this store (sharded training): by their ranges, most recently used last.
        self._shards: dict[tuple[bytes, bool], shards.Shard] = {}
        self._localized: dict[tuple[int, bytes], stepcodec.Decoded] = {}

    def forget(self, step: int) -> None:
        """Drops a deleted step's decoded copy."""
        self._decoded.pop(step, None)

    def decode(self, step: int, *, again: bool = True) -> stepcodec.Decoded:
        """Reads, checks and decodes one step file (O(k)); recently decoded steps are reused."""
        key = self._catalog.key(step)
        found = self._storage.stat(key)
        if found is None:
            raise self._catalog.absent(step)
        cached = self._decoded.get(step)
        if cached is not None and cached[0] == found.version:
            self._decoded[step] = self._decoded.pop(step)  # most recently used goes last
            return cached[1]
        layout = self._layout
        layout.base_values()  # the base is checked first, so its faults are never blamed on a step
        record, file = self._catalog.read_record(step, sections=True)
        try:
            decoded = self.decode_record(record, file, where=self._storage.where(key))
        except IntegrityError:
            if record.shards is not None and again:
                # Its parts are read after the step file: a prune or an overwrite between the two
                # removes them. A step that is gone now is not saved; one saved again is read again.
                now = self._storage.stat(key)
                if now is None:
                    raise self._catalog.absent(step) from None
                if now.version != found.version:
                    return self.decode(step, again=False)
            self.blame_base()
            raise
        self._decoded[step] = (found.version, decoded)
        while len(self._decoded) > 2:
            del self._decoded[next(iter(self._decoded))]
        return decoded

    def decode_record(self, record: stepfile.StepRecord, file: stepfile.StepFile, *, where: str) -> stepcodec.Decoded:
        """A checked step file decoded and proved; a sharded step's parts are read, proved and put together."""
        if record.shards is None:
            return stepcodec.decode(self._layout, record, file, where=where)
        from . import sharded

        return sharded.decode(
            self._layout,
            self._storage,
            record,
            file,
            lambda starts, stops: self.shard(starts, stops, checked=False),
            where=where,
        )

    def blame_base(self) -> None:
        """Raises the base's own error if the base is damaged: a step that fails against it is not to blame."""
        layout = self._layout
        failing = batch.check_chunks(layout.table, layout.base_rows())
        if failing:
            row, chunk = failing[0]
            raise layout.base_chunk_error(layout.table.entries[row], chunk)

    def localize(self, shard: shards.Shard, step: int, decoded: stepcodec.Decoded) -> stepcodec.Decoded:
        """Step ``decoded`` cut to ``shard``, the same object while the step is unchanged (for O(k) switching)."""
        key = (step, np.stack([shard.starts, shard.stops], axis=1).tobytes())
        found = self._localized.get(key)
        if found is not None and found.record is decoded.record:
            return found
        found = self._localized[key] = shards.localize(shard, decoded)
        while len(self._localized) > 4:
            del self._localized[next(iter(self._localized))]
        return found

    def shard(self, starts: np.ndarray, stops: np.ndarray, *, checked: bool) -> shards.Shard:
        """The store restricted to these ranges (store/shards.py), built once per distinct ranges."""
        ranges = np.stack([starts, stops], axis=1).astype("<i8").tobytes()
        for key in ((ranges, True), (ranges, checked)):
            found = self._shards.get(key)
            if found is not None:
                self._shards[key] = self._shards.pop(key)
                return found
        built = shards.build(self._layout, starts, stops, checked=checked)
        self._shards[(ranges, checked)] = built
        while len(self._shards) > 64:
            del self._shards[next(iter(self._shards))]
        return built

    def part_files(self, step: int) -> list[str]:
        """The part files a saved step's file lists (none for a step that is not sharded, or unreadable)."""
        try:
            record, _ = self._catalog.read_record(step, sections=False)
        except (FishckptError, OSError):
            return []
        return [part.file for part in record.shards.parts] if record.shards is not None else []
