"""O(k) switching: which step each target tensor holds, and moving it to another step in place."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from . import batch
from .layout import StoreLayout
from .rebuild import apply, check_written, undo
from .stepcodec import Decoded


@dataclass
class _Resident:
    """What this store object last wrote into a tensor, and the tensor's version counter right after."""

    decoded: Decoded
    version: int


class Residency:
    """Remembers, per target tensor, the decoded step written into it and its version counter after.

    A tensor whose version counter has not moved since holds exactly what was
    written, so a later switch need only touch the entries either step set. The
    decoded step itself is kept (O(k)), not just its number: a switch undoes what
    was written, even if that step has been saved again or deleted since.
    """

    def __init__(self) -> None:
        # id(tensor) -> (weak reference, record); a WeakKeyDictionary would compare tensors with ==.
        self._resident: dict[int, tuple[weakref.ref[torch.Tensor], _Resident]] = {}

    def remember(self, owners: list[torch.Tensor], decoded: Decoded, data: list[torch.Tensor] | None = None) -> None:
        """Records that ``owners`` hold ``decoded``; ``data`` (default: the owners) are the tensors written.

        A DTensor owner's data is its local shard: a view whose version counter is the shard's own.
        """
        for owner, written in zip(owners, owners if data is None else data, strict=True):
            key = id(owner)

            def forget(_: object, key: int = key) -> None:
                self._resident.pop(key, None)

            self._resident[key] = (weakref.ref(owner, forget), _Resident(decoded, written._version))

    def held(self, owners: list[torch.Tensor], data: list[torch.Tensor] | None = None) -> Decoded | None:
        """The one decoded step every tensor of ``owners`` holds untouched, or None."""
        held = None
        for owner, written in zip(owners, owners if data is None else data, strict=True):
            found = self._resident.get(id(owner))
            if found is None or found[0]() is not owner or found[1].version != written._version:
                return None
            if held is not None and found[1].decoded is not held:
                return None
            held = found[1].decoded
        return held


def switch(layout: StoreLayout, targets: list[torch.Tensor], old: Decoded, new: Decoded, *, verify: bool) -> None:
    """Moves ``targets`` (mask-table rows) from step ``old`` to step ``new``, touching only entries either sets."""
    found = batch.Rows(targets)
    undo(layout, targets, old)
    apply(layout, found, new)
    if verify:
        check_written(layout, found, new)
