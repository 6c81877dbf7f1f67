"""CheckpointStore: a dense base written once, then one small verified file per saved step."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from . import _codec, _container, _scan, _training
from ._basefile import TensorEntry, chunk_elements, chunk_ranges, digest_of, open_base, write_base
from ._dtypes import WORD_DTYPE, DType, bytes_as_elements, dtype_by_name, dtype_row, element_words
from ._errors import (
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
)
from ._files import byte_view
from ._io import atomic_write, exclusive_lock, fsync_dir, remove_stale_temps, temp_path_for
from ._manifest import BASE_NAME, LOCK_NAME, MANIFEST_NAME, MASK_NAME, STEPS_DIR, Manifest, read_manifest
from ._mask import Mask
from ._records import CheckpointInfo, SaveInfo, VerifyError, VerifyFailure
from ._scan import MaskPlan

PathLike = str | Path
StateLike = Mapping[str, torch.Tensor] | torch.nn.Module

DEFAULT_CHUNK_BYTES = 4 << 20  # stays in cache, so copy-then-hash reads main memory once; 4 MiB beat 1 MiB here
_STEP_FILE = re.compile(r"^step-(\d+)\.fishckpt$")
_TENSOR_DIGEST_TAG = b"fishckpt-tensor-v1\x00"

if sys.byteorder != "little":  # the format is little-endian and the codec works on native views
    raise ImportError("fishckpt supports little-endian machines only")


# Element views ----------------------------------------------------------------------------------


def _words_np(elements: torch.Tensor) -> np.ndarray:
    """Element words as an unsigned numpy array (a view), for the codec and hashing."""
    return _codec.as_words(elements.numpy().reshape(-1), elements.element_size())


def _differs(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    ne = current != reference
    return ne.any(dim=1) if ne.dim() == 2 else ne


# The store ------------------------------------------------------------------------------------


@dataclass
class _Group:
    """Masked values of every tensor whose words have one width, coded as one stream."""

    width: int
    members: list[tuple[str, int, int]]  # (tensor, start word, stop word)
    base_words: np.ndarray
    order: np.ndarray


@dataclass
class _Decoded:
    """A checkpoint file decoded: masked element words and outside-mask changes per tensor."""

    path: Path
    header: dict[str, Any]
    masked: dict[str, torch.Tensor]
    extras: dict[str, tuple[torch.Tensor | None, torch.Tensor]]  # positions (None if dense), words


@dataclass
class _Resident:
    """What ``load_into`` left in a target tensor, to switch steps in O(k) later."""

    step: int
    version: int


def _state_of(state: StateLike) -> dict[str, torch.Tensor]:
    if isinstance(state, torch.nn.Module):
        return dict(state.state_dict(keep_vars=True))
    if not isinstance(state, Mapping):
        raise TypeError(f"expected a state dict or an nn.Module, got {type(state).__name__}")
    return dict(state)


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise InvalidArgumentError(f"step must be a non-negative integer, got {step!r}")
    return int(step)


def _step_file_name(step: int) -> str:
    return f"step-{step:012d}.fishckpt"


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

    def __init__(self, path: Path, manifest: Manifest, mask: Mask) -> None:
        """Use ``CheckpointStore.create`` or ``CheckpointStore.open``."""
        self.path = path
        self._manifest = manifest
        self._mask = mask
        self._entries = {entry.name: entry for entry in manifest.entries}
        self._base: dict[str, torch.Tensor] | None = None
        self._plans: dict[str, MaskPlan] | None = None
        self._groups: list[_Group] | None = None
        self._scratch: torch.Tensor | None = None
        self._scratch_lock = threading.Lock()
        self._device_index: dict[tuple[str, torch.device], torch.Tensor] = {}
        # The last few decoded steps (O(k) each), keyed by step and the file's identity, so
        # switching between steps decodes only the step switched to.
        self._decoded: dict[int, tuple[tuple[int, int, int], _Decoded]] = {}
        # id(tensor) -> (weak reference, record); a WeakKeyDictionary would compare tensors with ==.
        self._resident: dict[int, tuple[weakref.ref[torch.Tensor], _Resident]] = {}

    # Creating and opening -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: PathLike,
        base: StateLike,
        mask: Mask,
        *,
        overwrite: bool = False,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
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

        Raises:
            StoreExistsError: ``path`` holds files and ``overwrite`` does not apply.
            MaskMismatchError: The mask names a tensor the base lacks, or a shape differs.
            FormatError: A tensor has a dtype fishckpt cannot store.
        """
        path = Path(path)
        replacing = False
        if path.exists():
            if not path.is_dir():
                raise StoreExistsError(f"{path}: exists and is not a folder; choose another path")
            if any(path.iterdir()):
                if not (overwrite and (path / MANIFEST_NAME).is_file()):
                    raise StoreExistsError(
                        f"{path}: folder is not empty; choose a new path"
                        + (
                            " (or pass overwrite=True to replace the fishckpt store there)"
                            if (path / MANIFEST_NAME).is_file()
                            else ""
                        )
                    )
                replacing = True
        if chunk_bytes < 64 or chunk_bytes % 16:
            raise InvalidArgumentError("chunk_bytes must be a multiple of 16 and at least 64")
        state = _state_of(base)
        entries, tensors = _plan_base(state, mask)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = temp_path_for(path)
        staging.mkdir()
        try:
            digests = write_base(staging / BASE_NAME, tensors, chunk_bytes)
            for entry, chunk_digests in zip((e for e in entries if e.alias_of is None), digests, strict=True):
                entry.chunk_digests = chunk_digests
            for entry in entries:
                if entry.alias_of is not None:
                    entry.chunk_digests = []
            mask.save(staging / MASK_NAME)
            (staging / STEPS_DIR).mkdir()
            manifest = Manifest(entries, chunk_bytes, mask.digest, time.time())
            # The manifest goes last: a folder without it is never taken for a store.
            atomic_write(staging / MANIFEST_NAME, [json.dumps(manifest.to_json(), indent=1).encode()], overwrite=False)
            fsync_dir(staging / STEPS_DIR)
            fsync_dir(staging)
            if replacing:
                retired = temp_path_for(path)
                path.rename(retired)
                staging.rename(path)
                shutil.rmtree(retired)
            else:
                if path.exists():
                    path.rmdir()  # an empty folder the caller made
                staging.rename(path)
            fsync_dir(path.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cls(path, manifest, mask)

    @staticmethod
    def is_store(path: PathLike) -> bool:
        """Whether ``path`` looks like a store (has a manifest); ``open`` checks it fully."""
        return (Path(path) / MANIFEST_NAME).is_file()

    @classmethod
    def open(cls, path: PathLike) -> CheckpointStore:
        """Opens an existing store; checks its manifest and mask (the base is checked as it is read).

        Raises:
            FormatError: ``path`` is not a store, or was written by a newer fishckpt.
            IntegrityError: The manifest or mask file is corrupted.
        """
        path = Path(path)
        if not path.is_dir():
            raise FormatError(f"{path}: no such store folder")
        manifest = read_manifest(path / MANIFEST_NAME)
        mask_path = path / MASK_NAME
        try:
            mask = Mask.load(mask_path)
        except FileNotFoundError:
            raise IntegrityError(f"{mask_path}: the store's mask file is missing") from None
        except FormatError as error:
            raise IntegrityError(f"{mask_path}: mask file is corrupted: {error}") from error
        if mask.digest != manifest.mask_digest:
            raise IntegrityError(f"{mask_path}: mask does not match the store manifest (digest mismatch)")
        return cls(path, manifest, mask)

    # Properties -----------------------------------------------------------------------------------

    @property
    def mask(self) -> Mask:
        return self._mask

    @property
    def base_digest(self) -> str:
        """Identity of the base: every checkpoint records it and is refused by other bases."""
        return self._manifest.base_digest

    @property
    def tensor_names(self) -> list[str]:
        return [entry.name for entry in self._manifest.entries]

    @property
    def dense_bytes(self) -> int:
        """Bytes of one full state as raw tensors (tied tensors counted once)."""
        return sum(e.nbytes for e in self._manifest.entries if e.alias_of is None)

    @property
    def steps(self) -> list[int]:
        """Saved steps, ascending."""
        found = []
        for entry in (self.path / STEPS_DIR).iterdir():
            match = _STEP_FILE.match(entry.name)
            if match and entry.name == _step_file_name(int(match.group(1))):
                found.append(int(match.group(1)))
        return sorted(found)

    def step_path(self, step: int) -> Path:
        return self.path / STEPS_DIR / _step_file_name(_check_step(step))

    def __repr__(self) -> str:
        return f"CheckpointStore({str(self.path)!r}, tensors={len(self._entries)}, k={self._mask.k})"

    # Lazily derived state -------------------------------------------------------------------------

    def _base_tensors(self) -> dict[str, torch.Tensor]:
        if self._base is None:
            self._base = open_base(self.path / BASE_NAME, self._manifest.entries)
        return self._base

    def _plan(self) -> dict[str, MaskPlan]:
        if self._plans is None:
            base = self._base_tensors()
            plans = {}
            for entry in self._manifest.entries:
                if entry.alias_of is not None:
                    continue
                index = self._mask[entry.name] if entry.name in self._mask else torch.zeros(0, dtype=torch.int64)
                plans[entry.name] = MaskPlan.build(entry, index, base[entry.name], self._manifest.chunk_bytes)
            self._plans = plans
        return self._plans

    def _value_groups(self) -> list[_Group]:
        if self._groups is None:
            plans = self._plan()
            by_width: dict[int, list[tuple[str, torch.Tensor]]] = {}
            for entry in self._manifest.entries:
                if entry.alias_of is None and plans[entry.name].index.numel():
                    by_width.setdefault(entry.dtype.word_bytes, []).append((entry.name, plans[entry.name].base_masked))
            groups = []
            for width in sorted(by_width):
                members, parts, start = [], [], 0
                for name, words in by_width[width]:
                    flat = _words_np(words)
                    members.append((name, start, start + flat.size))
                    parts.append(flat)
                    start += flat.size
                base_words = np.concatenate(parts)
                groups.append(_Group(width, members, base_words, _codec.exponent_order(base_words)))
            self._groups = groups
        return self._groups

    def _scratch_buffer(self) -> torch.Tensor:
        if self._scratch is None:
            self._scratch = torch.empty(self._manifest.chunk_bytes, dtype=torch.uint8)
        return self._scratch

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
                (one read of the state, ~0.1 s per GiB on CPU) and store what changed.
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
        tensors = {name: _plain(t) for name, t in self._validated_state(_state_of(state)).items()}
        meta = _json_metadata(metadata)
        training = _training_tree(optimizer, scheduler, rng)
        target = self.step_path(step)
        with exclusive_lock(self.path / LOCK_NAME):
            if target.exists() and not overwrite:
                raise StepExistsError(f"{target}: step {step} is already saved; pass overwrite=True to replace it")
            remove_stale_temps(self.path / STEPS_DIR)
            masked, extras = self._collect(tensors, check_outside_mask)
            if strict and extras:
                listing = ", ".join(f"{name} ({positions.numel()} entries)" for name, (positions, _) in extras.items())
                raise OutsideMaskError(
                    f"step {step} not saved: entries outside the mask changed: {listing}. Nothing was written; "
                    "save without strict to store them, or find what moves them (weight decay, buffers)"
                )
            header, sections, counts, modes = self._encode(step, masked, extras, meta, training)
            pieces = _container.pack(_container.CHECKPOINT_MAGIC, header, sections)
            written = atomic_write(target, pieces, overwrite=overwrite)
        if counts:
            listing = ", ".join(f"{name} ({n} entries, {modes[name]})" for name, n in counts.items())
            warnings.warn(
                OutsideMaskWarning(
                    f"step {step}: entries outside the mask changed and were stored too: {listing}. "
                    "If this is not expected, check weight decay and buffers (see docs/exactness.md)"
                ),
                stacklevel=2,
            )
        return SaveInfo(
            step=step,
            path=target,
            bytes_written=written,
            dense_bytes=self.dense_bytes,
            k=self._mask.k,
            changed_outside_mask=counts,
            outside_mask_storage=modes,
            checked_outside_mask=check_outside_mask,
            seconds=time.perf_counter() - started,
            training_state_bytes=_training_bytes(header, [len(section.payload) for section in sections]),
        )

    def _validated_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [name for name in self._entries if name not in state]
        extra = [name for name in state if name not in self._entries]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing key(s) {missing[:5]}")
            if extra:
                parts.append(f"unexpected key(s) {extra[:5]}")
            raise StateMismatchError(
                f"{self.path}: state does not match the store's base: {'; '.join(parts)}. "
                "Save the same model the store was created from"
            )
        out = {}
        for name, entry in self._entries.items():
            tensor = state[name]
            if not isinstance(tensor, torch.Tensor):
                raise StateMismatchError(f"key {name!r}: expected a tensor, got {type(tensor).__name__}")
            if tensor.layout != torch.strided:
                raise StateMismatchError(
                    f"key {name!r}: {tensor.layout} tensors are not supported; make it dense with .to_dense()"
                )
            if tensor.is_meta:
                raise StateMismatchError(f"key {name!r} is on the meta device and holds no data; materialise it first")
            if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype.torch_dtype:
                raise StateMismatchError(
                    f"key {name!r}: state has {tensor.dtype} {tuple(tensor.shape)}, the base has "
                    f"{entry.dtype.torch_dtype} {entry.shape}; cast or reshape it to match"
                )
            out[name] = tensor.detach()
        for name, entry in self._entries.items():
            if entry.alias_of is not None:
                tied, source = out[name], out[entry.alias_of]
                same_view = (
                    tied.data_ptr() == source.data_ptr()
                    and tied.stride() == source.stride()
                    and tied.device == source.device
                )
                same_bits = same_view or torch.equal(
                    element_words(_plain(tied).contiguous()), element_words(_plain(source).contiguous())
                )
                if not same_bits:
                    raise StateMismatchError(
                        f"key {name!r} was tied to {entry.alias_of!r} in the base but now differs from it; "
                        "keep the weights tied, or create a new store from an untied base"
                    )
        return out

    def _collect(
        self, tensors: dict[str, torch.Tensor], check: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Gathers masked element words and, if ``check``, every change outside the mask."""
        plans = self._plan()
        owners = [entry for entry in self._manifest.entries if entry.alias_of is None]
        if not check:
            # index_select releases the GIL, so gathers of different tensors overlap (13 -> 8 ms per GiB here).
            # Each worker makes its own contiguous copy, so at most two exist at once.
            with ThreadPoolExecutor(max_workers=2) as pool:
                gathered = pool.map(
                    lambda e: self._gather(e.name, plans[e.name].index, _contiguous(tensors[e.name])), owners
                )
                return {entry.name: values for entry, values in zip(owners, gathered, strict=True)}, {}

        # The C scan releases the GIL, so two tensors scan at once; the torch fallback shares one
        # scratch buffer under a lock. Each worker makes its own contiguous copy: at most two exist.
        def scan(entry: TensorEntry) -> tuple[torch.Tensor, list[int]]:
            tensor = _contiguous(tensors[entry.name])
            if _scan.runs_native(tensor):
                return _scan.scan(entry, plans[entry.name], tensor, scratch=None)
            with self._scratch_lock:
                return _scan.scan(entry, plans[entry.name], tensor, self._scratch_buffer())

        with ThreadPoolExecutor(max_workers=2) as pool:
            scanned = list(pool.map(scan, owners))
        masked: dict[str, torch.Tensor] = {}
        extras: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for entry, (values, differing) in zip(owners, scanned, strict=True):
            masked[entry.name] = values
            if differing:
                tensor = _contiguous(tensors[entry.name])
                positions = torch.cat([self._chunk_changes(entry, number, tensor) for number in differing])
                extras[entry.name] = (positions, self._gather(entry.name, positions, tensor, cache=False))
        return masked, extras

    def _gather(self, name: str, index: torch.Tensor, tensor: torch.Tensor, *, cache: bool = True) -> torch.Tensor:
        """Element words of ``tensor`` at ``index``, gathered where the tensor lives; returns CPU words."""
        if tensor.device.type != "cpu":
            key = (name, tensor.device)
            device_index = self._device_index.get(key) if cache else None
            if device_index is None:
                device_index = index.to(tensor.device)
                if cache:
                    self._device_index[key] = device_index
            return element_words(tensor).index_select(0, device_index).cpu()
        return element_words(tensor).index_select(0, index)

    def _chunk_changes(self, entry: TensorEntry, number: int, tensor: torch.Tensor) -> torch.Tensor:
        """Positions in chunk ``number`` where ``tensor``, its masked entries reset, differs from the base."""
        plan = self._plan()[entry.name]
        itemsize = entry.dtype.itemsize
        start, stop = _scan.chunk_span(entry, plan, number)
        base_chunk = byte_view(self._base_tensors()[entry.name])[start * itemsize : stop * itemsize]
        # The base itself may be what changed: never record a damaged base as changes of the state.
        if digest_of(base_chunk) != entry.chunk_digests[number]:
            raise IntegrityError(
                f"{self.path / BASE_NAME}: tensor {entry.name!r}: base bytes no longer match their digest "
                f"(chunk {number}); the base file is corrupted; restore it from a copy"
            )
        with self._scratch_lock:
            chunk = _scan.reset_chunk(entry, plan, byte_view(tensor), number, self._scratch_buffer())
            current, reference = bytes_as_elements(chunk, entry.dtype), bytes_as_elements(base_chunk, entry.dtype)
            where = torch.nonzero(_differs(current, reference))
        return where.reshape(-1) + start

    def _encode(
        self,
        step: int,
        masked: dict[str, torch.Tensor],
        extras: dict[str, tuple[torch.Tensor, torch.Tensor]],
        metadata: dict[str, Any],
        training: tuple[Any, list[torch.Tensor]] | None = None,
    ) -> tuple[dict[str, Any], list[_container.Section], dict[str, int], dict[str, str]]:
        sections: list[_container.Section] = []
        value_streams = []
        for group in self._value_groups():
            new_words = np.concatenate([_words_np(masked[name]) for name, _, _ in group.members])
            value_streams.append([group.width, new_words.size, len(sections)])
            sections.extend(_codec.encode_delta(new_words, group.base_words, group.order))
        base = self._base_tensors()
        extra_records = []
        counts: dict[str, int] = {}
        modes: dict[str, str] = {}
        for name, (positions, words) in extras.items():
            entry = self._entries[name]
            base_elements = element_words(base[name])
            count = positions.numel()
            first = len(sections)
            if count * (8 + entry.dtype.itemsize) < entry.nbytes:
                gap_width, gap_sections = _codec.encode_positions(positions.numpy())
                sections.extend(gap_sections)
                sections.extend(
                    _codec.encode_delta(_words_np(words), _words_np(base_elements.index_select(0, positions)))
                )
                mode = "sparse"
            else:
                gap_width = 0
                full = base_elements.clone()
                full.index_copy_(0, positions, words)
                sections.extend(_codec.encode_delta(_words_np(full), _words_np(base_elements)))
                mode = "dense"
            extra_records.append([name, mode, count, gap_width, first, len(sections) - first])
            counts[name], modes[name] = count, mode
        digests = {
            entry.name: self._tensor_digest(entry, masked[entry.name], *(extras.get(entry.name) or (None, None)))
            for entry in self._manifest.entries
            if entry.alias_of is None
        }
        header = {
            "kind": "checkpoint",
            "step": step,
            "created": time.time(),
            "base_digest": self._manifest.base_digest,
            "mask_digest": self._manifest.mask_digest,
            "k": self._mask.k,
            "values": value_streams,
            "outside_mask": extra_records,
            "digests": digests,
            "metadata": metadata,
        }
        if training is not None:
            tree, tensors = training
            table = []
            for tensor in tensors:
                row = dtype_row(tensor.dtype, key="training state")
                first = len(sections)
                sections.extend(_codec.encode_words(_words_np(element_words(tensor))))
                table.append([row.name, list(tensor.shape), first, len(sections) - first])
            header["training"] = {"tree": tree, "tensors": table}
        return header, sections, counts, modes

    def _tensor_digest(
        self, entry: TensorEntry, masked: torch.Tensor, positions: torch.Tensor | None, words: torch.Tensor | None
    ) -> str:
        """The digest of a reconstructed tensor T (docs/format.md, "Tensor digests").

        Given the base B (pinned by its chunk digests) and the mask M, T is
        determined by T[M] and by the positions outside M where T != B with
        their values, so hashing those identifies T in O(k).
        """
        hasher = xxhash.xxh3_128(_TENSOR_DIGEST_TAG)
        hasher.update(entry.digest)
        hasher.update(_words_np(masked).data)
        count = 0 if positions is None else positions.numel()
        hasher.update(struct.pack("<Q", count))
        if positions is not None and words is not None and count:
            hasher.update(positions.numpy().astype("<i8", copy=False).data)
            hasher.update(_words_np(words).data)
        return hasher.hexdigest()

    # Loading --------------------------------------------------------------------------------------

    def _decode(self, step: int) -> _Decoded:
        """Reads, checks and decodes one checkpoint file (O(k)); recently decoded steps are reused."""
        path = self.step_path(step)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise StepNotFoundError(
                f"{self.path}: step {step} is not in the store (saved steps: {_brief(self.steps)})"
            ) from None
        identity = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        cached = self._decoded.get(step)
        if cached is not None and cached[0] == identity:
            self._decoded[step] = self._decoded.pop(step)  # most recently used goes last
            return cached[1]
        decoded = self._decode_file(step, path)
        self._decoded[step] = (identity, decoded)
        while len(self._decoded) > 2:
            del self._decoded[next(iter(self._decoded))]
        return decoded

    def _decode_file(self, step: int, path: Path) -> _Decoded:
        container = _container.read(path, _container.CHECKPOINT_MAGIC, what="checkpoint")
        header = container.header
        if header.get("base_digest") != self._manifest.base_digest or header.get("mask_digest") != self._mask.digest:
            raise BaseMismatchError(
                f"{path}: checkpoint belongs to a store with another base or mask; it cannot be "
                "restored here. Restore it from the store that wrote it"
            )
        if header.get("kind") != "checkpoint" or header.get("step") != step:
            raise FormatError(f"{path}: header does not describe step {step}")
        plans = self._plan()
        masked: dict[str, torch.Tensor] = {}
        try:
            streams = header["values"]
            groups = self._value_groups()
            if len(streams) != len(groups):
                raise FormatError(f"{path}: {len(streams)} value streams, the store has {len(groups)}")
            for group, (width, count, first) in zip(groups, streams, strict=True):
                if width != group.width or count != group.base_words.size:
                    raise FormatError(
                        f"{path}: value stream of width {width} has {count} words, expected "
                        f"{group.base_words.size} of width {group.width}"
                    )
                planes = [container.section(first + i) for i in range(width)]
                words = _codec.decode_delta(planes, group.base_words, group.order)
                for name, lo, hi in group.members:
                    template = plans[name].base_masked
                    masked[name] = torch.from_numpy(words[lo:hi].copy()).view(template.dtype).reshape(template.shape)
            for entry in self._manifest.entries:
                if entry.alias_of is None and entry.name not in masked:
                    masked[entry.name] = plans[entry.name].base_masked[:0]
            extras: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
            base = self._base_tensors()
            for name, mode, count, gap_width, first, n_sections in header["outside_mask"]:
                found = self._entries.get(name)
                if found is None or found.alias_of is not None:
                    raise FormatError(f"{path}: changes recorded for unknown tensor {name!r}")
                entry = found
                base_elements = element_words(base[name])
                if mode == "sparse":
                    if not 0 < count <= entry.numel or gap_width not in (4, 8):
                        raise FormatError(f"{path}: tensor {name!r}: bad outside-mask record")
                    positions = torch.from_numpy(
                        _codec.decode_positions(
                            [container.section(first + i) for i in range(gap_width)], count, gap_width
                        )
                    )
                    if int(positions[-1]) >= entry.numel:
                        raise FormatError(f"{path}: tensor {name!r}: outside-mask position out of range")
                    if bool(torch.isin(positions, plans[name].index).any()):
                        raise FormatError(f"{path}: tensor {name!r}: an outside-mask position lies inside the mask")
                    base_words = _words_np(base_elements.index_select(0, positions))
                    planes = [container.section(first + gap_width + i) for i in range(n_sections - gap_width)]
                    words = _codec.decode_delta(planes, base_words)
                    extras[name] = (
                        positions,
                        torch.from_numpy(words).view(base_elements.dtype).reshape((count, *base_elements.shape[1:])),
                    )
                elif mode == "dense":
                    planes = [container.section(first + i) for i in range(n_sections)]
                    words = _codec.decode_delta(planes, _words_np(base_elements))
                    extras[name] = (
                        None,
                        torch.from_numpy(words).view(base_elements.dtype).reshape(base_elements.shape),
                    )
                else:
                    raise FormatError(f"{path}: tensor {name!r}: unknown outside-mask mode {mode!r}")
        except (KeyError, TypeError, ValueError) as error:
            raise FormatError(f"{path}: malformed checkpoint header: {error!r}") from error
        return _Decoded(path, header, masked, extras)

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
        for entry in self._manifest.entries:
            if entry.alias_of is not None:
                out[entry.name] = out[entry.alias_of]
                continue
            tensor = torch.empty(entry.shape, dtype=entry.dtype.torch_dtype)
            self._rebuild(entry, tensor, decoded, verify=verify)
            out[entry.name] = tensor if device.type == "cpu" else tensor.to(device)
        return out

    def _rebuild(self, entry: TensorEntry, out: torch.Tensor, decoded: _Decoded, *, verify: bool) -> None:
        """Writes step ``decoded`` of one tensor into the contiguous CPU tensor ``out``."""
        base = self._base_tensors()[entry.name]
        itemsize = entry.dtype.itemsize
        source, target = byte_view(base), byte_view(out)
        # One whole copy, then hash the copy: chunked copies into fresh pages ran 4x slower at times.
        target.copy_(source)
        if verify:
            per_chunk = chunk_elements(itemsize, self._manifest.chunk_bytes) * itemsize
            for number, (start, stop) in enumerate(chunk_ranges(target.numel(), per_chunk)):
                if digest_of(target[start:stop]) != entry.chunk_digests[number]:
                    raise IntegrityError(
                        f"{self.path / BASE_NAME}: tensor {entry.name!r} is corrupted (chunk {number} does not "
                        "match its digest); the base file is damaged; restore it from a copy"
                    )
        self._apply(entry, out, decoded)
        if verify:
            self._check_rebuilt(entry, out, decoded)

    def _apply(self, entry: TensorEntry, out: torch.Tensor, decoded: _Decoded) -> None:
        """Scatters a step's masked values and outside-mask changes into ``out`` (already the base)."""
        elements = element_words(out)
        positions, words = decoded.extras.get(entry.name, (None, None))
        if words is not None and positions is None:
            # A dense record is the whole tensor outside the mask (masked entries hold base values),
            # so it goes first and the masked values over it.
            elements.copy_(words.to(out.device))
        index = self._plan()[entry.name].index
        if index.numel():
            values = decoded.masked[entry.name]
            if out.device.type != "cpu":
                index, values = self._device_index_for(entry.name, out.device), values.to(out.device)
            elements.index_copy_(0, index, values)
        if words is not None and positions is not None:
            elements.index_copy_(0, positions.to(out.device), words.to(out.device))

    def _device_index_for(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._device_index:
            self._device_index[key] = self._plan()[name].index.to(device)
        return self._device_index[key]

    def _check_rebuilt(self, entry: TensorEntry, out: torch.Tensor, decoded: _Decoded) -> None:
        """Reads the rebuilt tensor back at every position the step set, and checks its digest."""
        elements = element_words(out)
        index = self._plan()[entry.name].index
        masked_back = elements.index_select(0, index.to(out.device)).cpu()
        positions, words = None, None
        if entry.name in decoded.extras:
            positions, _ = decoded.extras[entry.name]
            if positions is None:  # dense: recover the canonical set of changed positions
                base_elements = element_words(self._base_tensors()[entry.name])
                changed = _differs(elements.cpu(), base_elements)
                changed[index] = False
                positions = torch.nonzero(changed).reshape(-1)
            words = elements.index_select(0, positions.to(out.device)).cpu()
        if self._tensor_digest(entry, masked_back, positions, words) != decoded.header["digests"].get(entry.name):
            raise IntegrityError(
                f"{decoded.path}: tensor {entry.name!r} does not match the digest recorded at save; "
                "the checkpoint file is damaged; restore it from a copy or delete this step"
            )

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
        # ``owners`` are the caller's own tensor objects (Parameters for a module), whose version
        # counters record later modification; ``tensors`` are detached views of them to write through.
        owners = _state_of(target)
        tensors = self._validated_state(owners)
        owners = {name: t for name, t in owners.items() if self._entries[name].alias_of is None}
        decoded = self._decode(step)
        previous = self._resident_step(owners)
        with torch.no_grad():
            if previous is not None and previous != step and self.step_path(previous).is_file():
                self._switch(tensors, owners, self._decode(previous), decoded, verify=verify)
            elif previous != step:
                for name, tensor in tensors.items():
                    entry = self._entries[name]
                    if entry.alias_of is not None:
                        continue
                    if tensor.device.type == "cpu" and tensor.is_contiguous() and _plain(tensor) is tensor:
                        self._rebuild(entry, tensor, decoded, verify=verify)
                    else:
                        staged = torch.empty(entry.shape, dtype=entry.dtype.torch_dtype)
                        self._rebuild(entry, staged, decoded, verify=verify)
                        tensor.copy_(staged)
        for owner in owners.values():
            self._remember(owner, step)

    def _remember(self, owner: torch.Tensor, step: int) -> None:
        key = id(owner)

        def forget(_: object) -> None:
            self._resident.pop(key, None)

        self._resident[key] = (weakref.ref(owner, forget), _Resident(step, owner._version))

    def _resident_step(self, owners: dict[str, torch.Tensor]) -> int | None:
        steps = set()
        for owner in owners.values():
            found = self._resident.get(id(owner))
            if found is None or found[0]() is not owner or found[1].version != owner._version:
                return None
            steps.add(found[1].step)
        return steps.pop() if len(steps) == 1 else None

    def _switch(
        self,
        tensors: dict[str, torch.Tensor],
        owners: dict[str, torch.Tensor],
        old: _Decoded,
        new: _Decoded,
        *,
        verify: bool,
    ) -> None:
        """Moves tensors from step ``old`` to step ``new`` touching only entries either step set."""
        base = self._base_tensors()
        for name in owners:
            entry = self._entries[name]
            tensor = tensors[name]
            work = _plain(tensor).contiguous()  # the tensor itself where it can be written as bits
            elements = element_words(work)
            if name in old.extras:  # undo the old step's changes outside the mask
                positions, _ = old.extras[name]
                base_elements = element_words(base[name])
                if positions is None:
                    elements.copy_(base_elements.to(work.device))
                else:
                    elements.index_copy_(
                        0, positions.to(work.device), base_elements.index_select(0, positions).to(work.device)
                    )
            self._apply(entry, work, new)
            if verify:
                self._check_rebuilt(entry, work, new)
            if work is not tensor:
                tensor.copy_(work)

    # Inspecting and maintaining ---------------------------------------------------------------

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
        tree = self._training_state(decoded)
        for name, target in (("optimizer", optimizer), ("scheduler", scheduler)):
            if target is None:
                continue
            if name not in tree:
                raise StateMismatchError(
                    f"{decoded.path}: step {step} was saved without {name} state; pass {name}= to save"
                )
            target.load_state_dict(tree[name])
        if rng and "rng" in tree:
            _training.restore_rng(tree["rng"])

    def _training_state(self, decoded: _Decoded) -> dict[str, Any]:
        record = decoded.header.get("training")
        if record is None:
            return {}
        container = _container.read(decoded.path, _container.CHECKPOINT_MAGIC, what="checkpoint")
        tensors = []
        try:
            for dtype_name, shape, first, count in record["tensors"]:
                row = dtype_by_name(dtype_name, where=str(decoded.path))
                numel = math.prod(int(s) for s in shape)
                words = _codec.decode_words(
                    [container.section(first + i) for i in range(count)],
                    numel * (row.itemsize // row.word_bytes),
                    row.word_bytes,
                )
                flat = torch.from_numpy(words.copy()).view(WORD_DTYPE[row.word_bytes])
                tensors.append(flat.view(row.torch_dtype).reshape([int(s) for s in shape]))
            tree = _training.decode_tree(record["tree"], tensors, where=str(decoded.path))
        except (KeyError, TypeError, ValueError) as error:
            raise FormatError(f"{decoded.path}: malformed training state: {error!r}") from error
        if not isinstance(tree, dict):
            raise FormatError(f"{decoded.path}: malformed training state")
        return tree

    def info(self, step: int) -> CheckpointInfo:
        """Describes a saved step from its (checksummed) file header."""
        path = self.step_path(step)
        if not path.is_file():
            raise StepNotFoundError(f"{self.path}: step {step} is not in the store (saved steps: {_brief(self.steps)})")
        container = _container.read(path, _container.CHECKPOINT_MAGIC, what="checkpoint")
        header = container.header
        return CheckpointInfo(
            step=int(header["step"]),
            path=path,
            created=float(header["created"]),
            bytes=container.stored_bytes,
            dense_bytes=self.dense_bytes,
            k=int(header["k"]),
            changed_outside_mask={rec[0]: int(rec[2]) for rec in header["outside_mask"]},
            metadata=dict(header.get("metadata") or {}),
            training_state_bytes=_training_bytes(header, [entry[1] for entry in header["sections"]]),
        )

    def delete(self, step: int) -> None:
        """Removes a saved step. Other steps never depend on it."""
        path = self.step_path(step)
        with exclusive_lock(self.path / LOCK_NAME):
            try:
                path.unlink()
            except FileNotFoundError:
                raise StepNotFoundError(f"{self.path}: step {step} is not in the store") from None
            fsync_dir(path.parent)

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
            path = self.step_path(number)
            try:
                decoded = self._decode(number)
                for entry in self._manifest.entries:
                    if entry.alias_of is None and not self._digest_matches(entry, decoded):
                        failures.append(VerifyFailure(path, entry.name, "does not match its recorded digest"))
            except (IntegrityError, FormatError, BaseMismatchError, StepNotFoundError) as error:
                failures.append(VerifyFailure(path, None, _without_prefix(str(error), path)))
        if failures:
            raise VerifyError(failures)

    def _digest_matches(self, entry: TensorEntry, decoded: _Decoded) -> bool:
        positions, words = decoded.extras.get(entry.name, (None, None))
        if positions is None and words is not None:  # dense record: rebuild to find the changed positions
            out = self._base_tensors()[entry.name].clone()
            self._apply(entry, out, decoded)
            try:
                self._check_rebuilt(entry, out, decoded)
            except IntegrityError:
                return False
            return True
        digest = self._tensor_digest(entry, decoded.masked[entry.name], positions, words)
        return bool(digest == decoded.header["digests"].get(entry.name))

    def files(self) -> dict[str, Path]:
        """The store's fixed files by role: ``manifest``, ``base``, ``mask`` (steps: see ``step_path``)."""
        return {"manifest": self.path / MANIFEST_NAME, "base": self.path / BASE_NAME, "mask": self.path / MASK_NAME}

    def _verify_base(self) -> list[VerifyFailure]:
        path = self.path / BASE_NAME
        try:
            base = self._base_tensors()
        except (IntegrityError, FormatError) as error:
            return [VerifyFailure(path, None, _without_prefix(str(error), path))]
        failures = []
        for entry in self._manifest.entries:
            if entry.alias_of is not None:
                continue
            data = byte_view(base[entry.name])
            per_chunk = chunk_elements(entry.dtype.itemsize, self._manifest.chunk_bytes) * entry.dtype.itemsize
            for number, (start, stop) in enumerate(chunk_ranges(data.numel(), per_chunk)):
                if digest_of(data[start:stop]) != entry.chunk_digests[number]:
                    failures.append(VerifyFailure(path, entry.name, f"chunk {number} does not match its digest"))
                    break
        return failures


# Helpers ---------------------------------------------------------------------------------------


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
        if not isinstance(tensor, torch.Tensor):
            raise FormatError(f"base key {name!r}: expected a tensor, got {type(tensor).__name__}")
        if tensor.is_sparse or tensor.layout != torch.strided:
            raise FormatError(f"base key {name!r}: sparse tensors are not supported; make it dense with .to_dense()")
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
        tensors.append((name, tensor.contiguous().cpu(), row))
    return entries, tensors


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor, or a copy of its values if it is a lazily conjugated or negated view.

    Such views (``x.conj()``, ``x.conj().imag``) hold other bits than their values, so they
    can be neither read nor written as bit patterns; copying them costs one tensor.
    """
    return tensor.resolve_conj().resolve_neg()


def _contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor, or a contiguous copy of it: one tensor's worth of temporary memory (docs/exactness.md)."""
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def _training_bytes(header: Mapping[str, Any], stored_lengths: list[int]) -> int:
    """Stored bytes of the training-state sections a checkpoint header lists."""
    record = header.get("training")
    if not record:
        return 0
    return sum(stored_lengths[first + i] for _, _, first, count in record["tensors"] for i in range(count))


def _training_tree(optimizer: Any, scheduler: Any, rng: bool) -> tuple[Any, list[torch.Tensor]] | None:
    state: dict[str, Any] = {}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if rng:
        state["rng"] = _training.capture_rng()
    if not state:
        return None
    tensors: list[torch.Tensor] = []
    return _training.encode_tree(state, tensors, path="training state"), tensors


def _json_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError("metadata must be a mapping of JSON-serialisable values")
    try:
        text = json.dumps(dict(metadata), allow_nan=False)
    except (TypeError, ValueError) as error:
        bad = next((key for key, value in metadata.items() if not _jsonable(value)), None)
        raise TypeError(f"metadata key {bad!r} is not JSON-serialisable: {error}") from error
    result: dict[str, Any] = json.loads(text)
    return result


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _without_prefix(message: str, path: Path) -> str:
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _brief(steps: list[int]) -> str:
    if not steps:
        return "none"
    return ", ".join(map(str, steps[:5])) + (f", ... ({len(steps)} in all)" if len(steps) > 5 else "")
