"""Lossless coding of bit patterns: wrapping integer differences, zigzag, byte planes, zstd sections."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import zstandard

from ..errors import FormatError, IntegrityError

UINT_BY_WIDTH: dict[int, type[np.unsignedinteger]] = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
Words = npt.NDArray[np.unsignedinteger]
_INT_BY_WIDTH: dict[int, type[np.signedinteger]] = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


@dataclass(frozen=True)
class Section:
    """One stored byte string: its codec, stored bytes and decoded length."""

    codec: str  # "raw" or "zstd"
    raw_length: int
    payload: bytes


def compress(data: bytes | memoryview, *, level: int = 1) -> Section:
    """zstd-compresses ``data``, keeping it raw when compression does not pay."""
    raw_length = len(data)
    packed = zstandard.ZstdCompressor(level=level).compress(data)
    if len(packed) >= raw_length:
        return Section("raw", raw_length, bytes(data))
    return Section("zstd", raw_length, packed)


def decompress(codec: object, payload: bytes | memoryview, raw_length: int, *, where: str) -> bytes:
    """Decodes one stored section; zstd output is bounded by the declared ``raw_length``.

    Args:
        codec: ``"raw"`` or ``"zstd"``, as recorded.
        payload: The stored bytes.
        raw_length: The decoded length the record declares.
        where: Names the file and section in errors.

    Raises:
        FormatError: An unknown codec, or sizes that disagree with the record.
        IntegrityError: The zstd frame does not decode to exactly ``raw_length`` bytes.
    """
    if codec == "raw":
        if len(payload) != raw_length:
            raise FormatError(f"{where}: raw section has {len(payload)} bytes, not {raw_length}")
        return bytes(payload)
    if codec != "zstd":
        raise FormatError(f"{where}: unknown codec {codec!r}")
    declared = zstandard.frame_content_size(payload)
    if declared != raw_length:
        raise FormatError(f"{where}: zstd frame declares {declared} bytes, the record says {raw_length}")
    try:
        out = zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw_length, allow_extra_data=False)
    except zstandard.ZstdError as error:
        raise IntegrityError(f"{where}: does not decompress: {error}") from error
    if len(out) != raw_length:
        raise IntegrityError(f"{where}: decoded to {len(out)} bytes, expected {raw_length}")
    return out


def zigzag(words: Words) -> Words:
    """Maps a wrapping difference to small unsigned numbers: 0, -1, 1, -2 -> 0, 1, 2, 3."""
    width = words.dtype.itemsize
    signed = words.view(_INT_BY_WIDTH[width])
    sign = (signed >> (8 * width - 1)).view(words.dtype)
    return (words << words.dtype.type(1)) ^ sign


def unzigzag(words: Words) -> Words:
    one = words.dtype.type(1)
    return (words >> one) ^ (np.zeros_like(words) - (words & one))


def exponent_order(base_words: Words) -> npt.NDArray[np.intp]:
    """The permutation that groups values by their base value's top byte (sign bit cleared).

    For floating point that byte is (most of) the exponent, so values of one
    scale sit together and zstd's per-block Huffman tables fit them better. It
    depends on the base alone, so a reader rebuilds it and nothing is stored.
    """
    width = base_words.dtype.itemsize
    top = (base_words >> base_words.dtype.type(8 * width - 8)).astype(np.uint8) & np.uint8(0x7F)
    return np.argsort(top, kind="stable")


def _planes(words: Words) -> list[Section]:
    width = words.dtype.itemsize
    if width == 1:
        return [compress(words.tobytes())]
    by_byte = words.view(np.uint8).reshape(-1, width)
    return [compress(np.ascontiguousarray(by_byte[:, plane]).data) for plane in range(width)]


def _unplanes(planes: list[bytes], count: int, width: int) -> Words:
    # ValueError: the callers name the file (stepcodec.decode and decode_training wrap it as a FormatError).
    if len(planes) != width:
        raise ValueError(f"{len(planes)} byte planes for words of {width} bytes")
    out = np.empty((count, width), dtype=np.uint8)
    for plane, data in enumerate(planes):
        if len(data) != count:  # exactly one byte per word: a longer plane is as malformed as a short one
            raise ValueError(f"byte plane {plane} holds {len(data)} bytes for {count} words")
        out[:, plane] = np.frombuffer(data, dtype=np.uint8, count=count)
    return out.reshape(-1).view(UINT_BY_WIDTH[width])


def encode_words(words: Words) -> list[Section]:
    """Codes words as they are (byte planes, zstd): for values with no base to diff against."""
    return _planes(words)


def decode_words(planes: list[bytes], count: int, width: int) -> Words:
    """Inverts ``encode_words``."""
    return _unplanes(planes, count, width)


def encode_delta(new: Words, base: Words, order: npt.NDArray[np.intp] | None = None) -> list[Section]:
    """Codes ``new`` against ``base`` (same width and length): one section per byte plane.

    ``new - base`` wraps modulo 2**bits; it is integer arithmetic on bit
    patterns, so decoding is exact for every value, NaN payloads included.
    """
    delta = new - base
    if order is not None:
        delta = delta[order]
    return _planes(zigzag(delta))


def decode_delta(planes: list[bytes], base: Words, order: npt.NDArray[np.intp] | None = None) -> Words:
    """Inverts ``encode_delta``; ``base`` and ``order`` must be the ones used to encode."""
    delta = unzigzag(_unplanes(planes, base.size, base.dtype.itemsize))
    if order is not None:
        unordered = np.empty_like(delta)
        unordered[order] = delta
        delta = unordered
    return base + delta


def encode_positions(positions: npt.NDArray[np.int64]) -> tuple[int, list[Section]]:
    """Codes sorted unique non-negative positions as gaps; returns (gap width, planes)."""
    gaps = np.diff(positions, prepend=np.int64(-1)) - 1
    width = 4 if gaps.size == 0 or int(gaps.max()) < 2**32 else 8
    return width, _planes(gaps.astype(UINT_BY_WIDTH[width]))


def decode_positions(planes: list[bytes], count: int, width: int) -> npt.NDArray[np.int64]:
    """Inverts ``encode_positions``."""
    gaps = _unplanes(planes, count, width).astype(np.int64)
    return np.cumsum(gaps + 1) - 1
