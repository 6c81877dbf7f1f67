"""DTensor (FSDP2) tensors seen from one process: which part of the global tensor it holds.

Single-process code must not load torch.distributed. A tensor can only be a DTensor once
torch.distributed.tensor has been imported (by whoever made the DTensor), so DTensor's class is
looked up in sys.modules instead of imported, and the placement types are imported only after a
DTensor has been seen. The optimizer (method/optim.py) and the store (store/shards.py) share
these rules, so a shard means the same thing to training and to checkpoints.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Piece", "any_dtensor", "is_dtensor", "local_view", "localize", "piece_of", "process_group", "shard_bounds"]


def is_dtensor(tensor: object) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def any_dtensor(tensors: Iterable[object]) -> bool:
    """Whether any of ``tensors`` is a DTensor: one check per tensor, none before DTensor is imported."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(tensor, dtensor) for tensor in tensors)


def _dtensor_type() -> type | None:
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor if isinstance(dtensor, type) else None


def local_view(
    name: str, tensor: torch.Tensor, index: torch.Tensor | None, *, gradient: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensor's local data and the mask's indices into it: the tensor itself for a plain tensor.

    For a DTensor, the local shard and the entries of ``index`` (sorted global flat indices) that
    fall in it, as flat indices into the shard. ``index=None`` skips them (an empty index is
    returned). Parameters must be placed Shard(0) or Replicate(); ``gradient=True`` accepts any
    placement DTensor gives a gradient (Shard on any dim, Partial), which a mask can zero entry
    by entry wherever the entries sit.
    """
    empty = torch.zeros(0, dtype=torch.int64)
    if not is_dtensor(tensor):
        return tensor.detach(), index if index is not None else empty
    with torch.no_grad():
        local = tensor.to_local()  # type: ignore[attr-defined]  # a DTensor
    bounds = shard_bounds(name, tensor, tuple(local.shape), gradient=gradient)
    if index is None or bounds is None:
        return local, empty
    return local, localize(index.to("cpu"), tuple(tensor.shape), bounds)


def shard_bounds(
    name: str, tensor: Any, local_shape: tuple[int, ...], *, gradient: bool
) -> list[tuple[int, int]] | None:
    """The range [low, high) of each dimension that this rank's shard of a DTensor holds; None if it holds none.

    Shard(d) splits dimension d as ``torch.chunk`` does (ceil(size / mesh size) per rank, the last
    ranks possibly empty), which is the rule of both DTensor and FSDP2; several Shard placements
    nest in mesh-dimension order.
    """
    from torch.distributed.tensor import Partial, Replicate, Shard

    shape = tuple(tensor.shape)
    placements = tuple(tensor.placements)
    mesh = tensor.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return None  # this rank is not in the tensor's mesh and holds none of it
    bounds = [(0, size) for size in shape]
    for mesh_dim, placement in enumerate(placements):
        # Exact types: _StridedShard (tensor parallel + FSDP) is a Shard subclass with another layout.
        if type(placement) is Replicate or (gradient and isinstance(placement, Partial)):
            continue
        if type(placement) is Shard and shape and (gradient or placement.dim == 0):
            dim = placement.dim % len(shape)
            low, high = bounds[dim]
            count = high - low
            chunk = -(-count // mesh.size(mesh_dim))
            begin = min(coordinate[mesh_dim] * chunk, count)
            bounds[dim] = (low + begin, low + min(begin + chunk, count))
            continue
        raise NotImplementedError(
            f"parameter {name!r} is a DTensor placed {placements}; fishckpt trains DTensors sharded on "
            "dim 0 (Shard(0), as FSDP2's fully_shard makes them) or replicated (Replicate()) only, "
            f"not {placement!r}. Shard the parameter on dim 0, or train it replicated"
        )
    expected = tuple(high - low for low, high in bounds)
    if local_shape != expected:
        raise NotImplementedError(
            f"parameter {name!r}: this rank's shard has shape {local_shape}, but placements {placements} "
            f"split its shape {shape} into {expected} here; layouts other than torch.chunk's are not supported"
        )
    return bounds


def localize(index: torch.Tensor, shape: tuple[int, ...], bounds: list[tuple[int, int]]) -> torch.Tensor:
    """The sorted global flat ``index`` entries inside ``bounds``, as flat indices into the shard they make."""
    if all(low == 0 and high == size for (low, high), size in zip(bounds, shape, strict=True)):
        return index  # replicated: the local tensor is the whole tensor
    if all(low == 0 and high == size for (low, high), size in zip(bounds[1:], shape[1:], strict=True)):
        # Rows are contiguous in the row-major order, so a dim-0 shard is one span of the sorted index.
        row = math.prod(shape[1:])
        start, stop = bounds[0][0] * row, bounds[0][1] * row
        first, last = (int(i) for i in torch.searchsorted(index, torch.tensor([start, stop])))
        return index[first:last] - start
    coords = torch.unravel_index(index, shape)
    inside = torch.ones(index.numel(), dtype=torch.bool)
    for coord, (low, high) in zip(coords, bounds, strict=True):
        inside &= (coord >= low) & (coord < high)
    local = torch.zeros(int(inside.sum()), dtype=torch.int64)
    for coord, (low, high) in zip(coords, bounds, strict=True):
        local = local * (high - low) + (coord[inside] - low)
    return local


@dataclass(frozen=True)
class Piece:
    """What this process holds of one tensor of a state: a flat range of the global tensor.

    ``local`` is that range's data (flat, sharing memory with the tensor), elements
    ``[start, stop)`` of the global tensor in row-major order. ``writes`` says whether this
    process is the one that saves it: replicas of the same range are saved once.
    """

    local: torch.Tensor
    start: int
    stop: int
    writes: bool


def piece_of(name: str, tensor: torch.Tensor, *, rank: int) -> Piece:
    """This process's piece of ``tensor`` (``rank``: its global rank, 0 without torch.distributed).

    A plain tensor is held whole by every process and saved by rank 0. A DTensor placed
    Shard(0) (FSDP2) holds rows ``[low, high)``, a contiguous flat range; on a mesh dimension
    where it is replicated, the process at coordinate 0 saves it.

    Raises:
        NotImplementedError: A placement other than Shard(0) and Replicate(), or a local shard
            that is not contiguous (it could not be written in place).
    """
    if not is_dtensor(tensor):
        data = tensor.detach()
        return Piece(data.reshape(-1) if data.is_contiguous() else data, 0, data.numel(), rank == 0)
    with torch.no_grad():
        local = tensor.to_local()  # type: ignore[attr-defined]  # a DTensor: its own local tensor, no copy
    bounds = shard_bounds(name, tensor, tuple(local.shape), gradient=False)
    if bounds is None:  # not in the tensor's mesh: holds none of it
        return Piece(local.reshape(-1)[:0], 0, 0, False)
    shape = tuple(tensor.shape)
    row = math.prod(shape[1:]) if shape else 1
    start, stop = (bounds[0][0] * row, bounds[0][1] * row) if shape else (0, 1)
    if not local.is_contiguous():
        raise NotImplementedError(
            f"tensor {name!r}: this rank's shard is not contiguous in memory, so it cannot be saved or loaded in place"
        )
    from torch.distributed.tensor import Replicate

    dtensor: Any = tensor
    coordinate = dtensor.device_mesh.get_coordinate()
    writes = all(
        coordinate[dim] == 0 for dim, placement in enumerate(dtensor.placements) if type(placement) is Replicate
    )
    return Piece(local.reshape(-1), start, stop, writes)


def process_group() -> tuple[int, int] | None:
    """(rank, world size) when torch.distributed is initialized with more than one process; never imports it."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    world = dist.get_world_size()
    return (dist.get_rank(), world) if world > 1 else None
