"""The dense base: a safetensors file written once, plus the per-chunk digests that pin it."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from ._dtypes import DType
from ._errors import FormatError, IntegrityError
from ._files import SAFETENSORS_DTYPE, aligned_order, byte_view, safetensors_header


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
        return xxhash.xxh3_128_digest(b"".join(self.chunk_digests))


def digest_of(data: torch.Tensor) -> bytes:
    """xxh3-128 of a contiguous CPU tensor's bytes, read in place."""
    return xxhash.xxh3_128_digest(data.numpy().data)


def chunk_elements(itemsize: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // itemsize)


def chunk_ranges(numel: int, per_chunk: int) -> Iterator[tuple[int, int]]:
    """Element ranges [start, stop) of the hashing chunks; an empty tensor has one empty chunk."""
    if numel == 0:
        yield 0, 0
        return
    for start in range(0, numel, per_chunk):
        yield start, min(start + per_chunk, numel)


def write_base(path: Path, tensors: list[tuple[str, torch.Tensor, DType]], chunk_bytes: int) -> list[list[bytes]]:
    """Streams contiguous CPU tensors into a safetensors file, hashing each chunk as it goes.

    safetensors' own ``save_file`` first copies every tensor into a bytes
    object; writing the format ourselves keeps create at one pass and no copy.
    Dtypes safetensors lacks are stored as raw U8 bytes (docs/format.md). The
    caller renames the file into place.

    Returns:
        The chunk digests of each tensor, in the order given.
    """
    by_name = {name: (tensor, row) for name, tensor, row in tensors}
    order = aligned_order({name: tensor for name, tensor, _ in tensors})
    layout = []
    for name in order:
        tensor, row = by_name[name]
        native = SAFETENSORS_DTYPE.get(row.torch_dtype)
        size = tensor.numel() * row.itemsize
        layout.append((name, native or "U8", list(tensor.shape) if native else [size], size))
    digests: dict[str, list[bytes]] = {}
    with open(path, "xb") as handle:
        handle.write(safetensors_header(layout, {"format": "pt", "writer": "fishckpt"}))
        for name in order:
            tensor, row = by_name[name]
            data = byte_view(tensor)
            per_chunk = chunk_elements(row.itemsize, chunk_bytes) * row.itemsize
            digests[name] = []
            for start, stop in chunk_ranges(data.numel(), per_chunk):
                piece = data[start:stop]
                digests[name].append(digest_of(piece))
                handle.write(piece.numpy().data)
        handle.flush()
        os.fsync(handle.fileno())
    return [digests[name] for name, _, _ in tensors]


def open_base(path: Path, entries: list[TensorEntry]) -> dict[str, torch.Tensor]:
    """Memory-maps the base file and checks its table against the manifest's entries.

    The tensors share the file's pages (copy-on-write); nothing is read yet.
    Their bytes are verified against the chunk digests when used.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(path)
    except FileNotFoundError:
        raise IntegrityError(f"{path}: the store's base file is missing") from None
    except (SafetensorError, OSError, ValueError) as error:
        raise IntegrityError(f"{path}: base file is corrupted or truncated: {error}") from error
    tensors = {}
    for entry in entries:
        if entry.alias_of is not None:
            continue
        stored = raw.get(entry.name)
        if stored is None:
            raise IntegrityError(f"{path}: base file lacks tensor {entry.name!r}")
        if stored.dtype == entry.dtype.torch_dtype and tuple(stored.shape) == entry.shape:
            tensors[entry.name] = stored
        elif stored.dtype == torch.uint8 and stored.numel() == entry.nbytes and stored.dim() == 1:
            tensors[entry.name] = (
                stored.view(entry.dtype.torch_dtype).reshape(entry.shape)
                if entry.numel
                else torch.empty(entry.shape, dtype=entry.dtype.torch_dtype)
            )
        else:
            raise IntegrityError(
                f"{path}: tensor {entry.name!r} is {stored.dtype} {tuple(stored.shape)} in the base file, "
                f"but the manifest says {entry.dtype.name} {entry.shape}"
            )
    extra = set(raw) - {e.name for e in entries}
    if extra:
        raise FormatError(f"{path}: base file holds tensors the manifest does not list: {sorted(extra)[:5]}")
    return tensors
