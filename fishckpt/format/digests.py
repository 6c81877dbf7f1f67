"""Every digest fishckpt writes or checks, each one recipe of xxh3-128 (docs/format.md).

xxh3-128 hashes 1 GiB in about 40 ms here; it catches corruption, truncation and
mistakes, not an adversary editing files on purpose (docs/architecture.md).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import xxhash

if TYPE_CHECKING:
    import torch

DIGEST_BYTES = 16
_TENSOR_DIGEST_TAG = b"fishckpt-tensor-v1\x00"


def of_bytes(data: bytes | memoryview) -> bytes:
    """xxh3-128 of a byte string (big-endian, as xxhash's ``digest()``)."""
    return xxhash.xxh3_128_digest(data)


def of_tensor_bytes(data: torch.Tensor) -> bytes:
    """xxh3-128 of a contiguous CPU tensor's bytes, read in place."""
    return xxhash.xxh3_128_digest(data.numpy().data)


def of_pieces(pieces: Iterable[bytes | memoryview]) -> bytes:
    """xxh3-128 of the concatenation of ``pieces``."""
    hasher = xxhash.xxh3_128()
    for piece in pieces:
        hasher.update(piece)
    return hasher.digest()


def chunk_elements(itemsize: int, chunk_bytes: int) -> int:
    """Elements per hashing chunk of the base: ``max(1, chunk_bytes // itemsize)``."""
    return max(1, chunk_bytes // itemsize)


def chunk_ranges(numel: int, per_chunk: int) -> Iterator[tuple[int, int]]:
    """Ranges [start, stop) of the hashing chunks; an empty tensor has one empty chunk."""
    if numel == 0:
        yield 0, 0
        return
    for start in range(0, numel, per_chunk):
        yield start, min(start + per_chunk, numel)


def tensor_base_digest(chunk_digests: Sequence[bytes]) -> bytes:
    """A base tensor's identity: xxh3-128 over its concatenated chunk digests."""
    return xxhash.xxh3_128_digest(b"".join(chunk_digests))


def base_digest(records: Iterable[tuple[list[Any], bytes]]) -> str:
    """The base's identity: for each tensor, its compact JSON record then its tensor base digest."""
    hasher = xxhash.xxh3_128()
    for record, digest in records:
        hasher.update(json.dumps(record, separators=(",", ":")).encode())
        hasher.update(digest)
    return hasher.hexdigest()


def canonical_json(body: Any) -> str:
    """The canonical JSON text of a value: sorted keys, no spaces."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def json_checksum(body: Mapping[str, Any]) -> str:
    """xxh3-128 (hex) of the canonical JSON of every key of ``body`` but ``checksum``."""
    return xxhash.xxh3_128_hexdigest(canonical_json({k: v for k, v in body.items() if k != "checksum"}).encode())


def mask_digest(table: list[list[Any]], indices: Iterable[npt.NDArray[np.int64]]) -> str:
    """A mask's identity: its name-sorted ``[name, shape, count]`` table, then each tensor's indices as int64."""
    hasher = xxhash.xxh3_128()
    hasher.update(json.dumps(table, separators=(",", ":")).encode())
    for index in indices:
        hasher.update(index.astype("<i8", copy=False).tobytes())
    return hasher.hexdigest()


def tensor_digest(
    base_tensor_digest: bytes,
    masked_words: npt.NDArray[np.generic],
    positions: npt.NDArray[np.int64] | None,
    changed_words: npt.NDArray[np.generic] | None,
) -> str:
    """The digest of a rebuilt tensor T from what identifies it given its base (format.md, "Tensor digests").

    Given the base B (pinned by its chunk digests) and the mask M, T is
    determined by T[M] and by the positions outside M where T != B with
    their values, so hashing those identifies T in O(k).
    """
    hasher = xxhash.xxh3_128(_TENSOR_DIGEST_TAG)
    hasher.update(base_tensor_digest)
    hasher.update(np.ascontiguousarray(masked_words).data)
    count = 0 if positions is None else positions.size
    hasher.update(struct.pack("<Q", count))
    if positions is not None and changed_words is not None and count:
        hasher.update(positions.astype("<i8", copy=False).data)
        hasher.update(np.ascontiguousarray(changed_words).data)
    return hasher.hexdigest()


def masked_digest(base_values: npt.NDArray[np.uint8]) -> str:
    """The base's bytes at the mask's indices, in value-stream order (format.md, "Manifest", masked_digest)."""
    return of_pieces([b"fishckpt-masked-v2\x00", np.ascontiguousarray(base_values).data]).hex()


def step_digest(
    base: str,
    mask: str,
    values: npt.NDArray[np.uint8],
    changes: Iterable[tuple[int, npt.NDArray[np.int64], npt.NDArray[np.generic]]],
) -> str:
    """A v2 step's content digest (format.md, "Step digest"): what the step sets, given its base and mask.

    Args:
        base: The base digest (hex).
        mask: The mask digest (hex).
        values: Every masked value, in value-stream order, as bytes.
        changes: For each tensor that differs from the base outside the mask, in manifest
            order: its manifest position, the changed positions (ascending) and their words.
    """
    hasher = xxhash.xxh3_128(b"fishckpt-step-v2\x00")
    hasher.update(bytes.fromhex(base))
    hasher.update(bytes.fromhex(mask))
    hasher.update(struct.pack("<Q", values.size))
    hasher.update(np.ascontiguousarray(values).data)
    listed = list(changes)
    hasher.update(struct.pack("<Q", len(listed)))
    for position, positions, words in listed:
        hasher.update(struct.pack("<QQ", position, positions.size))
        hasher.update(positions.astype("<i8", copy=False).data)
        hasher.update(np.ascontiguousarray(words).data)
    return hasher.hexdigest()


def sharded_step_digest(part_digests: Sequence[str]) -> str:
    """A sharded step's digest: its parts' step digests, in rank order (format.md, "Sharded steps")."""
    hasher = xxhash.xxh3_128(b"fishckpt-sharded-step-v2\x00")
    hasher.update(struct.pack("<Q", len(part_digests)))
    for digest in part_digests:
        hasher.update(bytes.fromhex(digest))
    return hasher.hexdigest()


def part_mask_digest(mask: str, ranges: npt.NDArray[np.int64]) -> str:
    """The mask digest a part's step digest is computed with: the store's mask and the part's ranges."""
    hasher = xxhash.xxh3_128(b"fishckpt-part-mask-v2\x00")
    hasher.update(bytes.fromhex(mask))
    hasher.update(np.ascontiguousarray(ranges, dtype="<i8").data)
    return hasher.hexdigest()
