"""CheckpointStore: a dense base written once, then one small verified file per saved step.

The store orchestrates; each step of its work is a call into the module that owns it:

- save:  ``capture`` (checks and reads the live state) -> ``stepcodec.encode`` ->
  ``format.stepfile.pack`` -> ``Storage.publish``;
- load:  ``Storage.read`` -> ``format.stepfile.parse`` -> ``stepcodec.decode`` -> ``rebuild``;
- switch: ``switch`` (O(k), with ``Residency`` telling what each target holds).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import (
    BaseMismatchError,
    FormatError,
    IntegrityError,
    InvalidArgumentError,
    MaskMismatchError,
    OutsideMaskError,
    OutsideMaskWarning,
    StateMismatchError,
    StepExistsError,
    StepNotFoundError,
    StoreExistsError,
    VerifyError,
    VerifyFailure,
)
from ..format import manifest as manifest_format
from ..format import stepfile
from ..format.bits import plain
from ..format.dtypes import DType, dtype_row
from ..format.manifest import Manifest, TensorEntry
from ..format.names import BASE_NAME, MANIFEST_NAME, MASK_NAME, STEPS_DIR, step_key, step_of
from ..mask import Mask
from ..storage import LocalStorage, RootState, Storage, open_storage
from . import capture, rebuild, stepcodec, training
from .basefile import BaseWriter
from .capture import StateLike
from .layout import StoreLayout
from .records import CheckpointInfo, SaveInfo, StoreReport
from .switch import Residency, switch

PathLike = str | Path

DEFAULT_CHUNK_BYTES = 4 << 20  # stays in cache, so copy-then-hash reads main memory once; 4 MiB beat 1 MiB here

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

    def __init__(self, storage: Storage, manifest: Manifest, mask: Mask) -> None:
        """Use ``CheckpointStore.create`` or ``CheckpointStore.open``."""
        self._storage = storage
        self._layout = StoreLayout(storage, manifest, mask)
        # The last few decoded steps (O(k) each), keyed by step and the file's version, so
        # switching between steps decodes only the step switched to.
        self._decoded: dict[int, tuple[object, stepcodec.Decoded]] = {}
        self._residency = Residency()

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
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: PathLike | None = None,
    ) -> CheckpointStore:
        """Creates a store from a dense base (state dict or module) and a mask.

        The store is built in a hidden sibling folder and renamed into place, so
        an interrupted create leaves nothing that looks like a store.

        Args:
            path: The store folder. It must not exist, or be empty.
            base: The dense starting weights; CPU or CUDA tensors.
            mask: Which entries may change. Every mask tensor must be in ``base`` with the same shape.
            overwrite: Replace an existing fishckpt store at ``path`` (never any other folder).
            chunk_bytes: Granularity of the base's digests (default 4 MiB).
            storage_options: fsspec options for a URL ``path`` (``s3://bucket/run``); see docs/storage.md.
            cache_dir: Where a remote store's base is cached (default ``~/.cache/fishckpt/bases``).

        Raises:
            StoreExistsError: ``path`` holds files and ``overwrite`` does not apply.
            MaskMismatchError: The mask names a tensor the base lacks, or a shape differs.
            FormatError: A tensor has a dtype fishckpt cannot store.
        """
        storage = open_storage(path, storage_options=storage_options, cache_dir=cache_dir)
        where = storage.url
        found = storage.root_state(MANIFEST_NAME)
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
        entries, tensors = _plan_base(capture.state_of(base), mask)
        with storage.new_root(replace=found is RootState.STORE) as staging:
            writer = BaseWriter(tensors, chunk_bytes)
            staging.publish(BASE_NAME, writer.pieces(), overwrite=False)
            for entry in entries:
                entry.chunk_digests = writer.chunk_digests.get(entry.name, []) if entry.alias_of is None else []
            staging.publish(MASK_NAME, mask.file_bytes(), overwrite=False)
            staging.make_folder(STEPS_DIR)
            manifest = Manifest(entries, chunk_bytes, mask.digest, time.time())
            # The manifest goes last: a folder without it is never taken for a store.
            staging.publish(MANIFEST_NAME, [manifest.to_bytes()], overwrite=False)
        return cls(storage, manifest, mask)

    @staticmethod
    def is_store(path: PathLike | Storage, *, storage_options: Mapping[str, Any] | None = None) -> bool:
        """Whether ``path`` (a folder or a URL) looks like a store (has a manifest); ``open`` checks it fully."""
        return open_storage(path, storage_options=storage_options).root_state(MANIFEST_NAME) is RootState.STORE

    @classmethod
    def open(
        cls,
        path: PathLike | Storage,
        *,
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: PathLike | None = None,
    ) -> CheckpointStore:
        """Opens an existing store; checks its manifest and mask (the base is checked as it is read).

        Args:
            path: The store folder, or a URL such as ``s3://bucket/run1`` (``pip install 'fishckpt[remote]'``).
            storage_options: fsspec options for a URL (credentials, endpoint); see docs/storage.md.
            cache_dir: Where a remote store's base is cached, downloaded once per machine
                (default ``~/.cache/fishckpt/bases``).

        Raises:
            FormatError: ``path`` is not a store, or was written by a newer fishckpt.
            IntegrityError: The manifest or mask file is corrupted.
        """
        storage = open_storage(path, storage_options=storage_options, cache_dir=cache_dir)
        if isinstance(storage, LocalStorage) and not storage.root.is_dir():
            raise FormatError(f"{storage.url}: no such store folder")
        manifest_where = storage.where(MANIFEST_NAME)
        try:
            manifest_bytes = storage.read(MANIFEST_NAME)
        except FileNotFoundError:
            raise FormatError(manifest_format.missing_message(storage.url)) from None
        manifest = manifest_format.parse(manifest_bytes, where=manifest_where)
        mask_where = storage.where(MASK_NAME)
        try:
            mask = Mask.from_file_bytes(storage.read(MASK_NAME), where=mask_where)
        except FileNotFoundError:
            raise IntegrityError(f"{mask_where}: the store's mask file is missing") from None
        except FormatError as error:
            raise IntegrityError(f"{mask_where}: mask file is corrupted: {error}") from error
        if mask.digest != manifest.mask_digest:
            raise IntegrityError(f"{mask_where}: mask does not match the store manifest (digest mismatch)")
        return cls(storage, manifest, mask)

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
    def base_digest(self) -> str:
        """Identity of the base: every checkpoint records it and is refused by other bases."""
        return self._layout.manifest.base_digest

    @property
    def tensor_names(self) -> list[str]:
        return [entry.name for entry in self._layout.manifest.entries]

    @property
    def dense_bytes(self) -> int:
        """Bytes of one full state as raw tensors (tied tensors counted once)."""
        return sum(entry.nbytes for entry in self._layout.owners)

    @property
    def steps(self) -> list[int]:
        """Saved steps, ascending."""
        found = (step_of(name) for name in self._storage.list(STEPS_DIR))
        return sorted(step for step in found if step is not None)

    def step_path(self, step: int) -> Path | str:
        """Where step ``step``'s file lies (whether or not it is saved)."""
        return self._file(step_key(_check_step(step)))

    def files(self) -> dict[str, Path | str]:
        """The store's fixed files by role: ``manifest``, ``base``, ``mask`` (steps: see ``step_path``)."""
        return {"manifest": self._file(MANIFEST_NAME), "base": self._file(BASE_NAME), "mask": self._file(MASK_NAME)}

    def _file(self, name: str) -> Path | str:
        """A file of the store: a Path for a local store, a URL otherwise."""
        return self._storage.path(name) if isinstance(self._storage, LocalStorage) else self._storage.where(name)

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
    ) -> SaveInfo:
        """Stores ``state`` as step ``step``: the masked values, plus anything changed outside the mask.

        Args:
            state: A state dict or module with exactly the base's keys, shapes and dtypes.
            step: A non-negative integer.
            metadata: JSON-serialisable values kept with the checkpoint.
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

        Returns:
            A SaveInfo with the bytes written, k, what changed outside the mask and the time taken.

        Raises:
            StateMismatchError: A key is missing or extra, or a shape or dtype differs from the base.
            StepExistsError: ``step`` is saved already and ``overwrite`` is false.
            OutsideMaskError: ``strict`` and entries outside the mask changed.
            StoreLockedError: Another process is writing to this store.
        """
        if strict and not check_outside_mask:
            raise InvalidArgumentError(
                "strict=True needs check_outside_mask=True: changes can only be refused if looked for"
            )
        started = time.perf_counter()
        step = _check_step(step)
        layout = self._layout
        checked = capture.validated(layout, capture.state_of(state), where=self.location)
        tensors = {name: plain(tensor) for name, tensor in checked.items()}
        meta = _json_metadata(metadata)
        training_state = training.capture(optimizer, scheduler, rng)
        key = step_key(step)
        where = self._storage.where(key)
        with self._storage.lock():
            if self._storage.stat(key) is not None and not overwrite:
                raise StepExistsError(f"{where}: step {step} is already saved; pass overwrite=True to replace it")
            self._storage.remove_stale_temps(STEPS_DIR)
            captured = capture.collect(layout, tensors, check=check_outside_mask)
            if strict and captured.extras:
                listing = ", ".join(
                    f"{name} ({positions.numel()} entries)" for name, (positions, _) in captured.extras.items()
                )
                raise OutsideMaskError(
                    f"step {step} not saved: entries outside the mask changed: {listing}. Nothing was written; "
                    "save without strict to store them, or find what moves them (weight decay, buffers)"
                )
            encoded = stepcodec.encode(layout, step, captured, meta, training_state)
            try:
                written = self._storage.publish(
                    key, stepfile.pack(encoded.record, encoded.sections), overwrite=overwrite
                )
            except FileExistsError:
                raise StepExistsError(
                    f"{where}: step {step} is already saved; pass overwrite=True to replace it"
                ) from None
        if encoded.changed:
            listing = ", ".join(f"{name} ({n} entries, {encoded.storage[name]})" for name, n in encoded.changed.items())
            warnings.warn(
                OutsideMaskWarning(
                    f"step {step}: entries outside the mask changed and were stored too: {listing}. "
                    "If this is not expected, check weight decay and buffers (see docs/exactness.md)"
                ),
                stacklevel=2,
            )
        return SaveInfo(
            step=step,
            path=self.step_path(step),
            bytes_written=written,
            dense_bytes=self.dense_bytes,
            k=self.mask.k,
            changed_outside_mask=encoded.changed,
            outside_mask_storage=encoded.storage,
            checked_outside_mask=check_outside_mask,
            seconds=time.perf_counter() - started,
            training_state_bytes=encoded.record.training_bytes,
        )

    # Loading --------------------------------------------------------------------------------------

    def _decode(self, step: int) -> stepcodec.Decoded:
        """Reads, checks and decodes one step file (O(k)); recently decoded steps are reused."""
        key = step_key(step)
        found = self._storage.stat(key)
        if found is None:
            raise self._not_found(step)
        cached = self._decoded.get(step)
        if cached is not None and cached[0] == found.version:
            self._decoded[step] = self._decoded.pop(step)  # most recently used goes last
            return cached[1]
        where = self._storage.where(key)
        self._layout.plans()  # the base is opened and checked first, so its faults are never blamed on the step
        try:
            data = self._storage.read(key)
        except FileNotFoundError:
            raise self._not_found(step) from None
        record, container = stepfile.parse(data, where=where)
        if record.base_digest != self.base_digest or record.mask_digest != self.mask.digest:
            raise BaseMismatchError(
                f"{where}: checkpoint belongs to a store with another base or mask; it cannot be "
                "restored here. Restore it from the store that wrote it"
            )
        if record.step != step:
            raise FormatError(f"{where}: header does not describe step {step}")
        decoded = stepcodec.decode(self._layout, record, container, where=where)
        self._decoded[step] = (found.version, decoded)
        while len(self._decoded) > 2:
            del self._decoded[next(iter(self._decoded))]
        return decoded

    def _not_found(self, step: int) -> StepNotFoundError:
        return StepNotFoundError(
            f"{self.location}: step {step} is not in the store (saved steps: {_brief(self.steps)})"
        )

    def load(self, step: int, *, device: str | torch.device = "cpu", verify: bool = True) -> dict[str, torch.Tensor]:
        """Rebuilds the full state dict of ``step``, bit-identical to what was saved.

        Args:
            step: A saved step.
            device: Where the returned tensors live.
            verify: Check the base bytes against their digests and every rebuilt
                tensor against the digest recorded at save. Costs one hash pass
                (~0.04 s per GiB here); turn off only if you verify otherwise.

        Returns:
            A new state dict in the base's key order; tied keys share one tensor.

        Raises:
            StepNotFoundError: ``step`` is not saved.
            IntegrityError: A file is corrupted; the message names the file and tensor.
            BaseMismatchError: The checkpoint file belongs to another store.
        """
        decoded = self._decode(_check_step(step))
        device = torch.device(device)
        out: dict[str, torch.Tensor] = {}
        for entry in self._layout.manifest.entries:
            if entry.alias_of is not None:
                out[entry.name] = out[entry.alias_of]
                continue
            tensor = torch.empty(entry.shape, dtype=entry.dtype.torch_dtype)
            rebuild.rebuild(self._layout, entry, tensor, decoded, verify=verify)
            out[entry.name] = tensor if device.type == "cpu" else tensor.to(device)
        return out

    def load_into(self, target: StateLike, step: int, *, verify: bool = True) -> None:
        """Writes step ``step`` into an existing module or state dict, in place.

        If every tensor of ``target`` was last written by this store object's
        ``load_into`` and has not been modified since (tracked by PyTorch's
        version counters), only the entries that differ between the two steps
        are touched: O(k), not O(model). Otherwise the whole state is rewritten
        from the base.

        Args:
            target: A module or state dict with the base's keys, shapes and dtypes (any device).
            step: A saved step.
            verify: As in ``load``; on the O(k) path the rewritten entries are checked.

        Raises:
            StateMismatchError: ``target`` does not match the base.
            IntegrityError: As in ``load``.
        """
        step = _check_step(step)
        layout = self._layout
        # ``owners`` are the caller's own tensor objects (Parameters for a module), whose version
        # counters record later modification; ``tensors`` are detached views of them to write through.
        owners = capture.state_of(target)
        tensors = capture.validated(layout, owners, where=self.location)
        owners = {name: t for name, t in owners.items() if layout.entries[name].alias_of is None}
        decoded = self._decode(step)
        previous = self._residency.step_held(owners)
        with torch.no_grad():
            if previous is not None and previous != step and self._storage.stat(step_key(previous)) is not None:
                switch(layout, tensors, owners, self._decode(previous), decoded, verify=verify)
            elif previous != step:
                for name, tensor in tensors.items():
                    entry = layout.entries[name]
                    if entry.alias_of is not None:
                        continue
                    if tensor.device.type == "cpu" and tensor.is_contiguous() and plain(tensor) is tensor:
                        rebuild.rebuild(layout, entry, tensor, decoded, verify=verify)
                    else:
                        staged = torch.empty(entry.shape, dtype=entry.dtype.torch_dtype)
                        rebuild.rebuild(layout, entry, staged, decoded, verify=verify)
                        tensor.copy_(staged)
        for owner in owners.values():
            self._residency.remember(owner, step)

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
        decoded = self._decode(_check_step(step))
        tree = training.decode(decoded)
        for name, target in (("optimizer", optimizer), ("scheduler", scheduler)):
            if target is None:
                continue
            if name not in tree:
                raise StateMismatchError(
                    f"{decoded.where}: step {step} was saved without {name} state; pass {name}= to save"
                )
            target.load_state_dict(tree[name])
        if rng and "rng" in tree:
            training.restore_rng(tree["rng"])

    # Inspecting and maintaining ---------------------------------------------------------------

    def info(self, step: int) -> CheckpointInfo:
        """Describes a saved step from its (checksummed) file header."""
        step = _check_step(step)
        key = step_key(step)
        where = self._storage.where(key)
        try:
            data = self._storage.read(key)
        except (FileNotFoundError, IsADirectoryError):
            raise self._not_found(step) from None
        record, container = stepfile.parse(data, where=where)
        return CheckpointInfo(
            step=record.step,
            path=self.step_path(step),
            created=record.created,
            bytes=container.stored_bytes,
            dense_bytes=self.dense_bytes,
            k=record.k,
            changed_outside_mask={outside.name: outside.count for outside in record.outside},
            metadata=dict(record.metadata),
            training_state_bytes=record.training_bytes,
        )

    def report(self, *, steps: Iterable[int] | None = None) -> StoreReport:
        """Where the store's bytes go: base, mask, manifest and every step, against dense checkpoints.

        Args:
            steps: The steps to describe (default: every saved step); an iterable that
                draws a progress bar as it is consumed works too.
        """

        def size(name: str) -> int:
            found = self._storage.stat(name)
            return 0 if found is None else found.size

        return StoreReport(
            location=self.location,
            tensors=len(self._layout.entries),
            dense_bytes=self.dense_bytes,
            k=self.mask.k,
            numel=self.mask.numel,
            base_bytes=size(BASE_NAME),
            mask_bytes=size(MASK_NAME),
            manifest_bytes=size(MANIFEST_NAME),
            steps=[self.info(step) for step in (self.steps if steps is None else steps)],
        )

    def delete(self, step: int) -> None:
        """Removes a saved step. Other steps never depend on it."""
        step = _check_step(step)
        with self._storage.lock():
            try:
                self._storage.delete(step_key(step))
            except FileNotFoundError:
                raise StepNotFoundError(f"{self.location}: step {step} is not in the store") from None

    def verify(self, steps: int | Iterable[int] | None = None, *, base: bool | None = None) -> None:
        """Re-reads files and checks every digest, reporting every failure found.

        A step's check decodes its file and recomputes each tensor's digest; the
        base check hashes every chunk of the base file.

        Args:
            steps: A step, several, or None for every saved step.
            base: Hash the base file too. Default: only when ``steps`` is None.

        Raises:
            VerifyError: (an IntegrityError) listing each failing file and tensor.
        """
        failures: list[VerifyFailure] = []
        if base if base is not None else steps is None:
            failures.extend(self._verify_base())
            if failures and failures[0].tensor is None:  # the base cannot even be opened
                raise VerifyError(failures)
        if steps is None:
            numbers = self.steps
        elif isinstance(steps, int | np.integer):
            numbers = [_check_step(int(steps))]
        else:
            numbers = [_check_step(step) for step in steps]
        for number in numbers:
            file = self._file(step_key(number))
            try:
                decoded = self._decode(number)
                for entry in self._layout.owners:
                    if not rebuild.digest_matches(self._layout, entry, decoded):
                        failures.append(VerifyFailure(file, entry.name, "does not match its recorded digest"))
            except (IntegrityError, FormatError, BaseMismatchError, StepNotFoundError) as error:
                failures.append(VerifyFailure(file, None, _without_prefix(str(error), str(file))))
        if failures:
            raise VerifyError(failures)

    def _verify_base(self) -> list[VerifyFailure]:
        layout = self._layout
        file = self._file(BASE_NAME)
        try:
            layout.base()
        except (IntegrityError, FormatError) as error:
            return [VerifyFailure(file, None, _without_prefix(str(error), str(file)))]
        failures = []
        for entry in layout.owners:
            failed = layout.check_base_chunks(entry, layout.base_bytes(entry))
            if failed is not None:
                failures.append(VerifyFailure(file, entry.name, f"chunk {failed} does not match its digest"))
        return failures


# Helpers ---------------------------------------------------------------------------------------


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise InvalidArgumentError(f"step must be a non-negative integer, got {step!r}")
    return int(step)


def _plan_base(
    state: dict[str, torch.Tensor], mask: Mask
) -> tuple[list[TensorEntry], list[tuple[str, torch.Tensor, DType]]]:
    """Validates a base state against a mask; finds tied tensors; returns entries and tensors to write."""
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
        tensor = tensor.detach()
        view_key = (
            (
                tensor.device,
                tensor.untyped_storage().data_ptr(),
                tensor.storage_offset(),
                tuple(tensor.shape),
                tensor.stride(),
                tensor.dtype,
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


def _json_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidArgumentError("metadata must be a mapping of JSON-serialisable values")
    try:
        text = json.dumps(dict(metadata), allow_nan=False)
    except (TypeError, ValueError) as error:
        bad = next((key for key, value in metadata.items() if not _jsonable(value)), None)
        raise InvalidArgumentError(f"metadata key {bad!r} is not JSON-serialisable: {error}") from error
    result: dict[str, Any] = json.loads(text)
    return result


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _without_prefix(message: str, where: str) -> str:
    prefix = f"{where}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _brief(steps: list[int]) -> str:
    if not steps:
        return "none"
    return ", ".join(map(str, steps[:5])) + (f", ... ({len(steps)} in all)" if len(steps) > 5 else "")
