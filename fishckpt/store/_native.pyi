"""Type stub of the optional C extension fishckpt/_native.c (see fishckpt/_scan.py)."""

from typing_extensions import Buffer

def masked_scan(
    data: Buffer,
    itemsize: int,
    chunk_elements: int,
    index: Buffer,
    base_values: Buffer,
    values: Buffer,
    chunk_digests: Buffer,
    /,
) -> list[int]: ...
