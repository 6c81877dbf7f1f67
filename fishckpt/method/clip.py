"""Gradient clipping under a mask: the norm of the trainable entries' gradients only, as the reference code clips."""

from __future__ import annotations

import math

import torch

from ..errors import InvalidArgumentError
from ..mask import Mask
from .params import NamedParams, trainable_named_params

__all__ = ["clip_masked_grad_norm_"]


@torch.no_grad()
def clip_masked_grad_norm_(
    model_or_named_params: NamedParams,
    mask: Mask,
    max_norm: float,
    *,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """Clips gradients by the norm of their masked entries, as ``clip_grad_norm_`` after masking does.

    The FISH reference code multiplies gradients by the mask after ``backward()`` and *then*
    calls ``clip_grad_norm_(model.parameters(), 1.0)``, so the norm it clips to covers the k
    trainable entries only. ``torch.nn.utils.clip_grad_norm_`` on unmasked gradients instead
    measures every entry, frozen ones included: the norm is far larger, and the trainable
    entries are scaled down far more than the reference scales them.

    This computes the total ``norm_type`` norm over the gradient entries at the mask's indices
    and multiplies the gradients of the parameters with mask entries by
    ``min(1, max_norm / (norm + 1e-6))``, torch's rule. Parameters without mask entries, and
    without gradients, are left alone. Entries outside the mask of a scaled parameter are
    scaled too (an optimizer under the mask never reads them; after :func:`mask_gradients`
    they are zero), which spares a scatter.

    Args:
        model_or_named_params: A module (its parameters with ``requires_grad``) or an iterable
            of ``(name, parameter)`` pairs; the mask is matched by name.
        mask: The trainable entries.
        max_norm: The largest norm the masked gradients may have.
        norm_type: The p of the p-norm; ``math.inf`` for the largest absolute value.
        error_if_nonfinite: Raise if the norm is NaN or infinite (else the gradients are scaled by it).

    Returns:
        The total norm of the masked gradient entries before clipping (a 0-d tensor).

    Raises:
        MaskMismatchError: The mask names a tensor that is not a trainable parameter, or its shape differs.
        InvalidArgumentError: ``max_norm`` is negative or NaN, or the norm is not finite while
            ``error_if_nonfinite`` is set.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> mask = Mask.from_indices({"weight": [1]}, {"weight": (1, 2), "bias": (1,)})
        >>> model(torch.tensor([[3.0, 4.0]])).sum().backward()   # grads: weight [3, 4], bias [1]
        >>> float(clip_masked_grad_norm_(model, mask, 1.0))      # the norm of the one masked entry
        4.0
        >>> model.weight.grad.tolist()                           # scaled by 1 / 4
        [[0.75, 1.0]]
    """
    if not float(max_norm) >= 0.0:
        raise InvalidArgumentError(f"max_norm must be >= 0, not {max_norm!r}")
    named = trainable_named_params(model_or_named_params)
    mask.check_fits(named)
    grads, masked_entries = [], []
    for name, param in named.items():
        grad = param.grad
        if grad is None or name not in mask or mask[name].numel() == 0:
            continue
        if grad.is_sparse:
            raise InvalidArgumentError(
                f"parameter {name!r} has a sparse gradient; clip_masked_grad_norm_ needs dense ones"
            )
        index = mask[name]
        whole = index.numel() == grad.numel()  # a fully trainable tensor needs no gather
        masked_entries.append(grad if whole else grad.reshape(-1).index_select(0, index.to(grad.device)))
        grads.append(grad)
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device
    norms = [torch.linalg.vector_norm(entries, norm_type).to(device) for entries in masked_entries]
    total: torch.Tensor = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    if error_if_nonfinite and not math.isfinite(float(total)):
        raise InvalidArgumentError(
            f"the norm of order {norm_type} of the masked gradients is {float(total)}, so it cannot be "
            "clipped; check the loss for NaN or inf, or pass error_if_nonfinite=False"
        )
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(scale.to(grad.device))
    return total
