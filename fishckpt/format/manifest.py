"""The store manifest: the tensor table, the store's identity, the base and mask identities, the commit marker.

Format v1 keeps it as ``fishckpt.json``; format v2 as ``manifest.safetensors``, a v2
file whose record holds the table and whose one section holds every chunk digest.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ..errors import FormatError, IntegrityError
from . import codec, digests, stfile
from .dtypes import DType, dtype_by_name
from .names import BASE_NAME, MANIFEST_V1, MASK_NAME_V1, MASK_NAME_V2

KIND = "manifest"


@dataclass
class TensorEntry:
    """One tensor of the base, as the manifest records it."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    alias_of: str | None
    chunk_digests: list[bytes]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def digest(self) -> bytes:
        """The base tensor's identity: xxh3-128 over its chunk digests."""
        return digests.tensor_base_digest(self.chunk_digests)


@dataclass
class Manifest:
    """A store's manifest, of either format version."""

    entries: list[TensorEntry]
    chunk_bytes: int
    mask_digest: str
    created: float
    version: int = 2
    store_id: str | None = None  # v2: random at create; every step file names it
    masked_digest: str | None = None  # v2: the base's values at the masked indices (format.md)
    k: int | None = None  # v2: the mask's size, so the store can be described without reading the mask
    numel: int | None = None

    @cached_property
    def base_digest(self) -> str:
        """The base's identity (format.md); computed once, so set every entry's chunk digests before asking."""
        return digests.base_digest(
            ([entry.name, entry.dtype.name, list(entry.shape), entry.alias_of], entry.digest) for entry in self.entries
        )

    @property
    def identity(self) -> str:
        """What tells this store from any other: its id (v2), or its base and mask (v1, which has no id)."""
        return self.store_id if self.store_id is not None else f"{self.base_digest}:{self.mask_digest}"

    def pack(self) -> list[bytes]:
        """The v2 manifest file's bytes, as pieces."""
        if self.store_id is None or self.masked_digest is None:
            raise ValueError("a v2 manifest needs a store id and the masked digest")  # a bug, not user input
        record = {
            "store_id": self.store_id,
            "created": self.created,
            "chunk_bytes": self.chunk_bytes,
            "base": {"file": BASE_NAME, "digest": self.base_digest, "masked_digest": self.masked_digest},
            "mask": {"file": MASK_NAME_V2, "digest": self.mask_digest, "k": self.k, "numel": self.numel},
            "entries": [
                {
                    "name": e.name,
                    "dtype": e.dtype.name,
                    "shape": list(e.shape),
                    "alias_of": e.alias_of,
                    "chunks": len(e.chunk_digests),
                }
                for e in self.entries
            ],
        }
        chunk_table = b"".join(d for e in self.entries for d in e.chunk_digests)
        return stfile.pack(KIND, record, [("chunk_digests", codec.Section("raw", len(chunk_table), chunk_table))])


def parse(data: bytes, *, where: str) -> Manifest:
    """Checks and reads a v2 manifest's bytes; ``where`` names the file in errors.

    Raises:
        IntegrityError: The file is damaged, or its base digest does not match its table.
        FormatError: Not a manifest, another version, or malformed.
    """
    file = stfile.read_whole(data, kind=KIND, where=where)
    body = file.record
    try:
        table = file.payload("chunk_digests")
        entries, offset = [], 0
        for item in body["entries"]:
            count = int(item["chunks"])
            if count < 0 or offset + count * digests.DIGEST_BYTES > len(table):
                raise ValueError("the chunk digest table is too short")
            chunks = [table[offset + i * 16 : offset + (i + 1) * 16] for i in range(count)]
            offset += count * digests.DIGEST_BYTES
            entries.append(_entry(item["name"], item["dtype"], item["shape"], item["alias_of"], chunks, where))
        if offset != len(table):
            raise ValueError("the chunk digest table is longer than the entries need")
        manifest = Manifest(
            entries=entries,
            chunk_bytes=int(body["chunk_bytes"]),
            mask_digest=str(body["mask"]["digest"]),
            created=float(body["created"]),
            version=2,
            store_id=str(body["store_id"]),
            masked_digest=str(body["base"]["masked_digest"]),
            k=int(body["mask"]["k"]),
            numel=int(body["mask"]["numel"]),
        )
        recorded_base = str(body["base"]["digest"])
    except (KeyError, TypeError, ValueError) as error:
        raise FormatError(f"{where}: malformed store manifest: {error!r}") from error
    _check(manifest, recorded_base, where)
    return manifest


def parse_v1(text: bytes, *, where: str) -> Manifest:
    """Checks and reads a format v1 manifest (``fishckpt.json``)."""
    try:
        body = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IntegrityError(f"{where}: store manifest is corrupted (not valid JSON: {error})") from error
    if not isinstance(body, dict) or body.get("checksum") != digests.json_checksum(body):
        raise IntegrityError(f"{where}: store manifest is corrupted (checksum mismatch)")
    if body.get("kind") != "fishckpt-store":
        raise FormatError(f"{where}: not a fishckpt store manifest")
    if body.get("format_version") != 1:
        raise FormatError(
            f"{where}: store has format_version {body.get('format_version')}; this file name is format 1's; "
            "upgrade fishckpt"
        )
    try:
        entries = [
            _entry(t["name"], t["dtype"], t["shape"], t["alias_of"], [bytes.fromhex(d) for d in t["chunks"]], where)
            for t in body["tensors"]
        ]
        manifest = Manifest(
            entries, int(body["chunk_bytes"]), str(body["mask"]["digest"]), float(body["created"]), version=1
        )
        recorded_base = str(body["base"]["digest"])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise FormatError(f"{where}: malformed store manifest: {error!r}") from error
    _check(manifest, recorded_base, where)
    return manifest


def to_json_v1(manifest: Manifest) -> bytes:
    """A format v1 manifest's bytes (kept to write test fixtures of old stores)."""
    body: dict[str, Any] = {
        "format_version": 1,
        "kind": "fishckpt-store",
        "created": manifest.created,
        "chunk_bytes": manifest.chunk_bytes,
        "base": {"file": BASE_NAME, "digest": manifest.base_digest},
        "mask": {"file": MASK_NAME_V1, "digest": manifest.mask_digest},
        "tensors": [
            {
                "name": e.name,
                "dtype": e.dtype.name,
                "shape": list(e.shape),
                "alias_of": e.alias_of,
                "chunks": [d.hex() for d in e.chunk_digests],
            }
            for e in manifest.entries
        ],
    }
    body["checksum"] = digests.json_checksum(body)
    return json.dumps(body, indent=1).encode()


def _entry(name: Any, dtype: Any, shape: Any, alias_of: Any, chunks: list[bytes], where: str) -> TensorEntry:
    if not isinstance(name, str) or not (alias_of is None or isinstance(alias_of, str)):
        raise TypeError(f"bad tensor name {name!r} or alias {alias_of!r}")
    dims = tuple(int(s) for s in shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"tensor {name!r} has a negative dimension")
    return TensorEntry(name, dtype_by_name(str(dtype), where=where), dims, alias_of, chunks)


def _check(manifest: Manifest, recorded_base: str, where: str) -> None:
    """The rules every manifest obeys: unique names, aliases of earlier tensors, chunk counts, the base digest."""
    if manifest.chunk_bytes < 64 or manifest.chunk_bytes % 16:
        raise FormatError(f"{where}: chunk_bytes {manifest.chunk_bytes} is not a multiple of 16 of at least 64")
    seen: set[str] = set()
    owners: set[str] = set()
    for entry in manifest.entries:
        if entry.name in seen:
            raise FormatError(f"{where}: tensor {entry.name!r} is listed twice")
        seen.add(entry.name)
        if entry.alias_of is not None:
            if entry.alias_of not in owners or entry.chunk_digests:
                raise FormatError(f"{where}: tensor {entry.name!r} is an alias of an unknown or later tensor")
            continue
        owners.add(entry.name)
        per_chunk = digests.chunk_elements(entry.dtype.itemsize, manifest.chunk_bytes)
        expected = max(1, -(-entry.numel // per_chunk))
        if len(entry.chunk_digests) != expected:
            raise FormatError(
                f"{where}: tensor {entry.name!r} has {len(entry.chunk_digests)} chunk digests, expected {expected}"
            )
    if manifest.base_digest != recorded_base:
        raise IntegrityError(f"{where}: store manifest is inconsistent (base digest mismatch)")


def missing_message(store: str) -> str:
    """What to tell a user whose folder has no manifest."""
    return (
        f"{store}: not a fishckpt store (no {MANIFEST_V1} or manifest.safetensors); create one with "
        "`fishckpt init` or CheckpointStore.create (an interrupted create leaves no manifest: create it again)"
    )
