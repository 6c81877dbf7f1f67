"""Dense state-dict files: reading safetensors and PyTorch files without pickle, writing them atomically."""

from __future__ import annotations

import pickle
import struct
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import FormatError, InvalidArgumentError, MissingFileError
from .format import safetensors_layout
from .format.dtypes import safetensors_name
from .storage.local import atomic_write, atomic_writer

if TYPE_CHECKING:  # torch is imported where tensors are made, so the CLI can start without it
    import torch

PathLike = str | Path
STATE_FORMATS = ("safetensors", "pt")


def load_state_file(path: PathLike) -> dict[str, torch.Tensor]:
    """Reads a state dict from a safetensors or PyTorch file, telling them apart by content.

    PyTorch files are read with ``torch.load(weights_only=True)``: no pickled code
    runs, and a file holding Python objects other than tensors is refused. A
    top-level ``{"state_dict": {...}}`` wrapper, common in training scripts, is unwrapped.

    Raises:
        MissingFileError: ``path`` does not exist.
        FormatError: The file is neither format, or holds something other than named tensors.

    Example:
        >>> state = load_state_file("model.safetensors")
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: no such file or folder; check the path") from None
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
    import torch

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
    import torch

    from .format.bits import byte_view

    path = Path(path)
    if file_format == "pt":
        with atomic_writer(path, overwrite=overwrite) as handle:
            torch.save(dict(state), handle)
            return handle.tell()
    if file_format != "safetensors":
        raise InvalidArgumentError(f"unknown format {file_format!r}; expected one of {STATE_FORMATS}")
    bad = [name for name in state if not isinstance(name, str) or name == "__metadata__"]
    if bad:
        raise FormatError(
            f"{path}: key(s) {bad[:5]!r} cannot be stored in a safetensors file (keys must be strings other than "
            "`__metadata__`); rename them, or write a PyTorch file (format 'pt')"
        )
    for name, tensor in state.items():
        if safetensors_name(tensor.dtype) is None:
            raise FormatError(
                f"{path}: tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot hold; "
                "write a PyTorch file instead (format 'pt')"
            )
    names = safetensors_layout.aligned_order(state)
    layout = [
        (name, str(safetensors_name(state[name].dtype)), list(state[name].shape), _nbytes(state[name]))
        for name in names
    ]

    def pieces() -> Iterator[bytes | memoryview]:
        yield safetensors_layout.header(layout, {"format": "pt"})
        for name in names:  # one tensor at a time: a CUDA or strided state is never copied whole
            yield byte_view(state[name].detach().cpu().contiguous()).numpy().data

    return atomic_write(path, pieces(), overwrite=overwrite)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
