"""The checksummed container of format v1's mask and checkpoint files (docs/format.md, "Container")."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from ..errors import FormatError, IntegrityError
from . import digests
from .codec import Section, decompress

FORMAT_VERSION = 1
MASK_MAGIC = b"FISHMASK"
CHECKPOINT_MAGIC = b"FISHCKPT"
_PREFIX = struct.Struct("<8sII")  # magic, format_version, header length
_TRAILER_BYTES = digests.DIGEST_BYTES  # xxh3-128 of every byte before the trailer


def pack(magic: bytes, header: dict[str, Any], sections: list[Section]) -> list[bytes]:
    """Lays out a container as byte pieces ready for an atomic write.

    The header gets a ``sections`` table ``[[codec, stored_length, raw_length], ...]``;
    payloads follow the header in that order, and the trailer digest covers all of it.
    """
    header = dict(header, sections=[[s.codec, len(s.payload), s.raw_length] for s in sections])
    header_bytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    pieces = [_PREFIX.pack(magic, FORMAT_VERSION, len(header_bytes)), header_bytes]
    pieces.extend(s.payload for s in sections)
    pieces.append(digests.of_pieces(pieces))
    return pieces


class Container:
    """A container file read into memory, checksum verified, sections decoded on demand."""

    def __init__(self, path: Path | str, data: bytes, header: dict[str, Any], offsets: list[int]) -> None:
        self.path = path
        self.header = header
        self._data = data
        self._offsets = offsets

    @property
    def stored_bytes(self) -> int:
        return len(self._data)

    @property
    def stored_lengths(self) -> list[int]:
        """Stored bytes of each section, in order."""
        return [int(entry[1]) for entry in self.header["sections"]]

    def section(self, index: int) -> bytes:
        """Decodes section ``index``; its size is bounded by what the header declares."""
        table = self.header["sections"]
        if not 0 <= index < len(table):
            raise FormatError(f"{self.path}: section {index} does not exist ({len(table)} sections)")
        codec, _stored, raw_length = table[index]
        payload = self._data[self._offsets[index] : self._offsets[index + 1]]
        return decompress(codec, payload, raw_length, where=f"{self.path}: section {index}")


def parse(path: Path | str, data: bytes, magic: bytes, *, what: str) -> Container:
    """Verifies and parses the bytes of a container file.

    Args:
        path: Names the file in errors.
        data: The whole file.
        magic: The 8 magic bytes this kind of file must start with.
        what: A short name of the file kind for messages ("checkpoint", "mask").

    Raises:
        IntegrityError: The checksum does not match (corruption or truncation).
        FormatError: The file is intact but of another kind or a newer version.
    """
    if len(data) < _PREFIX.size + _TRAILER_BYTES:
        raise IntegrityError(f"{path}: {what} file is truncated ({len(data)} bytes)")
    body, trailer = data[:-_TRAILER_BYTES], data[-_TRAILER_BYTES:]
    if digests.of_bytes(body) != trailer:
        raise IntegrityError(
            f"{path}: {what} file is corrupted or truncated (checksum mismatch); restore it from a copy, or delete it"
        )
    file_magic, version, header_length = _PREFIX.unpack_from(data)
    if file_magic != magic:
        raise FormatError(f"{path}: not a fishckpt {what} file (magic {file_magic!r})")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{path}: {what} file has format_version {version}; this fishckpt reads "
            f"version {FORMAT_VERSION}; upgrade fishckpt"
        )
    start = _PREFIX.size
    if start + header_length > len(body):
        raise FormatError(f"{path}: header length {header_length} runs past the end of the file")
    try:
        header = json.loads(body[start : start + header_length])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FormatError(f"{path}: header is not valid JSON: {error}") from error
    if not isinstance(header, dict) or not isinstance(header.get("sections"), list):
        raise FormatError(f"{path}: header has no sections table")
    offsets = [start + header_length]
    for entry in header["sections"]:
        if not isinstance(entry, list) or len(entry) != 3 or not all(isinstance(x, int) and x >= 0 for x in entry[1:]):
            raise FormatError(f"{path}: malformed section entry {entry!r}")
        offsets.append(offsets[-1] + entry[1])
    if offsets[-1] != len(body):
        raise FormatError(f"{path}: sections cover {offsets[-1]} bytes but the file holds {len(body)}")
    return Container(path, data, header, offsets)
