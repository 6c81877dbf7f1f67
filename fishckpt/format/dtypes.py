"""The explicit table of tensor dtypes fishckpt writes to disk (docs/format.md, "Dtypes").

The table itself needs no torch, so reading headers (``fishckpt ls``) never imports it;
the torch dtypes are looked up on first use.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import FormatError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    """One row of the on-disk dtype table.

    Attributes:
        name: The name written to disk (also torch's name for it).
        itemsize: Bytes per element.
        safetensors: safetensors' own name for it, or None where safetensors has none
            (such tensors are stored as raw U8 bytes).
    """

    name: str
    itemsize: int
    safetensors: str | None

    @property
    def word_bytes(self) -> int:
        """Width of the integer words an element is coded as (complex128 is two 8-byte words)."""
        return min(self.itemsize, 8)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype it stands for."""
        found = _torch_dtypes().get(self.name)
        if found is None:
            raise FormatError(f"dtype {self.name} needs a newer torch than this one")
        return found


# name, itemsize, safetensors name; in the order of docs/format.md's table.
_TABLE = (
    ("float64", 8, "F64"),
    ("float32", 4, "F32"),
    ("float16", 2, "F16"),
    ("bfloat16", 2, "BF16"),
    ("float8_e4m3fn", 1, "F8_E4M3"),
    ("float8_e4m3fnuz", 1, "F8_E4M3FNUZ"),
    ("float8_e5m2", 1, "F8_E5M2"),
    ("float8_e5m2fnuz", 1, "F8_E5M2FNUZ"),
    ("float8_e8m0fnu", 1, None),
    ("float4_e2m1fn_x2", 1, None),
    ("complex32", 4, None),
    ("complex64", 8, "C64"),
    ("complex128", 16, None),
    ("int8", 1, "I8"),
    ("int16", 2, "I16"),
    ("int32", 4, "I32"),
    ("int64", 8, "I64"),
    ("uint8", 1, "U8"),
    ("uint16", 2, "U16"),
    ("uint32", 4, "U32"),
    ("uint64", 8, "U64"),
    ("bool", 1, "BOOL"),
)

BY_NAME: dict[str, DType] = {name: DType(name, size, safetensors) for name, size, safetensors in _TABLE}


@functools.cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    found = {}
    for name in BY_NAME:
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):  # older torch lacks some float8 types
            assert dtype.itemsize == BY_NAME[name].itemsize, name
            found[name] = dtype
    return found


@functools.cache
def _by_torch() -> dict[torch.dtype, DType]:
    return {dtype: BY_NAME[name] for name, dtype in _torch_dtypes().items()}


def supported_torch_dtypes() -> list[torch.dtype]:
    """The torch dtypes this torch has of the table's, in table order."""
    return list(_by_torch())


def safetensors_name(dtype: torch.dtype) -> str | None:
    """safetensors' name for a torch dtype it can hold natively, or None."""
    row = _by_torch().get(dtype)
    return None if row is None else row.safetensors


def dtype_row(dtype: torch.dtype, *, key: str) -> DType:
    """Returns the table row of ``dtype``; ``key`` names the tensor in the error."""
    row = _by_torch().get(dtype)
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
