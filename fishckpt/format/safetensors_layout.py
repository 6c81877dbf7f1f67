"""The safetensors layout, written and parsed by fishckpt itself: one 8-byte length, a JSON header, the data.

Writing the format ourselves lets a file be streamed (the base is never copied
whole into memory), and parsing it ourselves lets every damaged header become
one clear error, whatever safetensors' own parser would have said.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import IntegrityError

if TYPE_CHECKING:
    import torch

_LENGTH = struct.Struct("<Q")
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit

# Bytes per element of each safetensors dtype name.
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class Stored:
    """One tensor of a safetensors file: where its bytes lie, from the start of the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Layout:
    """A parsed safetensors header: the metadata and the tensors in file order."""

    header_bytes: bytes  # the raw JSON header, padding included
    metadata: dict[str, str]
    tensors: list[Stored]
    data_start: int
    file_size: int

    def by_name(self) -> dict[str, Stored]:
        return {stored.name: stored for stored in self.tensors}


def aligned_order(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Larger elements first, as safetensors' own writer does, so every tensor starts aligned to its element size."""
    return sorted(state, key=lambda key: -state[key].element_size())


def header(layout: Sequence[tuple[str, str, list[int], int]], metadata: Mapping[str, str]) -> bytes:
    """The length prefix and JSON header of a safetensors file whose tensors follow in ``layout`` order.

    Args:
        layout: ``(name, safetensors dtype, shape, byte size)`` per tensor, in file order.
        metadata: The ``__metadata__`` strings.
    """
    table: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, dtype, shape, size in layout:
        table[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(table, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    return _LENGTH.pack(len(encoded)) + encoded


def header_length(prefix: bytes, *, file_size: int, where: str) -> int:
    """Reads the 8-byte length prefix and checks it fits the file; ``where`` names the file."""
    if len(prefix) < _LENGTH.size:
        raise IntegrityError(f"{where}: truncated: {file_size} bytes, too short for a safetensors file")
    (length,) = _LENGTH.unpack_from(prefix)
    if length > MAX_HEADER_BYTES or _LENGTH.size + length > file_size:
        raise IntegrityError(
            f"{where}: damaged safetensors header: it declares {length} header bytes in a file of {file_size}"
        )
    return int(length)


def parse(head: bytes, *, file_size: int, where: str) -> Layout:
    """Parses and checks a safetensors header: ``head`` holds the file's first ``8 + length`` bytes at least.

    Every rule safetensors enforces is checked here, so a file this accepts also
    opens with ``safetensors.safe_open``: UTF-8 JSON object, known dtypes, shapes
    that match byte sizes, and data offsets that tile the data section exactly.

    Raises:
        IntegrityError: Any rule is broken; the message names the file and what is wrong.
    """
    length = header_length(head, file_size=file_size, where=where)
    raw = head[_LENGTH.size : _LENGTH.size + length]
    if len(raw) != length:
        raise IntegrityError(f"{where}: truncated safetensors header")
    try:
        table = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IntegrityError(f"{where}: damaged safetensors header (not valid JSON: {error})") from error
    if not isinstance(table, dict):
        raise IntegrityError(f"{where}: damaged safetensors header (not a JSON object)")
    metadata = table.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise IntegrityError(f"{where}: damaged safetensors header (__metadata__ must map strings to strings)")
    data_start = _LENGTH.size + length
    tensors = []
    for name, info in table.items():
        try:
            dtype = info["dtype"]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            if set(info) != {"dtype", "shape", "data_offsets"}:
                raise ValueError("unexpected keys")
            if dtype not in _DTYPE_BYTES:
                raise ValueError(f"unknown dtype {dtype!r}")
            if not all(type(s) is int and s >= 0 for s in shape) or not all(
                type(x) is int and x >= 0 for x in (begin, end)
            ):
                raise ValueError("shape and offsets must be non-negative integers")
        except (KeyError, TypeError, ValueError) as error:
            raise IntegrityError(f"{where}: damaged safetensors header at tensor {name!r}: {error}") from None
        if end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise IntegrityError(
                f"{where}: damaged safetensors header: tensor {name!r} has shape {list(shape)} of {dtype} "
                f"but {end - begin} bytes"
            )
        tensors.append(Stored(name, dtype, shape, data_start + begin, data_start + end))
    tensors.sort(key=lambda stored: (stored.start, stored.stop))
    offset = data_start
    for stored in tensors:
        if stored.start != offset:
            raise IntegrityError(
                f"{where}: damaged safetensors header: tensor {stored.name!r} starts at data byte "
                f"{stored.start - data_start}, expected {offset - data_start} (overlap or hole)"
            )
        offset = stored.stop
    if offset != file_size:
        raise IntegrityError(
            f"{where}: truncated or extended: the header accounts for {offset} bytes, the file has {file_size}"
        )
    return Layout(bytes(raw), metadata, tensors, data_start, file_size)
