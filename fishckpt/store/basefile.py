"""The dense base: a safetensors file written once, streamed with its per-chunk digests, and mapped to read."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ..errors import FormatError, IntegrityError
from ..format import digests, safetensors_layout
from ..format.bits import byte_view
from ..format.dtypes import DType
from ..format.manifest import TensorEntry

_METADATA = {"format": "pt", "writer": "fishckpt"}


class BaseWriter:
    """The base file's bytes as pieces for an atomic write, hashing each chunk as it goes.

    safetensors' own ``save_file`` first copies every tensor into a bytes
    object; writing the format ourselves keeps create at one pass and no copy.
    Dtypes safetensors lacks are stored as raw U8 bytes (docs/format.md).
    ``chunk_digests`` is complete once ``pieces()`` has been consumed.
    """

    def __init__(self, tensors: list[tuple[str, torch.Tensor, DType]], chunk_bytes: int) -> None:
        self._tensors = tensors
        self._chunk_bytes = chunk_bytes
        self.chunk_digests: dict[str, list[bytes]] = {}

    def pieces(self) -> Iterator[bytes | memoryview]:
        by_name = {name: (tensor, row) for name, tensor, row in self._tensors}
        head, offsets = base_header([(name, row, tuple(tensor.shape)) for name, tensor, row in self._tensors])
        yield head
        for name in offsets:
            tensor, row = by_name[name]
            data = byte_view(tensor)
            per_chunk = digests.chunk_elements(row.itemsize, self._chunk_bytes) * row.itemsize
            chunks = self.chunk_digests[name] = []
            for start, stop in digests.chunk_ranges(data.numel(), per_chunk):
                piece = data[start:stop]
                chunks.append(digests.of_tensor_bytes(piece))
                yield piece.numpy().data


def base_header(specs: list[tuple[str, DType, tuple[int, ...]]]) -> tuple[bytes, dict[str, int]]:
    """The base file's header for tensors ``(name, dtype, shape)``, and each tensor's data offset in the file.

    Tensors follow larger elements first (stable), as safetensors' own writer orders them, so
    every tensor starts aligned to its element size. The offsets dict is in file order.
    """
    order = sorted(specs, key=lambda spec: -spec[1].itemsize)
    layout = []
    for name, row, shape in order:
        size = math.prod(shape) * row.itemsize
        native = row.safetensors
        layout.append((name, native or "U8", list(shape) if native else [size], size))
    head = safetensors_layout.header(layout, _METADATA)
    offsets, offset = {}, len(head)
    for name, _, _, size in layout:
        offsets[name] = offset
        offset += size
    return head, offsets


def open_base(buffer: memoryview, entries: list[TensorEntry], *, where: str) -> dict[str, torch.Tensor]:
    """Views the mapped base file's tensors and checks its table against the manifest's entries.

    The tensors share the mapping's pages (copy-on-write); nothing is read yet.
    Their bytes are verified against the chunk digests when used.
    """
    try:
        layout = safetensors_layout.parse(
            bytes(buffer[: _head_length(buffer, where)]), file_size=len(buffer), where="safetensors header"
        )
    except IntegrityError as error:
        raise IntegrityError(f"{where}: base file is corrupted or truncated: {error}") from error
    stored_by_name = layout.by_name()
    tensors = {}
    for entry in entries:
        if entry.alias_of is not None:
            continue
        stored = stored_by_name.get(entry.name)
        if stored is None:
            raise IntegrityError(f"{where}: base file lacks tensor {entry.name!r}")
        native = entry.dtype.safetensors
        if (stored.dtype == native and stored.shape == entry.shape) or (
            stored.dtype == "U8" and stored.shape == (entry.nbytes,)
        ):
            if entry.numel:
                flat = torch.frombuffer(buffer, dtype=torch.uint8, count=stored.nbytes, offset=stored.start)
                tensors[entry.name] = flat.view(entry.dtype.torch_dtype).reshape(entry.shape)
            else:
                tensors[entry.name] = torch.empty(entry.shape, dtype=entry.dtype.torch_dtype)
        else:
            raise IntegrityError(
                f"{where}: tensor {entry.name!r} is {stored.dtype} {list(stored.shape)} in the base file, "
                f"but the manifest says {entry.dtype.name} {entry.shape}"
            )
    extra = set(stored_by_name) - {e.name for e in entries}
    if extra:
        raise FormatError(f"{where}: base file holds tensors the manifest does not list: {sorted(extra)[:5]}")
    return tensors


def _head_length(buffer: memoryview, where: str) -> int:
    return 8 + safetensors_layout.header_length(bytes(buffer[:8]), file_size=len(buffer), where="safetensors header")
