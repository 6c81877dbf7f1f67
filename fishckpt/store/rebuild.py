"""Writing a step into tensors: the base copied and checked, the step's values scattered, and all read back."""

from __future__ import annotations

import torch

from ..errors import IntegrityError, StateMismatchError
from ..format.bits import element_words, plain
from . import batch
from .layout import StoreLayout
from .stepcodec import Decoded


def write_full(
    layout: StoreLayout, targets: list[torch.Tensor] | batch.Rows, decoded: Decoded, *, verify: bool
) -> None:
    """Writes step ``decoded`` into contiguous CPU ``targets`` (mask-table rows) from the base up.

    With ``verify``, every base chunk is hashed once copied (the copy, not the file, so the
    bytes returned are the bytes proved), and everything the step set is read back.
    """
    table = layout.table
    found = batch.rows(targets)
    # One whole copy, then a hash pass over the copy: faster here than copying and hashing block
    # by block (about 315 against 355 ms per GiB here), since the copy into fresh pages
    # is bound by page faults and the hash by memory reads, and they overlap badly in one loop.
    failing = batch.copy_check(table, found, layout.base_rows(), verify=False)
    if verify:
        failing = batch.copy_check(table, [None] * len(found), found)
    if failing:
        row, chunk = failing[0]
        raise layout.base_chunk_error(table.entries[row], chunk)
    apply(layout, found, decoded, verify=verify)


def apply(layout: StoreLayout, targets: list[torch.Tensor] | batch.Rows, decoded: Decoded, *, verify: bool) -> None:
    """Writes the step's masked values and outside-mask changes into ``targets`` (which hold the base there).

    With ``verify``, every entry the step sets is read back once written and compared with the
    decoded (digest-proved) content. Targets that share memory are the caller's to write through
    copies (``batch.overlapping``): a later write could change an earlier one after its read-back.
    """
    table = layout.table
    found = batch.rows(targets)
    for name, change in decoded.changes.items():
        if change.dense is not None:  # the whole tensor, masked entries at base values: before the masked values
            target = found.tensors[table.row_of[name]]
            element_words(target).copy_(change.dense.to(target.device))
    unwritten = batch.scatter(table, found, decoded.values, index_on=layout.row_index_on, read_back=verify)
    if unwritten is not None:
        raise _not_written(decoded, table.entries[unwritten].name)
    for name, change in decoded.changes.items():
        if change.dense is None:
            target = found.tensors[table.row_of[name]]
            element_words(target).index_copy_(0, change.positions.to(target.device), change.words.to(target.device))
    if verify:
        for name, change in decoded.changes.items():
            target = found.tensors[table.row_of[name]]
            words = element_words(target).index_select(0, change.positions.to(target.device)).cpu()
            if not torch.equal(words, change.words):
                raise _not_written(decoded, name)


def undo(layout: StoreLayout, targets: list[torch.Tensor], decoded: Decoded) -> None:
    """Puts the base's values back wherever step ``decoded`` changed a tensor outside the mask."""
    base = layout.base()
    table = layout.table
    for name, change in decoded.changes.items():
        target = targets[table.row_of[name]]
        base_words = element_words(base[name]).index_select(0, change.positions)
        element_words(target).index_copy_(0, change.positions.to(target.device), base_words.to(target.device))


def _not_written(decoded: Decoded, name: str) -> IntegrityError:
    return IntegrityError(
        f"{decoded.where}: tensor {name!r} does not read back what the step sets after it was written; "
        "the memory holding it changed underneath, or this is a bug: please report it"
    )


def check_shared(
    layout: StoreLayout,
    views: list[torch.Tensor],
    staged: list[torch.Tensor],
    shared: list[tuple[int, int]],
    decoded: Decoded,
) -> None:
    """Raises unless every target tensor that shares memory with another holds what the step gives it.

    A base whose tensors overlapped (a buffer that is a view of a weight) is stored as separate
    tensors whose bytes agree where they meet, and writing them one after the other leaves each
    right. Tensors that share memory in the target but not in the saved state cannot all be right.
    """
    for first, second in shared:
        for row in (first, second):
            held = element_words(plain(views[row]).contiguous().cpu())
            if not torch.equal(held, element_words(staged[row].contiguous())):
                names = [layout.table.entries[number].name for number in (first, second)]
                raise StateMismatchError(
                    f"{decoded.where}: keys {names[0]!r} and {names[1]!r} of the target share memory, and the "
                    f"step holds different values where they meet, so key {layout.table.entries[row].name!r} "
                    "could not be loaded (the target now holds a mix); give each key its own tensor "
                    "(for example with .clone()) before loading into it"
                )
