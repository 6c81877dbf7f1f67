"""What a store holds, read from its manifest and step headers alone: no tensors, and no torch import.

``fishckpt ls`` and ``fishckpt report`` need nothing more, so they answer in a
fraction of a second; ``CheckpointStore`` builds on the same catalog for its steps,
step records and reports, so both read a store the same way.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import (
    BaseMismatchError,
    FishckptError,
    FormatError,
    IntegrityError,
    InvalidArgumentError,
    StepNotFoundError,
)
from ..format import manifest as manifest_format
from ..format import maskfile, stepfile, tree
from ..format.manifest import Manifest
from ..format.names import BASE_NAME, MANIFEST_V1, MANIFEST_V2, STEPS_DIR, mask_name, step_key, step_of
from ..storage import LocalStorage, Storage, open_storage
from .records import CheckpointInfo, StoreReport


def read_manifest(storage: Storage) -> Manifest:
    """Reads and checks a store's manifest, of either format version."""
    for name, parse in ((MANIFEST_V2, manifest_format.parse), (MANIFEST_V1, manifest_format.parse_v1)):
        try:
            data = storage.read(name)
        except FileNotFoundError:
            continue
        except (IsADirectoryError, NotADirectoryError):
            break
        return parse(data, where=storage.where(name))
    if isinstance(storage, LocalStorage):
        if storage.root.is_file():
            raise FormatError(f"{storage.url}: is a file, not a store; give the store's folder")
        if not storage.root.exists():
            raise FormatError(f"{storage.url}: no such store folder; create one with `fishckpt init`")
    raise FormatError(manifest_format.missing_message(storage.url))


def check_step(step: int) -> int:
    """A step number as given by a user: a non-negative integer (not a bool)."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise InvalidArgumentError(f"step must be a non-negative integer, got {step!r}")
    return int(step)


class Catalog:
    """A store's manifest and step files, read without tensors.

    Example:
        >>> catalog = Catalog.open("ckpts")
        >>> [info.bytes for info in catalog.report().steps]
    """

    def __init__(self, storage: Storage, manifest: Manifest, *, k: int, numel: int) -> None:
        self.storage = storage
        self.manifest = manifest
        self.k = k
        self.numel = numel
        self.dense_bytes = sum(entry.nbytes for entry in manifest.entries if entry.alias_of is None)

    @classmethod
    def open(
        cls,
        path: str | Path | Storage,
        *,
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: str | Path | None = None,
    ) -> Catalog:
        """Reads a store's manifest (checked) and the size of its mask.

        Args:
            path: The store folder, or a URL such as ``s3://bucket/run1`` (see docs/storage.md).
            storage_options: fsspec options for a URL (credentials, endpoint).
            cache_dir: As for ``CheckpointStore.open``; a catalog never reads the base, so nothing is cached.

        Raises:
            FormatError: ``path`` is not a store, or was written by a newer fishckpt.
            IntegrityError: The manifest (or, for a format 1 store, the mask file) is damaged.
            StorageError: The URL's scheme is not installed, or the storage cannot be reached.
        """
        storage = open_storage(path, storage_options=storage_options, cache_dir=cache_dir)
        manifest = read_manifest(storage)
        if manifest.k is not None and manifest.numel is not None:
            return cls(storage, manifest, k=manifest.k, numel=manifest.numel)
        where = storage.where(mask_name(manifest.version))
        try:
            indices, shapes, _ = maskfile.decode(storage.read(mask_name(manifest.version)), where=where)
        except FileNotFoundError:
            raise IntegrityError(f"{where}: the store's mask file is missing") from None
        k = sum(int(index.size) for index in indices.values())
        return cls(storage, manifest, k=k, numel=sum(math.prod(shape) for shape in shapes.values()))

    # Where things are -----------------------------------------------------------------------------

    @property
    def location(self) -> str:
        return self.storage.url

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def manifest_name(self) -> str:
        return MANIFEST_V2 if self.version >= 2 else MANIFEST_V1

    def key(self, step: int) -> str:
        return step_key(step, self.version)

    def file(self, name: str) -> Path | str:
        """A file of the store: a Path for a local store, a URL otherwise."""
        return self.storage.path(name) if isinstance(self.storage, LocalStorage) else self.storage.where(name)

    def files(self) -> dict[str, Path | str]:
        return {
            "manifest": self.file(self.manifest_name),
            "base": self.file(BASE_NAME),
            "mask": self.file(mask_name(self.version)),
        }

    @property
    def steps(self) -> list[int]:
        """Saved steps, ascending."""
        found = (step_of(name, self.version) for name in self.storage.list(STEPS_DIR))
        return sorted(step for step in found if step is not None)

    # Step files -----------------------------------------------------------------------------------

    def absent(self, step: int) -> FishckptError:
        """The error for a step file that cannot be found: not saved, or listed but not a readable file."""
        key = self.key(step)
        if key.rpartition("/")[2] in self.storage.list(STEPS_DIR):
            return IntegrityError(
                f"{self.storage.where(key)}: step {step} is listed but its file cannot be read (a folder or a "
                f"dangling link in its place); remove it with `fishckpt rm {self.location} {step}`"
            )
        steps = self.steps
        brief = ", ".join(map(str, steps[:5])) + (f", ... ({len(steps)} in all)" if len(steps) > 5 else "")
        return StepNotFoundError(f"{self.location}: step {step} is not in the store (saved steps: {brief or 'none'})")

    def read_record(self, step: int, *, sections: bool) -> tuple[stepfile.StepRecord, stepfile.StepFile]:
        """Reads a step file and checks that it belongs here: this store, this base and mask, this step."""
        key = self.key(step)
        where = self.storage.where(key)
        try:
            data = self.storage.read(key)
        except FileNotFoundError:
            raise self.absent(step) from None
        except (IsADirectoryError, NotADirectoryError, PermissionError) as error:
            raise IntegrityError(f"{where}: step {step}'s file cannot be read: {error.strerror}") from error
        record, file = stepfile.parse(data, where=where, sections=sections)
        manifest = self.manifest
        if record.version != manifest.version:
            raise FormatError(f"{where}: a format {record.version} step file in a format {manifest.version} store")
        if manifest.store_id is not None and record.store_id != manifest.store_id:
            raise BaseMismatchError(
                f"{where}: this step file belongs to another store (store id {record.store_id}, step "
                f"{record.step}); this store's id is {manifest.store_id}. It cannot be restored here: restore it "
                "from the store that wrote it"
            )
        if record.base_digest != manifest.base_digest or record.mask_digest != manifest.mask_digest:
            raise BaseMismatchError(
                f"{where}: checkpoint belongs to a store with another base or mask; it cannot be "
                "restored here. Restore it from the store that wrote it"
            )
        if record.step != step:
            raise FormatError(f"{where}: the file holds step {record.step}, not step {step} as its name says")
        return record, file

    def info(self, step: int) -> CheckpointInfo:
        """Describes a saved step from its (checksummed) file header.

        Raises:
            StepNotFoundError: ``step`` is not saved.
            IntegrityError: Its file is damaged or unreadable.
        """
        step = check_step(step)
        record, _ = self.read_record(step, sections=False)
        where = self.storage.where(self.key(step))
        metadata = tree.decode_tree(record.metadata, [], where=where)
        return CheckpointInfo(
            step=record.step,
            path=self.file(self.key(step)),
            created=record.created,
            bytes=record.total_bytes,
            dense_bytes=self.dense_bytes,
            k=record.k,
            changed_outside_mask=(
                dict(record.shards.outside)
                if record.shards is not None
                else {outside.name: outside.count for outside in record.outside}
            ),
            metadata=metadata if isinstance(metadata, dict) else {},
            training_state_bytes=record.total_training_bytes,
        )

    def report(self, *, steps: Iterable[int] | None = None) -> StoreReport:
        """Where the store's bytes go: base, mask, manifest and every step, against dense checkpoints.

        A step whose file is damaged is listed in ``problems``, not left out silently; a
        step deleted while the report runs (by a prune) is skipped.

        Args:
            steps: The steps to describe (default: every saved step); an iterable that
                draws a progress bar as it is consumed works too.
        """

        def size(name: str) -> int:
            found = self.storage.stat(name)
            return 0 if found is None else found.size

        infos, problems = [], {}
        for step in self.steps if steps is None else steps:
            try:
                infos.append(self.info(step))
            except StepNotFoundError:
                continue
            except (IntegrityError, FormatError, BaseMismatchError) as error:
                problems[step] = str(error)
        return StoreReport(
            location=self.location,
            tensors=len(self.manifest.entries),
            dense_bytes=self.dense_bytes,
            k=self.k,
            numel=self.numel,
            base_bytes=size(BASE_NAME),
            mask_bytes=size(mask_name(self.version)),
            manifest_bytes=size(self.manifest_name),
            steps=infos,
            problems=problems,
        )
