"""Training under a fixed mask: SparseAdamW (state for the k masked values only) and gradient masking hooks."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import InvalidArgumentError, MaskLeakWarning, MaskMismatchError
from ..mask import Mask
from ..sharding import is_dtensor, local_view
from .params import NamedParams, trainable_named_params

__all__ = ["GradientMask", "SparseAdamW", "mask_gradients"]

_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class SparseAdamW(torch.optim.Optimizer):
    """AdamW that updates only the masked entries and keeps state for those entries alone.

    Each step gathers the gradient at the mask's indices, applies the AdamW update (the same
    arithmetic as ``torch.optim.AdamW(foreach=False)``) to those k_p values and scatters them
    back with ``index_copy_``. Every entry outside the mask stays bit-identical to its value at
    construction, whatever the gradients or weight decay: decoupled weight decay shrinks the
    trainable values only, since decaying a frozen weight would move it off the base.

    State per parameter with mask entries: ``step`` (an int) and 1-d ``exp_avg`` /
    ``exp_avg_sq`` (and ``max_exp_avg_sq`` with amsgrad) of length k_p, in the parameter's
    dtype, so optimizer memory is O(k) instead of 2x the model. Parameters without entries get
    no state. ``state_dict()`` holds only tensors, ints, floats, bools, strings and lists, so
    it can be stored as safetensors + JSON without pickle; its param group records the mask's
    digest and the parameter names, which ``load_state_dict`` checks.

    LR schedulers and ``zero_grad`` work as with any torch optimizer. Clip with
    :func:`clip_masked_grad_norm_`: ``torch.nn.utils.clip_grad_norm_(model.parameters(), ...)``
    would measure the frozen entries' gradients too and shrink the trainable ones far more.

    Sharded training (FSDP2's ``fully_shard``, or DTensor parameters made by hand) works too:
    a DTensor parameter placed ``Shard(0)`` or ``Replicate()`` on each mesh dimension is
    stepped on its local shard, and each rank keeps state only for the mask's entries in
    that shard. The mask stays the global one, indexed as in the full tensor. Other
    placements raise NotImplementedError. Plain tensors never touch torch.distributed.

    Args:
        model_or_named_params: A module (its ``named_parameters()`` with ``requires_grad``) or
            an iterable of ``(name, parameter)`` pairs. The mask is matched by name.
        mask: The trainable entries. Parameters it does not name have no trainable entries.
        lr: Learning rate.
        betas: Coefficients of the running averages of the gradient and its square.
        eps: Added to the denominator for numerical stability.
        weight_decay: Decoupled weight decay, applied to the masked values only.
        amsgrad: Use the AMSGrad variant.
        maximize: Maximize the objective instead of minimizing it.

    Raises:
        MaskMismatchError: The mask names a tensor that is not a trainable parameter, or its
            shape differs from the parameter's.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> mask = Mask.from_indices({"weight": [0, 5]}, {"weight": (2, 4), "bias": (2,)})
        >>> optimizer = SparseAdamW(model, mask, lr=1e-2)
        >>> model(torch.randn(3, 4)).sum().backward()
        >>> optimizer.step()
        >>> optimizer.state_bytes()  # two fp32 moments of 2 values
        16
    """

    def __init__(
        self,
        model_or_named_params: NamedParams,
        mask: Mask,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        amsgrad: bool = False,
        maximize: bool = False,
    ) -> None:
        if not lr >= 0.0:
            raise InvalidArgumentError(f"lr must be >= 0, not {lr!r}")
        if not eps >= 0.0:
            raise InvalidArgumentError(f"eps must be >= 0, not {eps!r}")
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise InvalidArgumentError(f"betas must be two numbers in [0, 1), not {betas!r}")
        if not weight_decay >= 0.0:
            raise InvalidArgumentError(f"weight_decay must be >= 0, not {weight_decay!r}")
        named = trainable_named_params(model_or_named_params)
        mask.check_fits(named)
        self._mask_digest = mask.digest
        # Indices live on each parameter's device so a step moves no index data. A DTensor's
        # indices are those of the mask's entries in this rank's shard, relative to the shard.
        self._indices: dict[str, torch.Tensor] = {}
        for name, param in named.items():
            if name not in mask or not mask[name].numel():
                continue
            local, index = local_view(name, param, mask[name])
            # An empty local index stays: step() must still take part in the parameter's collectives.
            self._indices[name] = index.to(local.device)
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": (float(betas[0]), float(betas[1])),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
        }
        self._constructing = True
        # Every trainable parameter joins the group, so zero_grad() clears them all; only
        # those with mask entries are ever stepped.
        super().__init__(
            [{"params": list(named.values()), "param_names": list(named), "mask_digest": mask.digest}], defaults
        )
        self._constructing = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_constructing", False):
            raise NotImplementedError(
                "SparseAdamW takes all its parameters at construction, matched to the mask by name; "
                "build a new SparseAdamW with the full model and a mask covering the new parameters"
            )
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Performs one update of the masked entries.

        Args:
            closure: Re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
            for name, param in zip(group["param_names"], group["params"], strict=True):
                index = self._indices.get(name)
                if index is None or param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise InvalidArgumentError(
                        f"parameter {name!r} has a sparse gradient, which SparseAdamW does not take"
                    )
                if param.is_complex():
                    raise NotImplementedError(f"SparseAdamW does not support complex parameters yet ({name!r})")
                # A DTensor gradient may be redistributed here, a collective: every rank gets this far.
                data, local_grad = _local_param_and_grad(name, param, param.grad)
                if not index.numel():
                    continue  # this rank's shard holds none of the parameter's mask entries
                grad = local_grad.reshape(-1).index_select(0, index)
                if group["maximize"]:
                    grad = grad.neg()
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(grad)
                values = _gather(data, index)
                state["step"] += 1
                _adamw_update(
                    values,
                    grad,
                    state,
                    lr=lr,
                    beta1=beta1,
                    beta2=beta2,
                    eps=eps,
                    weight_decay=weight_decay,
                    amsgrad=bool(group["amsgrad"]),
                )
                _scatter(data, index, values)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state: tensors, ints, floats, bools, strings and lists only (no pickle needed).

        Moments are 1-d tensors of length k_p, ``step`` is an int. Tuples (``betas``) become lists
        so that a JSON round trip gives back an equal dict.
        """
        state = super().state_dict()
        for group in state["param_groups"]:
            for key, value in list(group.items()):
                if isinstance(value, tuple):
                    group[key] = list(value)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state saved by :meth:`state_dict`, checking it was made with this mask and these parameters.

        Moments are copied, so later steps never write into the caller's tensors; a ``step``
        stored as a 0-d tensor is accepted and turned back into an int.

        Raises:
            MaskMismatchError: The state was saved with another mask or other parameters, or a
                moment's length differs from the parameter's number of mask entries.
        """
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise MaskMismatchError("optimizer state has a different number of parameter groups than this SparseAdamW")
        for saved, own in zip(groups, self.param_groups, strict=True):
            if saved.get("mask_digest") != self._mask_digest:
                raise MaskMismatchError(
                    "optimizer state was saved with a different mask "
                    f"(digest {saved.get('mask_digest')!r}, this optimizer's is {self._mask_digest!r}); "
                    "build the SparseAdamW with the mask it was trained with"
                )
            if list(saved.get("param_names", ())) != list(own["param_names"]):
                raise MaskMismatchError(
                    "optimizer state was saved for other parameters (names or order differ); "
                    "build the SparseAdamW from the same model"
                )
        names = [name for group in self.param_groups for name in group["param_names"]]
        saved_ids = [pid for group in groups for pid in group["params"]]
        by_id = dict(zip(saved_ids, names, strict=True))
        state = {}
        for pid, entry in state_dict.get("state", {}).items():
            key = pid if pid in by_id else int(pid)  # JSON turns int keys into strings
            name = by_id.get(key)
            if name is None:
                raise MaskMismatchError(f"optimizer state has an entry for unknown parameter id {pid!r}")
            expected = self._indices[name].numel() if name in self._indices else 0
            entry = dict(entry)
            for moment in _MOMENT_KEYS:
                if moment not in entry:
                    continue
                value = entry[moment]
                if not isinstance(value, torch.Tensor) or tuple(value.shape) != (expected,):
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise MaskMismatchError(
                        f"optimizer state {moment!r} of {name!r} has shape {shape}, but the mask has "
                        f"{expected} entries there; the state belongs to another mask"
                    )
                entry[moment] = value.clone()
            if isinstance(entry.get("step"), torch.Tensor):
                entry["step"] = int(entry["step"].item())
            state[key] = entry
        super().load_state_dict({**state_dict, "state": state})

    def state_bytes(self) -> int:
        """Bytes held by the optimizer's state tensors (the moments)."""
        return sum(
            value.numel() * value.element_size()
            for entry in self.state.values()
            for value in entry.values()
            if isinstance(value, torch.Tensor)
        )


def _adamw_update(
    values: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
) -> None:
    """The single-tensor AdamW step of torch.optim, on the gathered values, in place."""
    step = state["step"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    if weight_decay != 0.0:
        values.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    second = exp_avg_sq
    if amsgrad:
        torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
        second = state["max_exp_avg_sq"]
    denom = (second.sqrt() / bias_correction2_sqrt).add_(eps)
    values.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))


def _gather(param: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return param.detach().reshape(-1).index_select(0, index)


def _scatter(param: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    data = param.detach()
    if data.is_contiguous():
        data.view(-1).index_copy_(0, index, values)
    else:
        # reshape(-1) of a non-contiguous tensor is a copy, so write through coordinates instead.
        data.index_put_(torch.unravel_index(index, data.shape), values)


# Gradient masking -----------------------------------------------------------------------------------


class GradientMask:
    """Handle of the hooks :func:`mask_gradients` installed; ``remove()`` them, or use it as a context manager."""

    def __init__(self, handles: list[RemovableHandle]) -> None:
        self._handles = handles

    def remove(self) -> None:
        """Removes every hook; gradients flow unmasked again. Calling it twice is harmless."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> GradientMask:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.remove()


def mask_gradients(model: nn.Module, mask: Mask, *, optimizer: torch.optim.Optimizer | None = None) -> GradientMask:
    """Zeroes every gradient entry outside the mask as it is computed, for use with any optimizer.

    A hook on each trainable parameter keeps the gradient at the mask's indices and writes
    zeros elsewhere (zeros, not a multiply, so an inf or NaN outside the mask does not leak in).
    Parameters the mask does not name get all-zero gradients.

    DTensor parameters (FSDP2's ``fully_shard``) placed ``Shard(0)`` or ``Replicate()`` are
    masked on each rank's local shard once their gradient is final: FSDP2 sets the sharded
    gradient after its reduce-scatter, outside autograd, so a post-accumulate-grad hook does
    the masking there. Masking after the reduction gives the same gradient as before it,
    since the reduction is linear. The gradient may come in another placement than its
    parameter (DTensor picks it: Shard on any dim, Partial); it is masked where it lies, and
    no rank communicates. Other parameter placements raise NotImplementedError.

    Zero gradients alone do not freeze weights: weight decay, and momentum left from earlier
    steps, still move them. Pass the ``optimizer`` to get a :class:`MaskLeakWarning` when it
    would; the fix is :class:`SparseAdamW`, or ``weight_decay=0`` and fresh optimizer state.

    Args:
        model: The model whose trainable parameters are masked.
        mask: The trainable entries, matched to parameters by name.
        optimizer: If given, checked for weight decay or momentum outside the mask.

    Returns:
        A handle whose ``remove()`` takes the hooks off; also a context manager.

    Raises:
        MaskMismatchError: The mask names a tensor that is not a trainable parameter, or its
            shape differs.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> mask = Mask.from_indices({"weight": [1]}, {"weight": (1, 2), "bias": (1,)})
        >>> with mask_gradients(model, mask):
        ...     model(torch.ones(1, 2)).sum().backward()
        >>> model.weight.grad.tolist(), model.bias.grad.tolist()
        ([[0.0, 1.0]], [0.0])
    """
    named = trainable_named_params(model)
    mask.check_fits(named)
    if optimizer is not None:
        _warn_if_optimizer_leaks(optimizer, mask, named)
    handles = []
    for name, param in named.items():
        if name in mask and mask[name].numel() == param.numel():
            continue  # fully trainable: nothing to zero
        index = mask[name] if name in mask else torch.zeros(0, dtype=torch.int64)
        if is_dtensor(param):
            local_view(name, param, index)  # a parameter placement it refuses fails here, not mid-backward
            dtensor_hook = _dtensor_masking_hook(name, index)
            handles.append(param.register_post_accumulate_grad_hook(dtensor_hook))  # type: ignore[no-untyped-call]
            continue
        hook = _masking_hook(index.to(param.device))
        handles.append(param.register_hook(hook))  # type: ignore[no-untyped-call]  # untyped in torch
    return GradientMask(handles)


def _masking_hook(index: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        flat = grad.reshape(-1)
        masked = torch.zeros_like(flat)
        masked.index_copy_(0, index, flat.index_select(0, index))
        return masked.view(grad.shape)

    return hook


def _dtensor_masking_hook(name: str, index: torch.Tensor) -> Callable[[torch.Tensor], None]:
    # The local index depends on the gradient's placements (fixed in practice): derived once per layout.
    local_indices: dict[object, torch.Tensor] = {}

    def hook(param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        layout = tuple(grad.placements) if is_dtensor(grad) else None  # type: ignore[attr-defined]
        with torch.no_grad():
            known = local_indices.get(layout)
            local, local_index = local_view(name, grad, index if known is None else None, gradient=True)
            if known is None:
                known = local_indices[layout] = local_index.to(local.device)
            kept = local.reshape(-1).index_select(0, known)
            local.zero_()
            _scatter(local, known, kept)

    return hook


def _warn_if_optimizer_leaks(optimizer: torch.optim.Optimizer, mask: Mask, named: dict[str, torch.Tensor]) -> None:
    if isinstance(optimizer, SparseAdamW):
        return
    name_of = {id(param): name for name, param in named.items()}
    decayed: list[str] = []
    with_momentum: list[str] = []
    for group in optimizer.param_groups:
        decay = group.get("weight_decay", 0.0)
        for param in group["params"]:
            name = name_of.get(id(param))
            if name is None:
                continue
            index = mask[name] if name in mask else torch.zeros(0, dtype=torch.int64)
            if index.numel() == param.numel():
                continue  # fully trainable: nothing outside the mask to move
            if decay:
                decayed.append(name)
            for value in optimizer.state.get(param, {}).values():
                if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                    continue
                # A DTensor moment is checked on this rank's shard only: no rank gathers the full state.
                local, local_index = local_view(name, value, index, gradient=True)
                outside = torch.ones(local.numel(), dtype=torch.bool, device=local.device)
                outside[local_index.to(local.device)] = False
                if bool(local.reshape(-1)[outside].any()):
                    with_momentum.append(name)
                    break
    problems = []
    if decayed:
        problems.append(
            f"weight_decay > 0 on {len(decayed)} parameter(s) with entries outside the mask ({_some(decayed)})"
        )
    if with_momentum:
        problems.append(
            f"nonzero momentum state outside the mask in {len(with_momentum)} parameter(s) ({_some(with_momentum)})"
        )
    if problems:
        warnings.warn(
            f"{type(optimizer).__name__} will move weights outside the mask even though their gradients are "
            f"zero: {'; '.join(problems)}. Use fishckpt.SparseAdamW, or set weight_decay=0 and start from fresh "
            "optimizer state.",
            MaskLeakWarning,
            stacklevel=3,
        )


def _some(names: list[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:3])
    return shown + (", ..." if len(names) > 3 else "")


# DTensor parameters (sharded training) --------------------------------------------------------------


def _local_param_and_grad(name: str, param: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The parameter and gradient data a step works on: this rank's shards for a DTensor parameter."""
    if not is_dtensor(param):
        return param.detach(), grad
    if not is_dtensor(grad):
        raise InvalidArgumentError(
            f"parameter {name!r} is a DTensor but its gradient is a plain {type(grad).__name__}; "
            "set gradients through DTensor operations (or FSDP2) so they carry placements"
        )
    dparam: Any = param
    dgrad: Any = grad
    if tuple(dgrad.placements) != tuple(dparam.placements):
        # A gradient placed otherwise (Partial after a replicated forward) is brought to the
        # parameter's layout by DTensor itself: a collective, run in step order on every rank.
        dgrad = dgrad.redistribute(dparam.device_mesh, dparam.placements)
    local_param: torch.Tensor = dparam.to_local()
    local_grad: torch.Tensor = dgrad.to_local()
    return local_param, local_grad
