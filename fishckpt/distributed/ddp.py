"""Masked gradient all-reduce for DDP: a communication hook that sends only the k masked values."""

# No `from __future__ import annotations` here: DDP's register_comm_hook compares the hook's
# annotations with GradBucket and Future[Tensor] as objects, and would reject strings.

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist
from torch import nn

# The class torch.distributed exports as GradBucket (the same object, which DDP compares the hook's
# annotation with); imported from where it is defined because torch.distributed does not declare
# the re-export for type checkers.
from torch._C._distributed_c10d import GradBucket

from ..errors import InvalidArgumentError, MaskMismatchError
from ..mask import Mask

__all__ = ["MaskedAllReduceState", "masked_allreduce_hook", "register_masked_comm_hook"]

_COMPRESSED_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class _BucketPlan:
    """Where the mask's entries sit in one DDP gradient bucket, derived once per bucket layout."""

    parameters: tuple[torch.Tensor, ...]  # the bucket's parameters, in order: the layout's identity
    numel: int
    index: torch.Tensor | None  # positions in the bucket's flat buffer; None when the bucket has no entries
    whole: bool  # the mask covers the whole bucket: send the buffer itself, no packing


class MaskedAllReduceState:
    """The state of :func:`masked_allreduce_hook`: the mask by parameter, and each bucket's cached plan.

    DDP groups gradients into flat buckets and calls the hook once per bucket. The first time
    it sees a bucket layout, the state maps the bucket's offsets to the mask's indices: one
    int64 tensor of positions in the flat buffer. Each later call only checks that the bucket
    holds the same parameters (an identity comparison in C) and uses the cached positions:
    one gather, one all-reduce and one scatter per bucket, with no loop over parameters.
    DDP rebuilds its buckets once, after the first iteration, in backward order; the new
    layout gets its own plan then.

    Args:
        module: The model DDP wraps (``ddp_model.module``), whose parameter names the mask uses.
        mask: The trainable entries, shared by every rank. Parameters it does not name get zero
            gradients and send nothing.
        dtype: ``torch.float16`` or ``torch.bfloat16`` to send the k values in that dtype (half
            the bytes of fp32); None (the default) sends them in the gradient's own dtype, exactly.
        process_group: The group to average over; None means the default (world) group.

    Raises:
        MaskMismatchError: The mask names a tensor that is not a trainable parameter of the
            module, or its shape differs from the parameter's.
        InvalidArgumentError: ``dtype`` is not float16, bfloat16 or None.

    Example:
        >>> state = MaskedAllReduceState(model, mask)  # doctest: +SKIP
        >>> ddp_model.register_comm_hook(state, masked_allreduce_hook)  # doctest: +SKIP
    """

    def __init__(
        self,
        module: nn.Module,
        mask: Mask,
        *,
        dtype: torch.dtype | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if dtype is not None and dtype not in _COMPRESSED_DTYPES:
            raise InvalidArgumentError(
                f"dtype must be torch.float16, torch.bfloat16 or None (no compression), not {dtype!r}"
            )
        trainable = {name: param for name, param in module.named_parameters() if param.requires_grad}
        mask.check_fits(
            trainable,
            owner="the DDP module",
            fix="build the mask from the wrapped model's parameters (ddp_model.module)",
        )
        self.mask = mask
        self.dtype = dtype
        self.process_group = process_group
        self._names: Mapping[int, str] = {id(param): name for name, param in trainable.items()}
        # Holding the parameters keeps their ids from being reused while the names are keyed by id.
        self._parameters = tuple(trainable.values())
        self._plans: dict[int, _BucketPlan] = {}

    @property
    def k(self) -> int:
        """The number of masked values all-reduced per step, over all buckets."""
        return self.mask.k

    def _plan(self, bucket: GradBucket) -> _BucketPlan:
        """The bucket's cached plan, derived on first sight of its layout."""
        parameters = bucket.parameters()
        buffer = bucket.buffer()
        plan = self._plans.get(bucket.index())
        if (
            plan is not None
            and plan.numel == buffer.numel()
            and len(plan.parameters) == len(parameters)
            and all(map(operator.is_, plan.parameters, parameters))
        ):
            return plan
        plan = self._derive(bucket, parameters, buffer)
        self._plans[bucket.index()] = plan
        return plan

    def _derive(self, bucket: GradBucket, parameters: list[torch.Tensor], buffer: torch.Tensor) -> _BucketPlan:
        if buffer.is_sparse or buffer.dim() != 1:
            raise NotImplementedError(
                "the masked all-reduce hook takes dense gradient buckets only; "
                "build DDP without sparse gradients (e.g. nn.Embedding(sparse=False))"
            )
        pieces: list[torch.Tensor] = []
        # GradBucket.gradients() are views of the flat buffer at each parameter's offset.
        for param, view in zip(parameters, bucket.gradients(), strict=True):
            name = self._names.get(id(param))
            if name is None:
                raise MaskMismatchError(
                    "a DDP bucket holds a parameter that is not in the module this hook state was built "
                    "from; build MaskedAllReduceState from ddp_model.module"
                )
            if view.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr():
                raise NotImplementedError(f"DDP's gradient view of {name!r} is not in its bucket's buffer")
            if name in self.mask and self.mask[name].numel():
                offset = int(view.storage_offset()) - int(buffer.storage_offset())
                pieces.append(self.mask[name] + offset)
        index = torch.cat(pieces).to(buffer.device) if pieces else None
        whole = index is not None and index.numel() == buffer.numel()
        return _BucketPlan(tuple(parameters), buffer.numel(), index, whole)


def masked_allreduce_hook(state: MaskedAllReduceState, bucket: GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A DDP communication hook that averages only the mask's entries of each gradient bucket.

    The masked entries are gathered into one contiguous buffer (in ``state.dtype`` if set),
    divided by the world size and all-reduced with ``torch.distributed.all_reduce``; the bucket
    then gets the averages at those entries and zeros everywhere else. Entries outside the mask
    are never sent, and a bucket without masked entries sends nothing at all. Every rank gets
    the same bits, so replicas stay bitwise identical. Without compression each masked entry
    gets exactly the value DDP's default hook would give it.

    Use :func:`register_masked_comm_hook` for the usual set-up.

    Args:
        state: The mask and the cached bucket plans, one per DDP model.
        bucket: The gradient bucket DDP passes.

    Returns:
        A future holding the bucket's new gradients, as DDP expects.

    Example:
        >>> state = MaskedAllReduceState(model, mask)  # doctest: +SKIP
        >>> ddp_model.register_comm_hook(state, masked_allreduce_hook)  # doctest: +SKIP
    """
    buffer = bucket.buffer()
    plan = state._plan(bucket)
    if plan.index is None:
        buffer.zero_()
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(buffer)
        return done
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    index = plan.index
    packed = buffer if plan.whole else buffer.index_select(0, index)
    if state.dtype is not None:
        packed = packed.to(state.dtype)
    # Divide before the sum, as DDP's own hooks do, so fp16 sums do not overflow.
    packed.div_(dist.get_world_size(group))
    # dist.all_reduce looked up at call time: the one transport is torch.distributed's.
    work = dist.all_reduce(packed, group=group, async_op=True)
    if work is None:  # async_op=True returns a Work on every backend; None would mean the rank is not in the group
        raise InvalidArgumentError("this rank is not in the hook's process group; pass the DDP model's group")

    def unpack(future: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        reduced: torch.Tensor = future.value()[0]
        if plan.whole:
            if reduced.data_ptr() != buffer.data_ptr():  # compressed, or a backend that returned a copy
                buffer.copy_(reduced)
            return buffer
        buffer.zero_()
        buffer.index_copy_(0, index, reduced.to(buffer.dtype))
        return buffer

    return cast("torch.futures.Future[torch.Tensor]", work.get_future().then(unpack))


def register_masked_comm_hook(
    ddp_model: nn.parallel.DistributedDataParallel,
    mask: Mask,
    *,
    dtype: torch.dtype | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> MaskedAllReduceState:
    """Makes a DDP model all-reduce only the masked gradient entries: k values per step instead of N.

    Register it once, before the first backward, on every rank, with the same mask. After each
    synchronised backward, every gradient holds the average over ranks at the mask's entries
    and zero elsewhere. Works with any ``bucket_cap_mb``, ``find_unused_parameters=True``,
    ``no_sync()`` accumulation and ``gradient_as_bucket_view``. Pair it with
    :class:`fishckpt.SparseAdamW`, which reads only the masked entries.

    Args:
        ddp_model: The DistributedDataParallel model; the mask names ``ddp_model.module``'s parameters.
        mask: The trainable entries, identical on every rank.
        dtype: ``torch.float16`` or ``torch.bfloat16`` to send the k values compressed (half the
            bytes, no longer exact: see docs/distributed.md); None, the default, sends them exactly.
        process_group: The group to average over; None means the DDP model's own group.

    Returns:
        The hook's state (``state.k`` is the number of values sent per step).

    Raises:
        MaskMismatchError: The mask does not fit the module's trainable parameters.
        InvalidArgumentError: ``dtype`` is not float16, bfloat16 or None.

    Example:
        >>> ddp_model = DistributedDataParallel(model)  # doctest: +SKIP
        >>> register_masked_comm_hook(ddp_model, mask)  # doctest: +SKIP
        >>> optimizer = fishckpt.SparseAdamW(model, mask, lr=1e-4)  # doctest: +SKIP
    """
    group = process_group if process_group is not None else ddp_model.process_group
    state = MaskedAllReduceState(ddp_model.module, mask, dtype=dtype, process_group=group)
    ddp_model.register_comm_hook(state, masked_allreduce_hook)
    return state
