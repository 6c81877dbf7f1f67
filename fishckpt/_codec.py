"""Lossless coding of bit patterns: wrapping integer differences, zigzag, byte planes, zstd."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ._container import Section, compress

UINT_BY_WIDTH: dict[int, type[np.unsignedinteger]] = {
    1: np.uint8,
    2: np.uint16,
    4: np.uint32,
    8: np.uint64,
}
_INT_BY_WIDTH: dict[int, type[np.signedinteger]] = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}

Words = npt.NDArray[np.unsignedinteger]


def as_words(array: npt.NDArray[np.generic], width: int) -> Words:
    """Views any array of bit patterns as unsigned words of ``width`` bytes."""
    return np.ascontiguousarray(array).view(UINT_BY_WIDTH[width])


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
    out = np.empty((count, width), dtype=np.uint8)
    for plane, data in enumerate(planes):
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
