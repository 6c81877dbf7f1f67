"""Crafting damaged files that still pass their checksums, so the checks behind the checksum are tested too."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash

from fishckpt.format import codec, container, digests, safetensors_layout, stfile

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
    return record_of_bytes(path.read_bytes())


def record_of_bytes(data: bytes) -> dict[str, Any]:
    layout = safetensors_layout.parse(data, file_size=len(data), where="forge")
    result: dict[str, Any] = json.loads(layout.metadata[stfile.RECORD_KEY])
    return result


def repack(
    data: bytes,
    *,
    kind: str,
    sections: dict[str, codec.Section] | None = None,
    change: Callable[[dict[str, Any]], None] | None = None,
) -> bytes:
    """A v2 file rewritten by fishckpt's own writer, some sections replaced and its record changed.

    Sections may change length and codec: the layout, every digest and the checksum are all made
    anew, so only the checks of what the content means can object.
    """
    file = stfile.read_whole(data, kind=kind, where="forge")
    record = {key: value for key, value in file.record.items() if key != "tensors"}
    if change is not None:
        change(record)
    replaced = sections or {}
    pieces = []
    for name in file.names():
        info = file.record["tensors"][name]
        pieces.append((name, replaced.get(name, codec.Section(info["codec"], info["raw_bytes"], file.payload(name)))))
    return b"".join(stfile.pack(kind, record, pieces))


def repack_v1(
    data: bytes,
    magic: bytes,
    *,
    sections: dict[int, codec.Section] | None = None,
    change: Callable[[dict[str, Any]], None] | None = None,
) -> bytes:
    """A format 1 container rewritten by the v1 writer, some sections replaced and its header changed; valid trailer."""
    parsed = container.parse("forge", data, magic, what="forge")
    header = {key: value for key, value in parsed.header.items() if key != "sections"}
    if change is not None:
        change(header)
    replaced = sections or {}
    pieces = []
    offset = 16 + struct.unpack_from("<I", data, 12)[0]  # after the magic, version, length and the JSON header
    for number, (codec_name, stored, raw_length) in enumerate(parsed.header["sections"]):
        payload = data[offset : offset + stored]
        offset += stored
        pieces.append(replaced.get(number, codec.Section(codec_name, raw_length, payload)))
    return b"".join(container.pack(magic, header, pieces))


def reseal_manifest_v1(text: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """A format 1 manifest (``fishckpt.json``) changed by ``change`` and given a valid checksum again."""
    body = json.loads(text)
    change(body)
    body["checksum"] = digests.json_checksum(body)
    return json.dumps(body, indent=1).encode()
