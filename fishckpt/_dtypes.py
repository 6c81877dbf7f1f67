"""The explicit table of tensor dtypes fishckpt writes to disk, and bit-pattern views."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._errors import FormatError


@dataclass(frozen=True)
class DType:
    """One row of the on-disk dtype table (docs/format.md, "Dtypes")."""

    name: str
    torch_dtype: torch.dtype
    itemsize: int
    safetensors_native: bool

    @property
    def word_bytes(self) -> int:
        """Width of the integer words an element is coded as (complex128 is two 8-byte words)."""
        return min(self.itemsize, 8)


def _rows() -> list[DType]:
    spec: list[tuple[str, str, bool]] = [
        ("float64", "float64", True),
        ("float32", "float32", True),
        ("float16", "float16", True),
        ("bfloat16", "bfloat16", True),
        ("float8_e4m3fn", "float8_e4m3fn", True),
        ("float8_e4m3fnuz", "float8_e4m3fnuz", True),
        ("float8_e5m2", "float8_e5m2", True),
        ("float8_e5m2fnuz", "float8_e5m2fnuz", True),
        ("float8_e8m0fnu", "float8_e8m0fnu", False),
        ("float4_e2m1fn_x2", "float4_e2m1fn_x2", False),
        ("complex32", "complex32", False),
        ("complex64", "complex64", True),
        ("complex128", "complex128", False),
        ("int8", "int8", True),
        ("int16", "int16", True),
        ("int32", "int32", True),
        ("int64", "int64", True),
        ("uint8", "uint8", True),
        ("uint16", "uint16", True),
        ("uint32", "uint32", True),
        ("uint64", "uint64", True),
        ("bool", "bool", True),
    ]
    rows = []
    for name, attr, native in spec:
        dtype = getattr(torch, attr, None)
        if isinstance(dtype, torch.dtype):  # older torch lacks some float8 types
            rows.append(DType(name, dtype, dtype.itemsize, native))
    return rows


_BY_NAME: dict[str, DType] = {row.name: row for row in _rows()}
_BY_TORCH: dict[torch.dtype, DType] = {row.torch_dtype: row for row in _BY_NAME.values()}

_UNSIGNED_WORD: dict[int, torch.dtype] = {
    1: torch.uint8,
    2: torch.int16,
    4: torch.int32,
    8: torch.int64,
}


def dtype_row(dtype: torch.dtype, *, key: str) -> DType:
    """Returns the table row of ``dtype``; ``key`` names the tensor in the error."""
    row = _BY_TORCH.get(dtype)
    if row is None:
        raise FormatError(
            f"tensor {key!r} has dtype {dtype}, which fishckpt cannot store; "
            f"convert it to one of: {', '.join(sorted(_BY_NAME))}"
        )
    return row


def dtype_by_name(name: str, *, where: str) -> DType:
    """Reads a dtype name from a file; ``where`` names the file in the error."""
    row = _BY_NAME.get(name)
    if row is None:
        raise FormatError(f"{where}: unknown dtype {name!r}; this file needs a newer fishckpt")
    return row


def word_view(tensor: torch.Tensor) -> torch.Tensor:
    """A flat view of a contiguous tensor's bit patterns as integer words.

    Elements of 16 bytes (complex128) become two 8-byte words each. The words
    are signed for 2/4/8 bytes because torch has no arithmetic on wide unsigned
    types; callers treat them as bit patterns only.
    """
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    word = min(flat.element_size(), 8)
    return flat.view(_UNSIGNED_WORD[word])
