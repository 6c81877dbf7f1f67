"""CheckpointStore: a dense base written once, then one small verified file per saved step.

The store orchestrates; each step of its work is a call into the module that owns it:

- save:  ``capture`` (checks and reads the live state) -> ``stepcodec.encode`` ->
  ``format.stepfile.pack`` -> ``Storage.publish``;
- load:  ``Storage.read`` -> ``format.stepfile.parse`` -> ``stepcodec.decode`` -> ``rebuild``;
- switch: ``switch`` (O(k), with ``Residency`` telling what each target holds).
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.autograd.graph import increment_version

from ..errors import (
    FormatError,
    IntegrityError,
    InvalidArgumentError,
    OutsideMaskError,
    OutsideMaskWarning,
    StepExistsError,
    StepNotFoundError,
    StoreExistsError,
    StoreReplacedError,
)
from ..format import stepfile
from ..format import tree as tree_format
from ..format.manifest import Manifest
from ..format.names import (
    BASE_NAME,
    LOCK_NAME,
    MANIFEST_V1,
    MANIFEST_V2,
    STEPS_DIR,
    mask_name,
)
from ..mask import Mask
from ..sharding import any_dtensor
from ..storage import LocalStorage, RootState, Storage, open_storage
from . import batch, capture, creating, rebuild, shards, stepcodec, training, verifying
from .capture import Captured, StateLike
from .catalog import Catalog, check_step, read_manifest
from .layout import StoreLayout
from .reading import StepReader
from .records import CheckpointInfo, SaveInfo, StoreReport, VerifyReport
from .switch import Residency, switch

PathLike = str | Path

DEFAULT_CHUNK_BYTES = 4 << 20  # stays in cache, so copy-then-hash reads main memory once; 4 MiB beat 1 MiB here
DEFAULT_LOCK_TIMEOUT = 30.0  # seconds a writer waits for another's lock before giving up
_MARKERS = (MANIFEST_V2, MANIFEST_V1)
_OWNED = frozenset({BASE_NAME, MANIFEST_V2, mask_name(2), STEPS_DIR, LOCK_NAME})

if sys.byteorder != "little":  # the format is little-endian and the codec works on native views
    raise ImportError("fishckpt supports little-endian machines only")


class CheckpointStore:
    """A directory holding a dense base once, a fixed mask once, and one small file per step.

    Restoring a step reads the base, the mask and that step's file only, so
    steps can be deleted freely. Every file is checksummed, every restored
    tensor is checked against a digest recorded at save time, and files become
    visible only when complete. See docs/format.md and docs/exactness.md.

    Example:
        >>> store = CheckpointStore.create("ckpts", model, mask)
        >>> info = store.save(model, step=100)
        >>> state = store.load(100)   # bit-exact, verified
        >>> store.load_into(model, 100)
    """

    def __init__(self, storage: Storage, manifest: Manifest, mask: Mask, *, lock_timeout: float) -> None:
        """Use ``CheckpointStore.create`` or ``CheckpointStore.open``."""
        self._storage = storage
        self._layout = StoreLayout(storage, manifest, mask)
        self._catalog = Catalog(storage, manifest, k=mask.k, numel=mask.numel)
        self._lock_timeout = lock_timeout
        self._manifest_name = self._catalog.manifest_name
        found = storage.stat(self._manifest_name)
        self._manifest_version = None if found is None else found.version
        self._reader = StepReader(storage, self._catalog, self._layout)
        self._residency = Residency()
        self._temps_cleared = False

    # Creating and opening -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: PathLike | Storage,
        base: StateLike,
        mask: Mask,
        *,
        overwrite: bool = False,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: PathLike | None = None,
    ) -> CheckpointStore:
        """Creates a store from a dense base (state dict or module) and a mask.

        The store is built in a hidden folder and appears all at once, so an
        interrupted create leaves nothing that looks like a store (and the next
        create of the same path clears what it left).

        Args:
            path: The store folder. It must not exist, or be empty.
            base: The dense starting weights; CPU or CUDA tensors.
            mask: Which entries may change. Every mask tensor must be in ``base`` with the same shape.
            overwrite: Replace an existing fishckpt store at ``path`` (never any other folder). The
                swap waits for the store's writer lock, and writers of the old store then fail.
            chunk_bytes: Granularity of the base's digests (default 4 MiB).
            lock_timeout: Seconds to wait for another writer's lock, here and in later saves.
            storage_options: fsspec options for a URL ``path`` (``s3://bucket/run``); see docs/storage.md.
            cache_dir: Where a remote store's base is cached (default ``~/.cache/fishckpt/bases``).

        Raises:
            StoreExistsError: ``path`` holds files and ``overwrite`` does not apply.
            MaskMismatchError: The mask names a tensor the base lacks, or a shape differs.
            StateMismatchError: A key cannot be stored (not a string, ``__metadata__``), or a value is
                not a dense tensor.
            FormatError: A tensor has a dtype fishckpt cannot store.
        """
        storage = open_storage(path, storage_options=storage_options, cache_dir=cache_dir)
        where = storage.url
        found = storage.root_state(_MARKERS, _OWNED)
        if found is RootState.NOT_A_FOLDER:
            raise StoreExistsError(f"{where}: exists and is not a folder; choose another path")
        if found is RootState.OTHER:
            raise StoreExistsError(f"{where}: folder is not empty; choose a new path")
        if found is RootState.STORE and not overwrite:
            raise StoreExistsError(
                f"{where}: folder is not empty; choose a new path "
                "(or pass overwrite=True to replace the fishckpt store there)"
            )
        if chunk_bytes < 64 or chunk_bytes % 16:
            raise InvalidArgumentError("chunk_bytes must be a multiple of 16 and at least 64")
        manifest = creating.create(
            storage,
            capture.state_of(base),
            mask,
            replace=found is RootState.STORE,
            owned=_OWNED,
            chunk_bytes=chunk_bytes,
            lock_timeout=lock_timeout,
        )
        if manifest is None:  # created by every rank of a sharded base: each opens it
            return cls.open(storage, lock_timeout=lock_timeout)
        return cls(storage, manifest, mask, lock_timeout=lock_timeout)

    @staticmethod
    def is_store(path: PathLike | Storage, *, storage_options: Mapping[str, Any] | None = None) -> bool:
        """Whether ``path`` (a folder or a URL) looks like a store (has a manifest); ``open`` checks it fully."""
        return open_storage(path, storage_options=storage_options).root_state(_MARKERS) is RootState.STORE

    @classmethod
    def open(
        cls,
        path: PathLike | Storage,
        *,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: PathLike | None = None,
    ) -> CheckpointStore:
        """Opens an existing store; checks its manifest and mask (the base is checked as it is read).

        Args:
            path: The store folder, or a URL such as ``s3://bucket/run1`` (``pip install 'fishckpt[remote]'``).
            lock_timeout: Seconds a save, delete or prune waits for another writer's lock.
            storage_options: fsspec options for a URL (credentials, endpoint); see docs/storage.md.
            cache_dir: Where a remote store's base is cached, downloaded once per machine
                (default ``~/.cache/fishckpt/bases``).

        Raises:
            FormatError: ``path`` is not a store, or was written by a newer fishckpt.
            IntegrityError: The manifest or mask file is corrupted.
        """
        storage = open_storage(path, storage_options=storage_options, cache_dir=cache_dir)
        manifest = read_manifest(storage)
        where = storage.where(mask_name(manifest.version))
        try:
            mask = Mask.from_file_bytes(storage.read(mask_name(manifest.version)), where=where)
        except FileNotFoundError:
            raise IntegrityError(f"{where}: the store's mask file is missing") from None
        except FormatError as error:
            raise IntegrityError(f"{where}: mask file is corrupted: {error}") from error
        if mask.digest != manifest.mask_digest:
            raise IntegrityError(
                f"{where}: the mask file is not this store's mask (its digest differs from the manifest's); "
                "restore the store's own mask file from a copy"
            )
        return cls(storage, manifest, mask, lock_timeout=lock_timeout)

    # Properties -----------------------------------------------------------------------------------

    @property
    def path(self) -> Path | str:
        """The store's folder (a Path) for a local store; its URL otherwise."""
        return self._storage.root if isinstance(self._storage, LocalStorage) else self._storage.url

    @property
    def location(self) -> str:
        """The store's location as text, for messages."""
        return self._storage.url

    @property
    def mask(self) -> Mask:
        return self._layout.mask

    @property
    def format_version(self) -> int:
        """The store's format version: 2, or 1 for a store written before fishckpt 0.2 (read-only: ``upgrade``)."""
        return self._layout.manifest.version

    @property
    def store_id(self) -> str | None:
        """The store's identity, random at create, bound into every step file (None for a format v1 store)."""
        return self._layout.manifest.store_id

    @property
    def base_digest(self) -> str:
        """Identity of the base: every checkpoint records it and is refused by other bases."""
        return self._layout.manifest.base_digest

    @property
    def tensor_names(self) -> list[str]:
        return [entry.name for entry in self._layout.manifest.entries]

    @property
    def dense_bytes(self) -> int:
        """Bytes of one full state as raw tensors (tied tensors counted once)."""
        return self._catalog.dense_bytes

    @property
    def steps(self) -> list[int]:
        """Saved steps, ascending."""
        return self._catalog.steps

    @property
    def catalog(self) -> Catalog:
        """The store read from headers alone (steps, step records, reports), as ``fishckpt ls`` reads it."""
        return self._catalog

    def step_path(self, step: int) -> Path | str:
        """Where step ``step``'s file lies (whether or not it is saved)."""
        return self._catalog.file(self._key(check_step(step)))

    def files(self) -> dict[str, Path | str]:
        """The store's fixed files by role: ``manifest``, ``base``, ``mask`` (steps: see ``step_path``)."""
        return self._catalog.files()

    def _key(self, step: int) -> str:
        return self._catalog.key(step)

    def __repr__(self) -> str:
        return f"CheckpointStore({self.location!r}, tensors={len(self._layout.entries)}, k={self.mask.k})"

    # Saving ---------------------------------------------------------------------------------------

    def save(
        self,
        state: StateLike,
        step: int,
        *,
        metadata: Mapping[str, Any] | None = None,
        check_outside_mask: bool = True,
        strict: bool = False,
        overwrite: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        rng: bool = False,
        device_check: bool | None = None,
    ) -> SaveInfo:
        """Stores ``state`` as step ``step``: the masked values, plus anything changed outside the mask.

        Args:
            state: A state dict or module with exactly the base's keys, shapes and dtypes.
            step: A non-negative integer.
            metadata: JSON-like values kept with the checkpoint (NaN and infinities included).
            check_outside_mask: Compare every entry outside the mask with the base
                (one read of the state, ~0.05 s per GiB on CPU) and store what changed.
                ``False`` trusts that nothing outside the mask changed (true of a
                state trained only through ``SparseAdamW`` with no buffers that move)
                and reads only the k masked entries; anything that did change outside
                the mask is then silently restored to the base value on load.
            strict: Refuse (raise OutsideMaskError, write nothing) if anything
                outside the mask changed, instead of storing it with a warning.
            overwrite: Replace an existing checkpoint of ``step``.
            optimizer: Also store its ``state_dict()`` (SparseAdamW's holds k values per
                moment). Any optimizer whose state is tensors, numbers, strings and
                lists/tuples/dicts of them works; nothing is pickled.
            scheduler: Also store an LR scheduler's ``state_dict()``.
            rng: Also store the global torch (CPU, CUDA), Python and numpy random states.
            device_check: How the exact check runs. None (default): tensors off the CPU (CUDA)
                by a checksum computed where they live, so only O(k) values and a sum per chunk
                cross PCIe; CPU tensors by the xxh3 scan. True: the checksum for every tensor
                (it runs on CPU tensors too). False: the xxh3 scan for all, copying device
                tensors to the host chunk by chunk. docs/exactness.md says what each promises.

        Returns:
            A SaveInfo with the bytes written, k, what changed outside the mask and the time taken.

        Raises:
            StateMismatchError: A key is missing or extra, or a shape or dtype differs from the base.
            StepExistsError: ``step`` is saved already and ``overwrite`` is false.
            OutsideMaskError: ``strict`` and entries outside the mask changed.
            StoreLockedError: Another process held the store's lock for ``lock_timeout`` seconds.
            StoreReplacedError: The store was replaced (``overwrite=True`` create) since it was opened.
            IntegrityError: The base file is damaged (the step would be coded against wrong values).
        """
        started = time.perf_counter()
        pending = self.capture(
            state,
            step,
            metadata=metadata,
            check_outside_mask=check_outside_mask,
            strict=strict,
            overwrite=overwrite,
            optimizer=optimizer,
            scheduler=scheduler,
            rng=rng,
            device_check=device_check,
        )
        info = self.commit(pending, started=started)
        if info.changed_outside_mask:
            warnings.warn(OutsideMaskWarning(outside_mask_summary(info)), stacklevel=2)
        return info

    def capture(
        self,
        state: StateLike,
        step: int,
        *,
        metadata: Mapping[str, Any] | None = None,
        check_outside_mask: bool = True,
        strict: bool = False,
        overwrite: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        rng: bool = False,
        device_check: bool | None = None,
    ) -> PendingSave:
        """The first half of ``save``: reads everything it needs from the live state, and nothing more.

        After it returns, the model and optimizer may change freely: ``commit`` writes what
        was captured. The checkpoint manager calls this on the training thread and
        ``commit`` on a background thread. Arguments and errors are those of ``save``.
        """
        if strict and not check_outside_mask:
            raise InvalidArgumentError(
                "strict=True needs check_outside_mask=True: changes can only be refused if looked for"
            )
        step = check_step(step)
        self._writable()
        layout = self._layout
        state_dict = capture.state_of(state)
        checked = capture.validated(layout, state_dict, where=self.location)
        meta = _json_metadata(metadata)
        if not overwrite and self._storage.stat(self._key(step)) is not None:
            where = self._storage.where(self._key(step))
            raise StepExistsError(f"{where}: step {step} is already saved; pass overwrite=True to replace it")
        shard = ranks = error = None
        if any_dtensor(checked):
            from . import sharded

            ranks = sharded.ranks()
            try:
                shard, captured = self._capture_shard(checked, ranks.rank, check_outside_mask, device_check)
                _refuse_if_strict(strict, step, captured)
            except Exception as failure:  # raised on every rank at commit, never on this one alone (a hang)
                error = sharded.describe(failure, ranks.rank)
                captured = capture.Captured(np.zeros(0, dtype=np.uint8), {})
        else:
            captured = capture.collect(layout, checked, check=check_outside_mask, device_check=device_check)
            _refuse_if_strict(strict, step, captured)
        return PendingSave(
            step=step,
            values=captured.values,
            changes=captured.changes,
            metadata=meta,
            training=training.capture(optimizer, scheduler, rng),
            overwrite=overwrite,
            checked=check_outside_mask,
            shard=shard,
            ranks=ranks,
            error=error,
        )

    def _capture_shard(
        self, tensors: list[torch.Tensor], rank: int, check: bool, device_check: bool | None
    ) -> tuple[shards.Shard, Captured]:
        """A sharded save's capture: this rank's pieces of ``tensors`` (DTensors and replicated plain tensors)."""
        from . import sharded

        pieces = sharded.pieces_of(self._layout, tensors, rank)
        starts = np.array([p.start if p.writes else 0 for p in pieces], dtype=np.int64)
        stops = np.array([p.stop if p.writes else 0 for p in pieces], dtype=np.int64)
        shard = self._reader.shard(starts, stops, checked=check)
        local = [p.local if p.writes else p.local[:0] for p in pieces]
        return shard, capture.collect(shard.layout, local, check=check, device_check=device_check)

    def commit(self, pending: PendingSave, *, started: float | None = None) -> SaveInfo:
        """The second half of ``save``: codes what ``capture`` read and writes it durably, under the lock."""
        started = time.perf_counter() if started is None else started
        if pending.shard is not None:
            return self._commit_sharded(pending, started)
        layout = self._layout
        step = pending.step
        key = self._key(step)
        where = self._storage.where(key)
        with self._locked():
            if self._storage.stat(key) is not None and not pending.overwrite:
                raise StepExistsError(f"{where}: step {step} is already saved; pass overwrite=True to replace it")
            if not self._temps_cleared:  # once per store object: listing steps/ is O(steps), a save must be O(k)
                self._storage.remove_stale_temps(STEPS_DIR)
                self._temps_cleared = True
            encoded = stepcodec.encode(
                layout,
                step,
                pending.values,
                pending.changes,
                pending.metadata,
                pending.training,
                store_id=layout.manifest.store_id or "",
            )
            pieces = stepfile.pack(encoded.content)
            try:
                written = self._storage.publish(key, pieces, overwrite=pending.overwrite)
            except FileExistsError:
                raise StepExistsError(
                    f"{where}: step {step} is already saved; pass overwrite=True to replace it"
                ) from None
            except OSError as error:
                raise type(error)(
                    error.errno, f"{error.strerror}: saving step {step} of {self.location}", where
                ) from error
        return self._saved(pending, started, written, encoded.changed, encoded.storage, encoded.content.training_bytes)

    def _commit_sharded(self, pending: PendingSave, started: float) -> SaveInfo:
        """A sharded save's commit, on every rank: the protocol of store/sharded.py, publishing through
        ``_publish_sharded`` on rank 0."""
        from . import sharded

        def publish(content: stepfile.StepContent, parts: set[str]) -> int:
            return self._publish_sharded(content, parts, overwrite=pending.overwrite)

        outcome = sharded.commit(
            self._storage, self._layout, pending, publish, where=self._storage.where(self._key(pending.step))
        )
        return self._saved(pending, started, outcome.bytes, outcome.changed, outcome.storage, outcome.training_bytes)

    def _saved(
        self,
        pending: PendingSave,
        started: float,
        written: int,
        changed: dict[str, int],
        storage: dict[str, str],
        training_bytes: int,
    ) -> SaveInfo:
        """What a committed save reports."""
        return SaveInfo(
            step=pending.step,
            path=self.step_path(pending.step),
            bytes_written=written,
            dense_bytes=self.dense_bytes,
            k=self.mask.k,
            changed_outside_mask=changed,
            outside_mask_storage=storage,
            checked_outside_mask=pending.checked,
            seconds=time.perf_counter() - started,
            training_state_bytes=training_bytes,
        )

    def _publish_sharded(self, content: stepfile.StepContent, parts: set[str], *, overwrite: bool) -> int:
        """Rank 0: publishes the step file that lists ``parts`` and makes the step visible; its bytes.

        Nothing after the publication may fail the save (every rank would delete its part): what
        is left undone then (an old part not deleted) the next store object's sweep removes.
        """
        from . import sharded

        step = content.step
        key = self._key(step)
        written: int | None = None
        try:
            with self._locked():
                old: list[str] = []
                if self._storage.stat(key) is not None:
                    if not overwrite:
                        where = self._storage.where(key)
                        raise StepExistsError(
                            f"{where}: step {step} is already saved; pass overwrite=True to replace it"
                        )
                    old = self._reader.part_files(step)
                if not self._temps_cleared:
                    self._storage.remove_stale_temps(STEPS_DIR)
                    sharded.remove_orphan_parts(self._storage, self._reader.part_files, keep=parts)
                    self._temps_cleared = True
                written = self._storage.publish(key, stepfile.pack(content), overwrite=overwrite)
                for name in set(old) - parts:
                    self._storage.delete(f"{STEPS_DIR}/{name}")
        except Exception:
            if written is None:
                raise
        return written

    def _writable(self) -> None:
        if self.format_version < 2:
            raise FormatError(
                f"{self.location}: this store is in format 1, which this fishckpt reads but no longer writes; "
                f"run `fishckpt upgrade {self.location}` (or CheckpointStore.upgrade) to save into it"
            )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Holds the writer lock, and checks under it that the store at the path is still this one."""
        try:
            with self._storage.lock(timeout=self._lock_timeout):
                self._check_same_store()
                yield
        except FileNotFoundError as error:
            raise StoreReplacedError(
                f"{self.location}: the store was removed since it was opened ({error}); nothing was written"
            ) from error

    def _check_same_store(self) -> None:
        """Under the lock: the store at this location is still the one this object opened."""
        found = self._storage.stat(self._manifest_name)
        if found is not None and found.version == self._manifest_version:
            return
        try:
            current = read_manifest(self._storage)
        except (FormatError, IntegrityError) as error:
            raise StoreReplacedError(
                f"{self.location}: the store was removed or damaged since it was opened ({error}); nothing was written"
            ) from error
        if current.identity != self._layout.manifest.identity:
            raise StoreReplacedError(
                f"{self.location}: the store was replaced since it was opened (its id was "
                f"{self._layout.manifest.identity}, it is now {current.identity}); nothing was written. Open the new "
                "store, or save into another path"
            )
        self._manifest_version = found.version if found is not None else None

    # Loading --------------------------------------------------------------------------------------

    def load(self, step: int, *, device: str | torch.device = "cpu", verify: bool = True) -> dict[str, torch.Tensor]:
        """Rebuilds the full state dict of ``step``, bit-identical to what was saved.

        The tensors returned are remembered: ``load_into(state, other_step)`` on them
        later switches in O(k), as long as nothing else has modified them.

        Args:
            step: A saved step.
            device: Where the returned tensors live.
            verify: Check the copied base bytes against their digests, and read
                back every entry the step sets. Costs one hash pass (~0.05 s per GiB here, on
                two threads); turn off only if you verify otherwise.

        Returns:
            A new state dict in the base's key order; tied keys share one tensor.

        Raises:
            StepNotFoundError: ``step`` is not saved.
            IntegrityError: A file is corrupted; the message names the file and tensor.
            BaseMismatchError: The checkpoint file belongs to another store.
        """
        decoded = self._reader.decode(check_step(step))
        device = torch.device(device)
        layout = self._layout
        rows = layout.new_rows()
        rebuild.write_full(layout, batch.Rows.fresh(rows), decoded, verify=verify)
        if device.type != "cpu":
            rows = [row.to(device) for row in rows]
        self._residency.remember(rows, decoded)
        return layout.state_dict(rows)

    def load_into(self, target: StateLike, step: int, *, verify: bool = True) -> None:
        """Writes step ``step`` into an existing module or state dict, in place.

        If every tensor of ``target`` was last written by this store object (``load`` or
        ``load_into``) and has not been modified since (tracked by PyTorch's version
        counters), only the entries that differ between the two steps are touched:
        O(k), not O(model). Otherwise the whole state is rewritten from the base.

        Args:
            target: A module or state dict with the base's keys, shapes and dtypes (any device).
            step: A saved step.
            verify: As in ``load``; on the O(k) path the rewritten entries are checked.

        Raises:
            StateMismatchError: ``target`` does not match the base, or two of its tensors share
                memory where the saved state's did not (docs/exactness.md, "Switching").
            IntegrityError: As in ``load``.
        """
        step = check_step(step)
        layout = self._layout
        # ``owners`` are the caller's own tensor objects (Parameters for a module), in table order,
        # whose version counters record later modification.
        owners = capture.validated(layout, capture.state_of(target), where=self.location)
        decoded = self._reader.decode(step)
        if any_dtensor(owners):
            # Sharded: each rank writes its own shard of the step, whatever sharding saved it.
            from . import sharded

            pieces = sharded.pieces_of(layout, owners, rank=0)
            starts = np.array([piece.start for piece in pieces], dtype=np.int64)
            stops = np.array([piece.stop for piece in pieces], dtype=np.int64)
            shard = self._reader.shard(starts, stops, checked=verify)
            # The local shards are written; the DTensors are remembered (their local tensors are fresh
            # views at each access, which share the shard's version counter).
            self._write_into(
                shard.layout,
                owners,
                self._reader.localize(shard, step, decoded),
                verify=verify,
                data=[piece.local for piece in pieces],
            )
            return
        self._write_into(layout, owners, decoded, verify=verify)

    def _write_into(
        self,
        layout: StoreLayout,
        owners: list[torch.Tensor],
        decoded: stepcodec.Decoded,
        *,
        verify: bool,
        data: list[torch.Tensor] | None = None,
    ) -> None:
        """Writes ``decoded`` into ``data`` (default: the ``owners`` themselves), in O(k) when they hold a step."""
        data = owners if data is None else data
        held = self._residency.held(owners, data)
        with torch.no_grad():
            if held is decoded:
                return
            views = [tensor.detach() for tensor in data]
            found = batch.Rows(views)
            shared = batch.overlapping(layout.table, found)  # tensors that share memory: written through copies
            sharing = {row for pair in shared for row in pair}
            direct = [True] * len(views)  # written in place: the rows C takes, and contiguous plain tensors off the CPU
            for row in found.fallback:
                view = views[row]
                direct[row] = view.is_contiguous() and not view.is_conj() and not view.is_neg()
            if held is not None and all(direct) and not shared:
                switch(layout, found, held, decoded, verify=verify)
                increment_version(views)
                self._residency.remember(owners, decoded, data)
                return
            staged = [
                view
                if ok and view.is_cpu and row not in sharing
                else torch.empty(entry.shape, dtype=entry.dtype.torch_dtype)
                for row, (view, ok, entry) in enumerate(zip(views, direct, layout.table.entries, strict=True))
            ]
            rebuild.write_full(layout, staged, decoded, verify=verify)
            for view, stage in zip(views, staged, strict=True):
                if stage is not view:
                    view.copy_(stage.view(view.shape))
            increment_version(views)
            rebuild.check_shared(layout, views, staged, shared, decoded)
        self._residency.remember(owners, decoded, data)

    # Training state -------------------------------------------------------------------------------

    def load_training_state(
        self,
        step: int,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        *,
        rng: bool = True,
    ) -> None:
        """Puts back the optimizer, scheduler and RNG states saved with ``step``.

        Load the model first (``load_into``); build the optimizer over it as before
        the save; then call this. Training continues bit for bit as if never stopped.

        Args:
            step: A step saved with ``optimizer=`` (and ``scheduler=``, ``rng=True``).
            optimizer: Receives ``load_state_dict`` of the saved optimizer state.
            scheduler: Receives ``load_state_dict`` of the saved scheduler state.
            rng: Restore the global random states, if they were saved.

        Raises:
            StateMismatchError: Something asked for was not saved with this step.
        """
        training.restore(self._reader.decode(check_step(step)), optimizer, scheduler, rng=rng)

    # Inspecting and maintaining ---------------------------------------------------------------

    def info(self, step: int) -> CheckpointInfo:
        """Describes a saved step from its (checksummed) file header.

        Raises:
            StepNotFoundError: ``step`` is not saved.
            IntegrityError: Its file is damaged or unreadable.
        """
        return self._catalog.info(step)

    def report(self, *, steps: Iterable[int] | None = None) -> StoreReport:
        """Where the store's bytes go: base, mask, manifest and every step, against dense checkpoints.

        A step whose file is damaged is listed in ``problems``; a step deleted meanwhile is skipped.
        """
        return self._catalog.report(steps=steps)

    def delete(self, step: int) -> None:
        """Removes a saved step. Other steps never depend on it."""
        step = check_step(step)
        with self._locked():
            parts = self._reader.part_files(step) if self.format_version >= 2 else []
            try:
                self._storage.delete(self._key(step))
            except FileNotFoundError:
                raise StepNotFoundError(f"{self.location}: step {step} is not in the store") from None
            for name in parts:  # after the step file: a reader never finds a listed part missing
                with contextlib.suppress(FileNotFoundError):
                    self._storage.delete(f"{STEPS_DIR}/{name}")
            self._reader.forget(step)

    def verify(
        self, steps: int | Iterable[int] | None = None, *, base: bool | None = None, progress: Any = None
    ) -> VerifyReport:
        """Re-reads files and checks every digest, reporting every failure found.

        The base is checked first: its values at the mask's indices always (O(k)), and
        every chunk of it when ``base`` is on. A damaged base is reported as the base's
        fault, and steps are then checked at the file level only, never blamed for it.
        A step that disappears while verify runs (pruned meanwhile) is reported as gone.

        Args:
            steps: A step, several, or None for every saved step.
            base: Hash the whole base file too. Default: only when ``steps`` is None.
            progress: Wraps the steps' iterable (a progress bar), if given.

        Returns:
            What was checked, and which steps were deleted meanwhile.

        Raises:
            VerifyError: (an IntegrityError) listing each failing file and tensor.
        """
        if steps is None:
            numbers = self.steps
        elif isinstance(steps, int | np.integer):
            numbers = [check_step(int(steps))]
        else:
            numbers = [check_step(step) for step in steps]
        return verifying.verify(
            self._layout,
            self._catalog,
            numbers,
            whole_base=base if base is not None else steps is None,
            progress=progress,
            decode=self._reader.decode_record,
            blame_base=self._reader.blame_base,
        )

    # Upgrading ---------------------------------------------------------------------------------------

    @classmethod
    def upgrade(cls, path: PathLike | Storage, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> CheckpointStore:
        """Rewrites a format v1 store as format v2, atomically, proving every step bit for bit on the way.

        The new store gets a store id; the base bytes are the same. Each step is decoded
        from v1, written as v2, decoded again and compared with the v1 content before the
        swap; the old store is replaced only when all steps match, under its writer lock.

        Raises:
            FormatError: The store is already format 2 (nothing is changed).
            IntegrityError: A file of the old store is damaged; nothing is changed.
            NotImplementedError: The store is at a URL (object storage has no atomic swap).
        """
        from .upgrade import upgrade

        old = cls.open(path, lock_timeout=lock_timeout)
        if not old.storage.atomic_replace:
            raise NotImplementedError(
                f"{old.location}: upgrading a store at a URL is not supported: object storage cannot swap "
                "the old store for the new one at once, and a failure midway would lose it. Copy the store "
                "to a local folder, run `fishckpt upgrade` there, and upload the result to a new prefix"
            )
        upgrade(old, lock_timeout=lock_timeout)
        return cls.open(path, lock_timeout=lock_timeout)

    # For store/upgrade.py and the checkpoint manager: the parts a store is built from.

    @property
    def storage(self) -> Storage:
        return self._storage

    @property
    def layout(self) -> StoreLayout:
        return self._layout

    def decoded(self, step: int) -> stepcodec.Decoded:
        """Step ``step`` read, checked and decoded (cached: the last two steps)."""
        return self._reader.decode(check_step(step))


class PendingSave:
    """What ``CheckpointStore.capture`` read from a live state: everything ``commit`` needs, and copies only."""

    __slots__ = (
        "changes",
        "checked",
        "error",
        "metadata",
        "overwrite",
        "ranks",
        "shard",
        "step",
        "training",
        "values",
    )

    def __init__(
        self,
        *,
        step: int,
        values: np.ndarray,
        changes: dict[str, stepcodec.Change],
        metadata: dict[str, Any],
        training: tuple[Any, list[torch.Tensor]] | None,
        overwrite: bool,
        checked: bool,
        shard: shards.Shard | None = None,
        ranks: Any = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        self.step = step
        self.shard = shard  # a sharded save: this rank's shard of the store
        self.ranks = ranks
        self.error = error  # a sharded save that failed on this rank: raised on every rank at commit
        self.values = values
        self.changes = changes
        self.metadata = metadata
        self.training = training
        self.overwrite = overwrite
        self.checked = checked


def outside_mask_summary(info: SaveInfo, *, shown: int = 3) -> str:
    """A short warning text for changes outside the mask: counts and the few largest, never every name."""
    changed = info.changed_outside_mask
    largest = sorted(changed.items(), key=lambda item: (-item[1], item[0]))[:shown]
    listing = ", ".join(f"{name} ({count:,})" for name, count in largest)
    more = f" and {len(changed) - shown} more" if len(changed) > shown else ""
    total = sum(changed.values())
    entries = f"{total:,} {'entry' if total == 1 else 'entries'}"
    tensors = f"{len(changed)} {'tensor' if len(changed) == 1 else 'tensors'}"
    return (
        f"entries outside the mask changed and were stored too: {entries} in {tensors}, most in {listing}{more}. "
        "The full list is in SaveInfo.changed_outside_mask; if this is not expected, check weight decay and "
        "buffers (docs/exactness.md)"
    )


# Helpers ---------------------------------------------------------------------------------------


def _refuse_if_strict(strict: bool, step: int, captured: capture.Captured) -> None:
    if strict and captured.changes:
        listing = ", ".join(f"{name} ({change.positions.numel()} entries)" for name, change in captured.changes.items())
        raise OutsideMaskError(
            f"step {step} not saved: entries outside the mask changed: {listing}. Nothing was written; "
            "save without strict to store them, or find what moves them (weight decay, buffers)"
        )


def _json_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """The user's metadata as JSON values; non-finite floats, tuples and the like are kept in tagged form."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidArgumentError("metadata must be a mapping of JSON-like values")
    for key, value in metadata.items():  # each on its own first, so an error names the key
        if not isinstance(key, str):
            raise InvalidArgumentError(f"metadata key {key!r} is not a string")
        tree_format.encode_tree(value, None, path=f"metadata key {key!r}")
    encoded = tree_format.encode_tree(dict(metadata), None, path="metadata")
    return encoded if isinstance(encoded, dict) else {"$items": encoded}


def _decoded_metadata(metadata: dict[str, Any], *, where: str) -> dict[str, Any]:
    decoded = tree_format.decode_tree(metadata, [], where=where)
    return decoded if isinstance(decoded, dict) else {}


def _brief(steps: list[int]) -> str:
    if not steps:
        return "none"
    return ", ".join(map(str, steps[:5])) + (f", ... ({len(steps)} in all)" if len(steps) > 5 else "")
