"""The store manifest (fishckpt.json): the tensor table, the base and mask identities, the commit marker."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from . import _container
from ._basefile import TensorEntry
from ._dtypes import dtype_by_name
from ._errors import FormatError, IntegrityError

MANIFEST_NAME = "fishckpt.json"
BASE_NAME = "base.safetensors"
MASK_NAME = "mask.fishmask"
STEPS_DIR = "steps"
LOCK_NAME = ".lock"


@dataclass
class Manifest:
    entries: list[TensorEntry]
    chunk_bytes: int
    mask_digest: str
    created: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def base_digest(self) -> str:
        hasher = xxhash.xxh3_128()
        for entry in self.entries:
            record = [entry.name, entry.dtype.name, list(entry.shape), entry.alias_of]
            hasher.update(json.dumps(record, separators=(",", ":")).encode())
            hasher.update(entry.digest)
        return hasher.hexdigest()

    def to_json(self) -> dict[str, Any]:
        body = {
            "format_version": _container.FORMAT_VERSION,
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
        body["checksum"] = json_checksum(body)
        return body


def json_checksum(body: Mapping[str, Any]) -> str:
    canonical = json.dumps({k: v for k, v in body.items() if k != "checksum"}, sort_keys=True, separators=(",", ":"))
    return xxhash.xxh3_128_hexdigest(canonical.encode())


def read_manifest(path: Path) -> Manifest:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise FormatError(
            f"{path.parent}: not a fishckpt store (no {MANIFEST_NAME}); create one with "
            "CheckpointStore.create (an interrupted create leaves no manifest: delete the folder and create again)"
        ) from None
    try:
        body = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IntegrityError(f"{path}: store manifest is corrupted (not valid JSON: {error})") from error
    if not isinstance(body, dict) or body.get("checksum") != json_checksum(body):
        raise IntegrityError(f"{path}: store manifest is corrupted (checksum mismatch)")
    if body.get("kind") != "fishckpt-store":
        raise FormatError(f"{path}: not a fishckpt store manifest")
    if body.get("format_version") != _container.FORMAT_VERSION:
        raise FormatError(
            f"{path}: store has format_version {body.get('format_version')}; this fishckpt reads "
            f"version {_container.FORMAT_VERSION}; upgrade fishckpt"
        )
    try:
        entries = [
            TensorEntry(
                name=str(t["name"]),
                dtype=dtype_by_name(str(t["dtype"]), where=str(path)),
                shape=tuple(int(s) for s in t["shape"]),
                alias_of=None if t["alias_of"] is None else str(t["alias_of"]),
                chunk_digests=[bytes.fromhex(d) for d in t["chunks"]],
            )
            for t in body["tensors"]
        ]
        manifest = Manifest(entries, int(body["chunk_bytes"]), str(body["mask"]["digest"]), float(body["created"]))
        recorded_base = str(body["base"]["digest"])
    except (KeyError, TypeError, ValueError) as error:
        raise FormatError(f"{path}: malformed store manifest: {error!r}") from error
    if manifest.base_digest != recorded_base:
        raise IntegrityError(f"{path}: store manifest is inconsistent (base digest mismatch)")
    return manifest
