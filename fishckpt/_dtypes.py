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

    @property
    def word_bytes(self) -> int:
        """Width of the integer words an element is coded as (complex128 is two 8-byte words)."""
        return min(self.itemsize, 8)


def _rows() -> list[DType]:
    names = [
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
        "complex32",
        "complex64",
        "complex128",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
    ]
    rows = []
    for name in names:
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):  # older torch lacks some float8 types
            rows.append(DType(name, dtype, dtype.itemsize))
    return rows


_BY_NAME: dict[str, DType] = {row.name: row for row in _rows()}
_BY_TORCH: dict[torch.dtype, DType] = {row.torch_dtype: row for row in _BY_NAME.values()}

# Integer word dtypes by width. Signed for 2/4/8 bytes because torch has no arithmetic on wide
# unsigned types; callers treat the words as bit patterns only.
WORD_DTYPE: dict[int, torch.dtype] = {
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


def element_words(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's elements as integer words: shape (numel,), or (numel, 2) for 16-byte types."""
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8)
    size = flat.element_size()
    if size <= 8:
        return flat.view(WORD_DTYPE[size])
    return flat.view(torch.int64).reshape(-1, size // 8)


def bytes_as_elements(data: torch.Tensor, row: DType) -> torch.Tensor:
    """``element_words`` of a uint8 byte range that holds ``row``-typed elements."""
    if row.itemsize <= 8:
        return data.view(WORD_DTYPE[row.itemsize])
    return data.view(torch.int64).reshape(-1, row.itemsize // 8)


def word_view(tensor: torch.Tensor) -> torch.Tensor:
    """A flat view of a contiguous tensor's bit patterns as integer words (complex128: two per element)."""
    return element_words(tensor).reshape(-1)
