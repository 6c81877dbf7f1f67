"""O(k) switching: which step each target tensor holds, and moving it to another step in place."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from . import batch
from .layout import StoreLayout
from .rebuild import apply, check_written, undo
from .stepcodec import Decoded


class _Resident(weakref.ref):  # type: ignore[type-arg]
    """A weak reference to a tensor, with what this store object last wrote into it and the
    tensor's version counter right after.

    One object per tensor, and no closure: a load of 20,000 tensors allocating several
    garbage-collected objects each triggered full collections that cost 8 µs per tensor.
    """

    __slots__ = ("decoded", "key", "version")

    def __new__(
        cls, owner: torch.Tensor, callback: Callable[[_Resident], None], key: int, decoded: Decoded, version: int
    ) -> _Resident:
        return super().__new__(cls, owner, callback)

    def __init__(
        self, owner: torch.Tensor, callback: Callable[[_Resident], None], key: int, decoded: Decoded, version: int
    ) -> None:
        # weakref.ref.__new__ made the reference; its __init__ only checks the same arguments.
        self.key = key
        self.decoded = decoded
        self.version = version


class Residency:
    """Remembers, per target tensor, the decoded step written into it and its version counter after.

    A tensor whose version counter has not moved since holds exactly what was
    written, so a later switch need only touch the entries either step set. The
    decoded step itself is kept (O(k)), not just its number: a switch undoes what
    was written, even if that step has been saved again or deleted since.
    """

    def __init__(self) -> None:
        # id(tensor) -> its record; a WeakKeyDictionary would compare tensors with ==.
        self._resident: dict[int, _Resident] = {}

    def _forget(self, record: _Resident) -> None:
        if self._resident.get(record.key) is record:
            del self._resident[record.key]

    def remember(self, owners: list[torch.Tensor], decoded: Decoded, data: list[torch.Tensor] | None = None) -> None:
        """Records that ``owners`` hold ``decoded``; ``data`` (default: the owners) are the tensors written.

        A DTensor owner's data is its local shard: a view whose version counter is the shard's own.
        """
        forget, resident = self._forget, self._resident
        for owner, written in zip(owners, owners if data is None else data, strict=True):
            key = id(owner)
            resident[key] = _Resident(owner, forget, key, decoded, written._version)

    def held(self, owners: list[torch.Tensor], data: list[torch.Tensor] | None = None) -> Decoded | None:
        """The one decoded step every tensor of ``owners`` holds untouched, or None."""
        held = None
        for owner, written in zip(owners, owners if data is None else data, strict=True):
            found = self._resident.get(id(owner))
            if found is None or found() is not owner or found.version != written._version:
                return None
            if held is not None and found.decoded is not held:
                return None
            held = found.decoded
        return held


def switch(layout: StoreLayout, targets: list[torch.Tensor], old: Decoded, new: Decoded, *, verify: bool) -> None:
    """Moves ``targets`` (mask-table rows) from step ``old`` to step ``new``, touching only entries either sets."""
    found = batch.Rows(targets)
    undo(layout, targets, old)
    apply(layout, found, new)
    if verify:
        check_written(layout, found, new)
