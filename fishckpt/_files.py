"""Dense state-dict files: reading safetensors and PyTorch files without pickle, writing them atomically."""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from ._errors import FormatError, InvalidArgumentError
from ._io import atomic_write, atomic_writer

PathLike = str | Path
STATE_FORMATS = ("safetensors", "pt")

# safetensors' dtype names, for the torch dtypes it can hold.
SAFETENSORS_DTYPE: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.complex64: "C64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def load_state_file(path: PathLike) -> dict[str, torch.Tensor]:
    """Reads a state dict from a safetensors or PyTorch file, telling them apart by content.

    PyTorch files are read with ``torch.load(weights_only=True)``: no pickled code
    runs, and a file holding Python objects other than tensors is refused. A
    top-level ``{"state_dict": {...}}`` wrapper, common in training scripts, is unwrapped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        FormatError: The file is neither format, or holds something other than named tensors.

    Example:
        >>> state = load_state_file("model.safetensors")
    """
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(9)
    if _is_safetensors(head) and struct.unpack("<Q", head[:8])[0] < path.stat().st_size:
        return _read_safetensors(path)
    if looks_like_state_file(head):
        return _read_torch(path)
    raise FormatError(
        f"{path}: not a safetensors or PyTorch weights file; save the state dict with "
        "safetensors.torch.save_file or torch.save(model.state_dict(), path)"
    )


def looks_like_state_file(head: bytes) -> bool:
    """Whether a file's first 9 bytes look like safetensors or a PyTorch file."""
    # PK: the zip container torch.save writes; 0x80: the pickle stream of the legacy format.
    return _is_safetensors(head) or head.startswith((b"PK", b"\x80"))


def _is_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(path))
    except (SafetensorError, ValueError, KeyError) as error:
        raise FormatError(f"{path}: cannot read as a safetensors file: {error}") from error


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        # A file handle, not the path: torch.load guesses the format from a path's suffix,
        # and the content has already told us.
        with open(path, "rb") as handle:
            loaded = torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise FormatError(
            f"{path}: refused: the file holds pickled Python objects, not just tensors; re-save it "
            "as a plain dict of tensors (torch.save(model.state_dict(), path)) or as safetensors"
        ) from error
    except (RuntimeError, zipfile.BadZipFile, EOFError, struct.error) as error:
        raise FormatError(f"{path}: cannot read as a PyTorch weights file: {error}") from error
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise FormatError(f"{path}: expected a dict of tensor names to tensors, found a {type(loaded).__name__}")
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise FormatError(
                f"{path}: key {key!r} holds a {type(value).__name__}, not a tensor; "
                "save only the model's state_dict (tensors), without optimizer state or counters"
            )
    return dict(loaded)


def save_state_file(
    path: PathLike, state: Mapping[str, torch.Tensor], *, file_format: str = "safetensors", overwrite: bool = False
) -> int:
    """Writes a state dict atomically (temp file, fsync, rename); returns the bytes written.

    ``pt`` keeps tied tensors tied (torch.save stores shared storage once).
    safetensors cannot share storage, so each tied key gets its own copy of the
    bytes; reading the file back gives equal but untied tensors.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        FormatError: A dtype safetensors cannot hold (use ``pt`` instead).
    """
    path = Path(path)
    if file_format == "pt":
        with atomic_writer(path, overwrite=overwrite) as handle:
            torch.save(dict(state), handle)
            return handle.tell()
    if file_format != "safetensors":
        raise InvalidArgumentError(f"unknown format {file_format!r}; expected one of {STATE_FORMATS}")
    for name, tensor in state.items():
        if tensor.dtype not in SAFETENSORS_DTYPE:
            raise FormatError(
                f"{path}: tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot hold; "
                "write a PyTorch file instead (format 'pt')"
            )
    names = aligned_order(state)
    layout = [
        (name, SAFETENSORS_DTYPE[state[name].dtype], list(state[name].shape), _nbytes(state[name])) for name in names
    ]

    def pieces() -> Iterator[bytes | memoryview]:
        yield safetensors_header(layout, {"format": "pt"})
        for name in names:  # one tensor at a time: a CUDA or strided state is never copied whole
            yield byte_view(state[name].detach().cpu().contiguous()).numpy().data

    return atomic_write(path, pieces(), overwrite=overwrite)


def aligned_order(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Larger elements first, as safetensors' own writer does, so every tensor starts aligned to its element size."""
    return sorted(state, key=lambda key: -state[key].element_size())


def safetensors_header(layout: Sequence[tuple[str, str, list[int], int]], metadata: Mapping[str, str]) -> bytes:
    """The length prefix and JSON header of a safetensors file whose tensors follow in ``layout`` order.

    Args:
        layout: ``(name, safetensors dtype, shape, byte size)`` per tensor, in file order.
        metadata: The ``__metadata__`` strings.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, dtype, shape, size in layout:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous CPU tensor's bytes (0-d and empty included)."""
    flat = tensor.reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
