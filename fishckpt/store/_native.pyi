"""Type stub of the optional C extension fishckpt/store/_native.c (see fishckpt/store/batch.py)."""

from typing_extensions import Buffer

def gather_table(
    first: int,
    last: int,
    data: Buffer,
    numels: Buffer,
    itemsizes: Buffer,
    index_starts: Buffer,
    index: Buffer,
    values: Buffer,
    /,
) -> None: ...
def scatter_table(
    first: int,
    last: int,
    data: Buffer,
    numels: Buffer,
    itemsizes: Buffer,
    index_starts: Buffer,
    index: Buffer,
    values: Buffer,
    /,
) -> None: ...
def scatter_checked_table(
    first: int,
    last: int,
    data: Buffer,
    numels: Buffer,
    itemsizes: Buffer,
    index_starts: Buffer,
    index: Buffer,
    values: Buffer,
    /,
) -> int: ...
def scan_table(
    first: int,
    last: int,
    data: Buffer,
    numels: Buffer,
    itemsizes: Buffer,
    index_starts: Buffer,
    index: Buffer,
    values: Buffer,
    base_values: Buffer,
    chunk_elements: Buffer,
    digest_starts: Buffer,
    digests: Buffer,
    /,
) -> list[tuple[int, int]]: ...
def copy_check(
    first: int,
    last: int,
    targets: Buffer,
    sources: Buffer,
    nbytes: Buffer,
    chunk_bytes: Buffer,
    digest_starts: Buffer,
    digests: Buffer,
    verify: bool,
    /,
) -> list[tuple[int, int]]: ...
