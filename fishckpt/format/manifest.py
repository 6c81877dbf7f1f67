"""The store manifest (fishckpt.json): the tensor table, the base and mask identities, the commit marker."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import FormatError, IntegrityError
from . import digests
from .dtypes import DType, dtype_by_name
from .names import BASE_NAME, MANIFEST_NAME, MASK_NAME

FORMAT_VERSION = 1


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
    entries: list[TensorEntry]
    chunk_bytes: int
    mask_digest: str
    created: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def base_digest(self) -> str:
        return digests.base_digest(
            ([entry.name, entry.dtype.name, list(entry.shape), entry.alias_of], entry.digest) for entry in self.entries
        )

    def to_json(self) -> dict[str, Any]:
        body = {
            "format_version": FORMAT_VERSION,
            "kind": "fishckpt-store",
            "created": self.created,
            "chunk_bytes": self.chunk_bytes,
            "base": {"file": BASE_NAME, "digest": self.base_digest},
            "mask": {"file": MASK_NAME, "digest": self.mask_digest},
            "tensors": [
                {
                    "name": e.name,
                    "dtype": e.dtype.name,
                    "shape": list(e.shape),
                    "alias_of": e.alias_of,
                    "chunks": [d.hex() for d in e.chunk_digests],
                }
                for e in self.entries
            ],
        }
        body["checksum"] = digests.json_checksum(body)
        return body

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=1).encode()


def parse(text: bytes, *, where: str) -> Manifest:
    """Checks and reads a manifest's bytes; ``where`` names the file in errors.

    Raises:
        IntegrityError: The checksum or the base digest does not match.
        FormatError: Not a store manifest, another version, or malformed.
    """
    try:
        body = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IntegrityError(f"{where}: store manifest is corrupted (not valid JSON: {error})") from error
    if not isinstance(body, dict) or body.get("checksum") != digests.json_checksum(body):
        raise IntegrityError(f"{where}: store manifest is corrupted (checksum mismatch)")
    if body.get("kind") != "fishckpt-store":
        raise FormatError(f"{where}: not a fishckpt store manifest")
    if body.get("format_version") != FORMAT_VERSION:
        raise FormatError(
            f"{where}: store has format_version {body.get('format_version')}; this fishckpt reads "
            f"version {FORMAT_VERSION}; upgrade fishckpt"
        )
    try:
        entries = [
            TensorEntry(
                name=str(t["name"]),
                dtype=dtype_by_name(str(t["dtype"]), where=where),
                shape=tuple(int(s) for s in t["shape"]),
                alias_of=None if t["alias_of"] is None else str(t["alias_of"]),
                chunk_digests=[bytes.fromhex(d) for d in t["chunks"]],
            )
            for t in body["tensors"]
        ]
        manifest = Manifest(entries, int(body["chunk_bytes"]), str(body["mask"]["digest"]), float(body["created"]))
        recorded_base = str(body["base"]["digest"])
    except (KeyError, TypeError, ValueError) as error:
        raise FormatError(f"{where}: malformed store manifest: {error!r}") from error
    if manifest.base_digest != recorded_base:
        raise IntegrityError(f"{where}: store manifest is inconsistent (base digest mismatch)")
    return manifest


def missing_message(store: str) -> str:
    """What to tell a user whose folder has no manifest."""
    return (
        f"{store}: not a fishckpt store (no {MANIFEST_NAME}); create one with "
        "CheckpointStore.create (an interrupted create leaves no manifest: delete the folder and create again)"
    )
