"""Format v2's file: a valid safetensors file whose metadata holds a checked record (docs/format.md, "v2 files").

Every byte is covered: ``fishckpt.checksum`` is the xxh3-128 of the raw header
(padding included) with the checksum's own digits zeroed, and the record lists
the xxh3-128 of every tensor's bytes. A reader checks the checksum, the version,
the kind and every digest before decoding anything, so a damaged file is an
``IntegrityError`` naming it, never a parser error.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import FormatError, IntegrityError
from . import digests, safetensors_layout
from .codec import Section, decompress

FORMAT_VERSION = 2
VERSION_KEY = "fishckpt.format_version"
KIND_KEY = "fishckpt.kind"
RECORD_KEY = "fishckpt.record"
CHECKSUM_KEY = "fishckpt.checksum"
_PLACEHOLDER = "0" * 32
_LENGTH = struct.Struct("<Q")

Reader = Callable[[int, int], bytes]  # read bytes [start, stop) of the file


def pack(kind: str, record: dict[str, Any], sections: Sequence[tuple[str, Section]]) -> list[bytes]:
    """A v2 file's bytes, as pieces: the header (with record and checksum), then each section as a U8 tensor.

    Args:
        kind: What the file is ("manifest", "mask", "step").
        record: The JSON record; a ``tensors`` table (codec, decoded length and digest of
            each section) is added to it.
        sections: ``(tensor name, section)`` in file order; names must be unique.
    """
    table = {
        name: {
            "codec": section.codec,
            "raw_bytes": section.raw_length,
            "digest": digests.of_bytes(section.payload).hex(),
        }
        for name, section in sections
    }
    if len(table) != len(sections):
        raise ValueError("section names must be unique")  # a bug of the caller, not user input
    full = dict(record, tensors=table)
    metadata = {
        VERSION_KEY: str(FORMAT_VERSION),
        KIND_KEY: kind,
        RECORD_KEY: digests.canonical_json(full),
        CHECKSUM_KEY: _PLACEHOLDER,
    }
    layout = [(name, "U8", [len(section.payload)], len(section.payload)) for name, section in sections]
    head = safetensors_layout.header(layout, metadata)
    checksum = digests.of_bytes(head[_LENGTH.size :]).hex()
    marker = f'"{CHECKSUM_KEY}":"{_PLACEHOLDER}"'.encode()
    assert head.count(marker) == 1
    head = head.replace(marker, f'"{CHECKSUM_KEY}":"{checksum}"'.encode())
    return [head, *(section.payload for _, section in sections)]


def names_kind(data: bytes, kind: str) -> bool:
    """Whether ``data`` (a file's first bytes) looks like a v2 file of ``kind``; a cheap sniff, not a check."""
    return data[8:9] == b"{" and f'"{KIND_KEY}":"{kind}"'.encode() in data[: 8 + 4096]


def is_fishckpt_file(metadata: dict[str, str]) -> bool:
    """Whether a safetensors file's metadata is fishckpt's (a damaged key still counts: it is then checked)."""
    return any(key.startswith("fishckpt.") for key in metadata)


@dataclass
class File:
    """A checked v2 file: its record, and its sections read and decoded on demand."""

    where: str
    kind: str
    record: dict[str, Any]
    layout: safetensors_layout.Layout
    _read: Reader
    _checked: dict[str, bytes] = field(default_factory=dict)

    @property
    def stored_bytes(self) -> int:
        return self.layout.file_size

    @property
    def checksum(self) -> str:
        """The header checksum (checked by ``parse``): one file's identity, as a sharded step records its parts'."""
        return self.layout.metadata[CHECKSUM_KEY]

    def stored_length(self, name: str) -> int:
        return self.layout.by_name()[name].nbytes

    def names(self) -> list[str]:
        return [stored.name for stored in self.layout.tensors]

    def payload(self, name: str) -> bytes:
        """Section ``name``'s stored bytes, read once and checked against their digest."""
        found = self._checked.get(name)
        if found is not None:
            return found
        stored = self.layout.by_name().get(name)
        info = self.record["tensors"].get(name)
        if stored is None or info is None:
            raise FormatError(f"{self.where}: no section {name!r}")
        payload = self._read(stored.start, stored.stop)
        if len(payload) != stored.nbytes:
            raise IntegrityError(f"{self.where}: truncated while reading section {name!r}")
        if digests.of_bytes(payload).hex() != info["digest"]:
            raise IntegrityError(
                f"{self.where}: {self.kind} file is corrupted: section {name!r} does not match its digest; "
                "restore it from a copy, or delete it"
            )
        self._checked[name] = payload
        return payload

    def check_all(self) -> None:
        """Reads and checks every section's digest, before anything is decoded."""
        for name in self.names():
            self.payload(name)

    def section(self, name: str) -> bytes:
        """Section ``name``, its digest checked and decoded (zstd bounded by the declared length)."""
        info = self.record["tensors"].get(name)
        payload = self.payload(name)
        return decompress(info["codec"], payload, info["raw_bytes"], where=f"{self.where}: section {name!r}")


def parse(head: bytes, *, file_size: int, read: Reader, kind: str, where: str) -> File:
    """Checks a v2 file's header and record; ``head`` holds at least the first ``8 + header length`` bytes.

    Raises:
        IntegrityError: The file is damaged or truncated (any byte of the header, or the sizes).
        FormatError: An intact file of another kind or another format version.
    """
    layout = safetensors_layout.parse(head, file_size=file_size, where=where)
    metadata = layout.metadata
    if not is_fishckpt_file(metadata):
        raise FormatError(f"{where}: a safetensors file, but not a fishckpt {kind} file")
    recorded = metadata.get(CHECKSUM_KEY, "")
    if len(recorded) != len(_PLACEHOLDER):
        raise IntegrityError(f"{where}: damaged header (no checksum)")
    marker = f'"{CHECKSUM_KEY}":"{recorded}"'.encode()
    if layout.header_bytes.count(marker) != 1:
        raise IntegrityError(f"{where}: damaged header (no single checksum)")
    blanked = layout.header_bytes.replace(marker, f'"{CHECKSUM_KEY}":"{_PLACEHOLDER}"'.encode())
    if digests.of_bytes(blanked).hex() != recorded:
        raise IntegrityError(
            f"{where}: {kind} file is corrupted or truncated (header checksum mismatch); restore it from a copy, "
            "or delete it"
        )
    version = metadata.get(VERSION_KEY)
    if version != str(FORMAT_VERSION):
        raise FormatError(
            f"{where}: {kind} file has format_version {version}; this fishckpt reads versions 1 and "
            f"{FORMAT_VERSION}; upgrade fishckpt"
        )
    if metadata.get(KIND_KEY) != kind:
        raise FormatError(f"{where}: not a fishckpt {kind} file (it is a {metadata.get(KIND_KEY)!r} file)")
    try:
        record = json.loads(metadata[RECORD_KEY])
    except (KeyError, json.JSONDecodeError) as error:
        raise FormatError(f"{where}: malformed record: {error}") from error
    if not isinstance(record, dict) or not isinstance(record.get("tensors"), dict):
        raise FormatError(f"{where}: malformed record (no tensors table)")
    table = record["tensors"]
    stored_names = [stored.name for stored in layout.tensors]
    if sorted(table) != sorted(stored_names):
        raise FormatError(f"{where}: the record's tensors table does not match the file's tensors")
    for stored in layout.tensors:
        info = table[stored.name]
        if stored.dtype != "U8" or len(stored.shape) != 1:
            raise FormatError(f"{where}: section {stored.name!r} must be a 1-d U8 tensor")
        if (
            not isinstance(info, dict)
            or info.get("codec") not in ("raw", "zstd")
            or type(info.get("raw_bytes")) is not int
            or info["raw_bytes"] < 0
            or not isinstance(info.get("digest"), str)
        ):
            raise FormatError(f"{where}: malformed entry for section {stored.name!r}")
    return File(where, kind, record, layout, read)


def read_whole(data: bytes, *, kind: str, where: str) -> File:
    """Checks a v2 file held whole in memory."""
    return parse(data, file_size=len(data), read=lambda start, stop: data[start:stop], kind=kind, where=where)
