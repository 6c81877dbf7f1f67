"""The records a store returns: what a save wrote, what a step holds, and where a store's bytes go."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


def _ratio(dense: int, stored: int) -> float:
    return dense / stored if stored else math.inf


@dataclass(frozen=True)
class SaveInfo:
    """What ``CheckpointStore.save`` wrote.

    Attributes:
        step: The step saved.
        path: Where the step file lies (a path, or a URL for remote stores).
        bytes_written: Size of the step file, headers included.
        dense_bytes: Size of the same state as raw dense tensors, for comparison.
        k: Masked values stored.
        changed_outside_mask: Entries that differ from the base outside the mask, per tensor.
        outside_mask_storage: "sparse" or "dense", per tensor in ``changed_outside_mask``.
        checked_outside_mask: Whether entries outside the mask were compared with the base.
        seconds: Wall time of the save, durable write included.
        training_state_bytes: Bytes of optimizer, scheduler and RNG state within ``bytes_written``.
    """

    step: int
    path: Any
    bytes_written: int
    dense_bytes: int
    k: int
    changed_outside_mask: dict[str, int]
    outside_mask_storage: dict[str, str]
    checked_outside_mask: bool
    seconds: float
    training_state_bytes: int = 0

    @property
    def bytes_per_masked_value(self) -> float:
        """Bytes of the model's checkpoint (training state excluded) per masked value."""
        model_bytes = self.bytes_written - self.training_state_bytes
        return model_bytes / self.k if self.k else float("inf")


@dataclass(frozen=True)
class CheckpointInfo:
    """A saved step as its file header describes it."""

    step: int
    path: Any
    created: float
    bytes: int
    dense_bytes: int
    k: int
    changed_outside_mask: dict[str, int]
    metadata: dict[str, Any]
    training_state_bytes: int = 0

    @property
    def model_bytes(self) -> int:
        """Bytes of the step file that hold the model (everything but the training state)."""
        return self.bytes - self.training_state_bytes

    @property
    def bytes_per_masked_value(self) -> float | None:
        """Model bytes per masked value (None for an empty mask)."""
        return self.model_bytes / self.k if self.k else None

    @property
    def compression_ratio(self) -> float:
        """How many times smaller this step is than a dense checkpoint of the same state."""
        return _ratio(self.dense_bytes, self.bytes)

    @property
    def outside_mask_total(self) -> int:
        return sum(self.changed_outside_mask.values())


@dataclass(frozen=True)
class OutsideMaskTotal:
    """One tensor's changes outside the mask, summed over the steps of a store."""

    tensor: str
    entries: int
    steps: int


@dataclass(frozen=True)
class StoreReport:
    """Where a store's bytes go, against the same steps saved densely (``CheckpointStore.report()``)."""

    location: str
    tensors: int
    dense_bytes: int
    k: int
    numel: int
    base_bytes: int
    mask_bytes: int
    manifest_bytes: int
    steps: list[CheckpointInfo]
    problems: dict[int, str] = field(default_factory=dict)  # step -> what is wrong with its file

    @property
    def density(self) -> float:
        return self.k / self.numel if self.numel else 0.0

    @property
    def checkpoint_bytes(self) -> int:
        return sum(info.bytes for info in self.steps)

    @property
    def training_state_bytes(self) -> int:
        return sum(info.training_state_bytes for info in self.steps)

    @property
    def total_bytes(self) -> int:
        """Bytes of every file of the store."""
        return self.base_bytes + self.mask_bytes + self.manifest_bytes + self.checkpoint_bytes

    @property
    def dense_equivalent_bytes(self) -> int:
        """Bytes of the same steps saved as dense checkpoints."""
        return len(self.steps) * self.dense_bytes

    @property
    def bytes_per_masked_value(self) -> float | None:
        """Model bytes of every step per masked value stored (training state excluded)."""
        values = self.k * len(self.steps)
        return (self.checkpoint_bytes - self.training_state_bytes) / values if values else None

    @property
    def compression_ratio(self) -> float | None:
        """Dense-equivalent bytes over the steps' bytes (None with no steps)."""
        return _ratio(self.dense_equivalent_bytes, self.checkpoint_bytes) if self.steps else None

    @property
    def store_vs_dense_ratio(self) -> float | None:
        """Dense-equivalent bytes over the whole store, base included (None with no steps)."""
        return self.dense_equivalent_bytes / self.total_bytes if self.steps else None

    def outside_mask_top(self, count: int = 10) -> list[OutsideMaskTotal]:
        """The tensors with the most entries changed outside the mask, over all steps."""
        entries: Counter[str] = Counter()
        steps: Counter[str] = Counter()
        for info in self.steps:
            entries.update(info.changed_outside_mask)
            steps.update(info.changed_outside_mask.keys())
        ranked = sorted(entries.items(), key=lambda item: (-item[1], item[0]))[:count]
        return [OutsideMaskTotal(name, total, steps[name]) for name, total in ranked]


@dataclass(frozen=True)
class VerifyReport:
    """What ``CheckpointStore.verify`` checked.

    Attributes:
        steps: The steps whose files were checked.
        gone: Steps that were listed but deleted while verify ran (a prune): not failures.
        base_checked: Whether every chunk of the base was hashed.
        base_ok: Whether the base passed what was checked of it.
    """

    steps: list[int]
    gone: list[int]
    base_checked: bool
    base_ok: bool
