"""Comparing two state dicts tensor by tensor: what changed (by bits), by how much, and where."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .format.bits import differs as words_differ
from .format.bits import element_words
from .mask import Mask


@dataclass(frozen=True)
class TensorDiff:
    """How one tensor differs between A and B.

    ``max_abs_delta`` and ``l2`` are None for non-float tensors, and infinite
    when a change involves NaN or infinity (no finite distance describes it).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    changed: int
    outside_mask: int
    max_abs_delta: float | None
    l2: float | None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class StateDiff:
    """The shape of git-theta's diff: tensors only in A, only in B, and those in both."""

    compared: list[TensorDiff]
    only_in_a: list[str]
    only_in_b: list[str]
    mismatched: list[tuple[str, str, str]]  # name, A's "dtype shape", B's "dtype shape"

    @property
    def changed(self) -> list[TensorDiff]:
        """Tensors with at least one changed entry, most changes first."""
        return sorted((t for t in self.compared if t.changed), key=lambda t: (-t.changed, t.name))

    @property
    def entries_changed(self) -> int:
        return sum(t.changed for t in self.compared)

    @property
    def outside_mask(self) -> int:
        """Changed entries outside the mask, over every tensor compared."""
        return sum(t.outside_mask for t in self.compared)

    @property
    def max_abs_delta(self) -> float:
        """The largest |Δ| over the float tensors compared (0.0 if none changed)."""
        return max((t.max_abs_delta for t in self.compared if t.max_abs_delta is not None), default=0.0)

    @property
    def l2(self) -> float:
        """The L2 norm of Δ over every float tensor compared."""
        return math.sqrt(sum(t.l2**2 for t in self.compared if t.l2 is not None and t.max_abs_delta is not None))


__all__ = ["StateDiff", "TensorDiff", "diff_states", "diff_tensor"]


def diff_states(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], mask: Mask | None = None) -> StateDiff:
    """Compares every tensor A and B share, by bit patterns; ``mask`` decides which changes are outside it.

    Without a mask, every change counts as outside it.

    Example:
        >>> diff_states({"w": torch.zeros(2)}, {"w": torch.tensor([0.0, 1.0])}).compared[0].changed
        1
    """
    compared, mismatched = [], []
    covered = set(mask.names) if mask is not None else set()
    for name, before in a.items():
        after = b.get(name)
        if after is None:
            continue
        if before.dtype != after.dtype or before.shape != after.shape:
            mismatched.append((name, _describe(before), _describe(after)))
            continue
        compared.append(diff_tensor(name, before, after, mask[name] if mask is not None and name in covered else None))
    return StateDiff(
        compared=compared,
        only_in_a=[name for name in a if name not in b],
        only_in_b=[name for name in b if name not in a],
        mismatched=mismatched,
    )


def diff_tensor(name: str, before: torch.Tensor, after: torch.Tensor, mask_index: torch.Tensor | None) -> TensorDiff:
    """One tensor's changes; an entry counts as changed when its bit pattern differs.

    So NaN -> the same NaN is unchanged, and 0.0 -> -0.0 is a change (with |Δ| = 0).
    """
    before = before.detach().cpu().contiguous()
    after = after.detach().cpu().contiguous()
    differs = words_differ(element_words(before), element_words(after))
    changed = int(differs.sum())
    inside = int(differs[mask_index].sum()) if mask_index is not None and mask_index.numel() else 0
    max_abs, l2 = _distances(before, after, differs) if changed else (0.0, 0.0)
    if not (before.is_floating_point() or before.is_complex()):
        max_abs, l2 = None, None
    return TensorDiff(name, before.dtype, tuple(before.shape), changed, changed - inside, max_abs, l2)


def _distances(before: torch.Tensor, after: torch.Tensor, differs: torch.Tensor) -> tuple[float | None, float | None]:
    """max |Δ| and the L2 norm of Δ over the changed entries, in float64 (complex128 for complex)."""
    wide = torch.complex128 if before.is_complex() else torch.float64
    try:
        old, new = before.reshape(-1)[differs].to(wide), after.reshape(-1)[differs].to(wide)
    except (RuntimeError, TypeError):  # a dtype torch cannot convert (packed float4): count only
        return None, None
    delta = (new - old).abs().nan_to_num(nan=math.inf)
    return float(delta.max()), float(delta.square().sum().sqrt())


def _describe(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}"
