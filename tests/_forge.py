"""Crafting damaged files that still pass their checksums, so the checks behind the checksum are tested too."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash

from fishckpt.format import safetensors_layout, stfile

Header = dict[str, Any]


def reseal(data: bytes, edit: Callable[[Header], None]) -> bytes:
    """A v2 file whose safetensors header was changed by ``edit`` and then given a valid checksum again."""
    layout = safetensors_layout.parse(data, file_size=len(data), where="forge")
    header = json.loads(layout.header_bytes)
    edit(header)
    header["__metadata__"][stfile.CHECKSUM_KEY] = "0" * 32
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    marker = f'"{stfile.CHECKSUM_KEY}":"{"0" * 32}"'.encode()
    sealed = raw.replace(marker, f'"{stfile.CHECKSUM_KEY}":"{xxhash.xxh3_128_hexdigest(raw)}"'.encode())
    return struct.pack("<Q", len(sealed)) + sealed + data[layout.data_start :]


def edit_record(change: Callable[[dict[str, Any]], None]) -> Callable[[Header], None]:
    """A header edit that changes the fishckpt record in place."""

    def edit(header: Header) -> None:
        record = json.loads(header["__metadata__"][stfile.RECORD_KEY])
        change(record)
        header["__metadata__"][stfile.RECORD_KEY] = json.dumps(record)

    return edit


def replace_section(data: bytes, name: str, payload: bytes) -> bytes:
    """A v2 file with section ``name``'s bytes replaced by ``payload`` (same length), its digest updated to match."""
    layout = safetensors_layout.parse(data, file_size=len(data), where="forge")
    stored = layout.by_name()[name]
    assert len(payload) == stored.nbytes
    body = data[: stored.start] + payload + data[stored.stop :]

    def fix(record: dict[str, Any]) -> None:
        record["tensors"][name]["digest"] = xxhash.xxh3_128_hexdigest(payload)

    return reseal(body, edit_record(fix))


def reseal_file(path: Path, edit: Callable[[Header], None]) -> None:
    path.write_bytes(reseal(path.read_bytes(), edit))


def record_of(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    layout = safetensors_layout.parse(data, file_size=len(data), where=str(path))
    result: dict[str, Any] = json.loads(layout.metadata[stfile.RECORD_KEY])
    return result
