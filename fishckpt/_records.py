"""The records CheckpointStore returns: what a save wrote, what a step holds, what verify found."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import IntegrityError


@dataclass(frozen=True)
class SaveInfo:
    """What ``CheckpointStore.save`` wrote.

    Attributes:
        step: The step saved.
        path: The checkpoint file.
        bytes_written: Size of the checkpoint file, headers included.
        dense_bytes: Size of the same state as raw dense tensors, for comparison.
        k: Masked values stored.
        changed_outside_mask: Entries that differ from the base outside the mask, per tensor.
        outside_mask_storage: "sparse" or "dense", per tensor in ``changed_outside_mask``.
        checked_outside_mask: Whether entries outside the mask were compared with the base.
        seconds: Wall time of the save, durable write included.
        training_state_bytes: Bytes of optimizer, scheduler and RNG state within ``bytes_written``.
    """

    step: int
    path: Path
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
    path: Path
    created: float
    bytes: int
    dense_bytes: int
    k: int
    changed_outside_mask: dict[str, int]
    metadata: dict[str, Any]
    training_state_bytes: int = 0


@dataclass(frozen=True)
class VerifyFailure:
    """One problem ``verify`` found: the file, and the tensor where known."""

    file: Path
    tensor: str | None
    problem: str

    def __str__(self) -> str:
        where = f" (tensor {self.tensor!r})" if self.tensor else ""
        return f"{self.file}{where}: {self.problem}"


class VerifyError(IntegrityError):
    """Raised by ``verify``; ``failures`` lists every problem found."""

    def __init__(self, failures: list[VerifyFailure]) -> None:
        self.failures = failures
        lines = "\n".join(f"  {failure}" for failure in failures)
        super().__init__(f"{len(failures)} integrity problem(s):\n{lines}")
