"""O(k) switching: which step each target tensor holds, and moving it to another step in place."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..format.bits import contiguous, element_words, plain
from .layout import StoreLayout
from .rebuild import apply, check_rebuilt
from .stepcodec import Decoded


@dataclass
class _Resident:
    """What ``load_into`` left in a target tensor."""

    step: int
    version: int


class Residency:
    """Remembers, per target tensor, the step this store object wrote into it and its version counter after.

    A tensor whose version counter has not moved since holds exactly what was
    written, so a later switch need only touch the entries either step set.
    """

    def __init__(self) -> None:
        # id(tensor) -> (weak reference, record); a WeakKeyDictionary would compare tensors with ==.
        self._resident: dict[int, tuple[weakref.ref[torch.Tensor], _Resident]] = {}

    def remember(self, owner: torch.Tensor, step: int) -> None:
        key = id(owner)

        def forget(_: object) -> None:
            self._resident.pop(key, None)

        self._resident[key] = (weakref.ref(owner, forget), _Resident(step, owner._version))

    def step_held(self, owners: dict[str, torch.Tensor]) -> int | None:
        """The one step every tensor of ``owners`` holds untouched, or None."""
        steps = set()
        for owner in owners.values():
            found = self._resident.get(id(owner))
            if found is None or found[0]() is not owner or found[1].version != owner._version:
                return None
            steps.add(found[1].step)
        return steps.pop() if len(steps) == 1 else None


def switch(
    layout: StoreLayout,
    tensors: dict[str, torch.Tensor],
    owners: dict[str, torch.Tensor],
    old: Decoded,
    new: Decoded,
    *,
    verify: bool,
) -> None:
    """Moves tensors from step ``old`` to step ``new`` touching only entries either step set."""
    base = layout.base()
    for name in owners:
        entry = layout.entries[name]
        tensor = tensors[name]
        work = contiguous(plain(tensor))  # the tensor itself where it can be written as bits
        elements = element_words(work)
        if name in old.extras:  # undo the old step's changes outside the mask
            positions, _ = old.extras[name]
            base_elements = element_words(base[name])
            if positions is None:
                elements.copy_(base_elements.to(work.device))
            else:
                elements.index_copy_(
                    0, positions.to(work.device), base_elements.index_select(0, positions).to(work.device)
                )
        apply(layout, entry, work, new)
        if verify:
            check_rebuilt(layout, entry, work, new)
        if work is not tensor:
            tensor.copy_(work)
