"""The explicit table of tensor dtypes fishckpt writes to disk (docs/format.md, "Dtypes")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FormatError


@dataclass(frozen=True)
class DType:
    """One row of the on-disk dtype table.

    Attributes:
        name: The name written to disk.
        torch_dtype: The torch dtype it stands for.
        itemsize: Bytes per element.
        safetensors: safetensors' own name for it, or None where safetensors has none
            (such tensors are stored as raw U8 bytes).
    """

    name: str
    torch_dtype: torch.dtype
    itemsize: int
    safetensors: str | None

    @property
    def word_bytes(self) -> int:
        """Width of the integer words an element is coded as (complex128 is two 8-byte words)."""
        return min(self.itemsize, 8)


# name, safetensors name; in this order, which is the order of docs/format.md's table.
_TABLE = (
    ("float64", "F64"),
    ("float32", "F32"),
    ("float16", "F16"),
    ("bfloat16", "BF16"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
    ("float8_e8m0fnu", None),
    ("float4_e2m1fn_x2", None),
    ("complex32", None),
    ("complex64", "C64"),
    ("complex128", None),
    ("int8", "I8"),
    ("int16", "I16"),
    ("int32", "I32"),
    ("int64", "I64"),
    ("uint8", "U8"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("bool", "BOOL"),
)


def _rows() -> list[DType]:
    rows = []
    for name, safetensors_name in _TABLE:
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):  # older torch lacks some float8 types
            rows.append(DType(name, dtype, dtype.itemsize, safetensors_name))
    return rows


BY_NAME: dict[str, DType] = {row.name: row for row in _rows()}
_BY_TORCH: dict[torch.dtype, DType] = {row.torch_dtype: row for row in BY_NAME.values()}

# safetensors' dtype names, for the torch dtypes it can hold natively.
SAFETENSORS_DTYPE: dict[torch.dtype, str] = {
    row.torch_dtype: row.safetensors for row in BY_NAME.values() if row.safetensors is not None
}


def dtype_row(dtype: torch.dtype, *, key: str) -> DType:
    """Returns the table row of ``dtype``; ``key`` names the tensor in the error."""
    row = _BY_TORCH.get(dtype)
    if row is None:
        raise FormatError(
            f"tensor {key!r} has dtype {dtype}, which fishckpt cannot store; "
            f"convert it to one of: {', '.join(sorted(BY_NAME))}"
        )
    return row


def dtype_by_name(name: str, *, where: str) -> DType:
    """Reads a dtype name from a file; ``where`` names the file in the error."""
    row = BY_NAME.get(name) if isinstance(name, str) else None
    if row is None:
        raise FormatError(f"{where}: unknown dtype {name!r}; this file needs a newer fishckpt")
    return row
