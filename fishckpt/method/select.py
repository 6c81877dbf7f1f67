"""Choosing masks: the global top-k of FISH scores, and the random, BitFit and diff baselines."""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import HeadNotTrainableWarning, InvalidArgumentError, StateMismatchError
from ..format.bits import word_view
from ..mask import Mask

__all__ = ["bitfit_mask", "diff_mask", "fish_mask", "random_mask"]

ModelOrState = nn.Module | Mapping[str, torch.Tensor]

# Above this many candidates the k-th largest value is bracketed with a random sample first, so
# that only about k values need to be kept; below it a direct kthvalue over everything is as fast.
_DIRECT_LIMIT = 1 << 22
_SAMPLE_SIZE = 1 << 20
# Top-level module names that, in torchvision, timm and Hugging Face models, hold the task head:
# a freshly initialised layer that must be trained whole. Only the first component of a name is
# looked at, so "mlp.fc1" or "c_fc" deep inside a block never matches.
_HEAD_MODULES = ("classifier", "fc", "lm_head", "score")
# How many binomial standard deviations below the threshold the sampled bound sits. At 6 it
# lands above the true threshold with probability ~1e-9; a miss only costs a second pass.
_BRACKET_SIGMAS = 6.0


def fish_mask(
    scores: Mapping[str, torch.Tensor],
    *,
    keep_ratio: float | None = None,
    k: int | None = None,
    always_trainable: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> Mask:
    """The FISH mask: the k entries with the largest scores, over all tensors at once.

    There is no per-layer quota. Tensors whose names match a pattern in ``always_trainable``
    are included whole and count toward k (the other ``k - their size`` entries are chosen by
    score, as in the reference code); tensors matching ``exclude`` get no entries. Patterns are
    case-sensitive ``fnmatch`` globs, e.g. ``"classifier.*"``.

    The head. A new task head starts random, so its Fisher scores say little about what it
    needs; the reference code trains it whole and takes its size out of k. Name it in
    ``always_trainable``. If a tensor under a top-level ``classifier``, ``fc``, ``lm_head`` or
    ``score`` module is in neither list, a :class:`HeadNotTrainableWarning` says so (put a head
    that should stay frozen in ``exclude`` to silence it).

    Ties are broken deterministically: among entries whose score equals the k-th largest, those
    in earlier tensors (in ``scores`` order), then at lower flat indices, are taken first. The
    result is the same set a full sort by (score descending, tensor order, flat index) gives,
    but found with a sampled threshold and one pass instead of a sort (under 1 s for 2^28
    scores on 2 CPU cores, against about 10 s for ``torch.topk``).

    Args:
        scores: Per-tensor floating-point scores, e.g. from :func:`fisher_scores`.
        keep_ratio: Fraction of *all* entries in ``scores`` to keep; k = round(keep_ratio x total).
        k: The number of entries to keep. Give exactly one of ``keep_ratio`` and ``k``.
        always_trainable: Name patterns of tensors kept whole (e.g. a new classification head).
        exclude: Name patterns of tensors never selected.

    Returns:
        A :class:`Mask` covering every tensor in ``scores`` with exactly k entries.

    Raises:
        InvalidArgumentError: Both or neither of keep_ratio and k; k below the size of the
            always-trainable tensors or above what can be selected; a pattern matching no tensor
            or a tensor matched by both lists; NaN or non-floating scores.

    Warns:
        HeadNotTrainableWarning: A tensor of an obvious head is in neither ``always_trainable``
            nor ``exclude``.

    Example:
        >>> scores = {"w": torch.tensor([[0.1, 0.9], [0.5, 0.5]]), "head": torch.zeros(2)}
        >>> mask = fish_mask(scores, k=4, always_trainable=["head"])
        >>> mask["w"].tolist(), mask["head"].tolist()
        ([1, 2], [0, 1])
    """
    names = list(scores)
    for name in names:
        tensor = scores[name]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise InvalidArgumentError(f"scores for {name!r} must be a floating-point tensor")
        # max() propagates NaN and is the cheapest full pass (isnan().any() is ~5x slower).
        if tensor.numel() and bool(torch.isnan(tensor.max())):
            raise InvalidArgumentError(f"scores for {name!r} contain NaN; check the data and loss that produced them")
    shapes = {name: tuple(scores[name].shape) for name in names}
    always_trainable, exclude = _patterns(always_trainable), _patterns(exclude)  # read twice below
    mask = _top_k_mask(scores, shapes, keep_ratio=keep_ratio, k=k, always_trainable=always_trainable, exclude=exclude)
    _warn_if_head_left_out("fish_mask", names, always_trainable, exclude)
    return mask


def random_mask(
    model_or_state: ModelOrState,
    keep_ratio: float,
    *,
    seed: int,
    always_trainable: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> Mask:
    """A uniformly random mask with the same budget rules as :func:`fish_mask` (the paper's baseline).

    The head rule and its :class:`HeadNotTrainableWarning` are those of :func:`fish_mask`.

    Every selectable entry gets an independent float64 key from a ``torch.Generator`` seeded
    with ``seed`` (drawn tensor by tensor, in order) and the largest keys win, so the same seed
    and tensors always give the same mask.

    Args:
        model_or_state: A module (its trainable parameters) or a state dict (its floating tensors).
        keep_ratio: Fraction of all entries to keep, always-trainable tensors included.
        seed: Seed of the generator.
        always_trainable: Name patterns of tensors kept whole; they count toward the budget.
        exclude: Name patterns of tensors never selected.

    Returns:
        A :class:`Mask` covering every tensor.

    Example:
        >>> mask = random_mask(torch.nn.Linear(10, 10), 0.1, seed=0)
        >>> mask.k
        11
    """
    tensors = _named_tensors(model_or_state)
    generator = torch.Generator().manual_seed(seed)
    keys = {
        name: torch.rand(tensor.shape, generator=generator, dtype=torch.float64) for name, tensor in tensors.items()
    }
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    always_trainable, exclude = _patterns(always_trainable), _patterns(exclude)  # read twice below
    mask = _top_k_mask(keys, shapes, keep_ratio=keep_ratio, k=None, always_trainable=always_trainable, exclude=exclude)
    _warn_if_head_left_out("random_mask", list(tensors), always_trainable, exclude)
    return mask


def bitfit_mask(model_or_state: ModelOrState) -> Mask:
    """The BitFit baseline: every entry of tensors whose name ends in ``"bias"``, nothing else.

    Args:
        model_or_state: A module (its trainable parameters) or a state dict (its floating tensors).

    Returns:
        A :class:`Mask` covering every tensor.

    Example:
        >>> bitfit_mask(torch.nn.Linear(3, 2)).counts()
        {'weight': 0, 'bias': 2}
    """
    tensors = _named_tensors(model_or_state)
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    indices = {name: torch.arange(math.prod(shape)) for name, shape in shapes.items() if name.endswith("bias")}
    return Mask.from_indices(indices, shapes)


def diff_mask(
    base: ModelOrState,
    tuned: ModelOrState,
    *,
    keep_ratio: float | None = None,
    k: int | None = None,
) -> Mask:
    """The k entries that moved most between ``base`` and ``tuned`` (largest |tuned - base|).

    Differences are taken in float64, which is exact for fp16/bf16 and for fp32 values whose
    exponents differ by less than 29, and otherwise rounds monotonically, so no pair is ever
    ranked in the wrong order. An entry whose bit pattern did not change is never selected, so
    the mask has fewer than k entries when fewer than k entries changed. A change to or between
    NaNs ranks as infinitely large; a change between 0.0 and -0.0 ranks as 0. Ties follow the
    rule of :func:`fish_mask`.

    Args:
        base: The starting weights: a module (trainable parameters) or a state dict (floating tensors).
        tuned: The same tensors after training (more tensors are ignored).
        keep_ratio: Fraction of all entries; k = round(keep_ratio x total).
        k: Number of entries. Give exactly one of ``keep_ratio`` and ``k``.

    Returns:
        A :class:`Mask` covering every floating tensor of ``base``.

    Raises:
        StateMismatchError: ``tuned`` lacks a tensor of ``base`` or has it in another shape or dtype.

    Example:
        >>> base = {"w": torch.tensor([1.0, 2.0, 3.0])}
        >>> diff_mask(base, {"w": torch.tensor([1.0, 2.5, 2.0])}, k=1)["w"].tolist()
        [2]
    """
    base_tensors, tuned_tensors = _named_tensors(base), _tensor_table(tuned)
    scores: dict[str, torch.Tensor] = {}
    changed = 0
    for name, before in base_tensors.items():
        after = tuned_tensors.get(name)
        if after is None:
            raise StateMismatchError(f"tuned weights have no tensor {name!r}; pass the same model or state dict")
        if after.shape != before.shape or after.dtype != before.dtype:
            raise StateMismatchError(
                f"tensor {name!r} is {after.dtype} {tuple(after.shape)} in tuned but {before.dtype} "
                f"{tuple(before.shape)} in base"
            )
        before, after = before.detach().contiguous(), after.detach().to(before.device).contiguous()
        same_bits = (word_view(before) == word_view(after)).reshape(before.shape)
        delta = (after.double() - before.double()).abs().nan_to_num_(nan=math.inf)
        # -1 sits below every real |Δ| >= 0, so unchanged entries are only reachable past `changed`.
        scores[name] = delta.masked_fill_(same_bits, -1.0)
        changed += int(same_bits.numel() - same_bits.sum())
    shapes = {name: tuple(score.shape) for name, score in scores.items()}
    total = sum(math.prod(shape) for shape in shapes.values())
    wanted = _resolve_k(keep_ratio, k, total)
    return _top_k_mask(scores, shapes, keep_ratio=None, k=min(wanted, changed), always_trainable=(), exclude=())


# Selection ----------------------------------------------------------------------------------------


def _top_k_mask(
    scores: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    keep_ratio: float | None,
    k: int | None,
    always_trainable: Iterable[str],
    exclude: Iterable[str],
) -> Mask:
    names = list(shapes)
    always = _match(names, always_trainable, what="always_trainable")
    excluded = _match(names, exclude, what="exclude")
    both = sorted(always & excluded)
    if both:
        raise InvalidArgumentError(f"tensors {both} match both always_trainable and exclude; drop one pattern")
    numel = {name: math.prod(shapes[name]) for name in names}
    total = sum(numel.values())
    k = _resolve_k(keep_ratio, k, total)
    fixed = sum(numel[name] for name in names if name in always)
    candidates = [name for name in names if name not in always and name not in excluded]
    selectable = sum(numel[name] for name in candidates)
    if k < fixed:
        raise InvalidArgumentError(
            f"k={k} is smaller than the {fixed} entries of the always-trainable tensors; "
            f"raise k (or keep_ratio) to at least {fixed}"
        )
    if k > fixed + selectable:
        raise InvalidArgumentError(
            f"k={k} is more than the {fixed + selectable} entries that can be selected "
            f"({total} in all, {total - fixed - selectable} excluded)"
        )
    indices: dict[str, torch.Tensor] = {name: torch.arange(numel[name]) for name in names if name in always}
    chosen = _select_largest([scores[name].detach().reshape(-1) for name in candidates], k - fixed)
    indices.update(zip(candidates, chosen, strict=True))
    return Mask(
        {name: indices.get(name, torch.zeros(0, dtype=torch.int64)) for name in names},
        dict(shapes),
    )


def _warn_if_head_left_out(
    caller: str, names: Sequence[str], always_trainable: Iterable[str], exclude: Iterable[str]
) -> None:
    """Warns when a tensor of an obvious task head is neither always trainable nor excluded."""
    covered = _match(names, always_trainable, what="always_trainable") | _match(names, exclude, what="exclude")
    left_out = [name for name in names if name.split(".", 1)[0] in _HEAD_MODULES and name not in covered]
    if left_out:
        head = left_out[0].split(".", 1)[0]
        warnings.warn(
            f"{caller}: {', '.join(repr(name) for name in left_out[:4])}{', ...' if len(left_out) > 4 else ''} "
            f"look like the model's task head but always_trainable does not cover them, so they compete with "
            f"the body for k. A new head must be trained whole (the reference code keeps it trainable and "
            f"counts it toward k): pass always_trainable=['{head}.*'], or exclude=['{head}.*'] to keep it frozen.",
            HeadNotTrainableWarning,
            stacklevel=3,
        )


def _resolve_k(keep_ratio: float | None, k: int | None, total: int) -> int:
    if (keep_ratio is None) == (k is None):
        raise InvalidArgumentError("give exactly one of keep_ratio and k")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int):
            raise InvalidArgumentError(f"k must be an int, not {type(k).__name__}")
        if not 0 <= k <= total:
            raise InvalidArgumentError(f"k={k} is out of range: it must be between 0 and the {total} entries")
        return k
    assert keep_ratio is not None
    if not (isinstance(keep_ratio, (int, float)) and 0.0 <= keep_ratio <= 1.0):
        raise InvalidArgumentError(f"keep_ratio must be between 0 and 1, not {keep_ratio!r}")
    return round(keep_ratio * total)


def _patterns(patterns: Iterable[str]) -> list[str]:
    # A lone string would be read as a list of one-letter patterns; a generator could be read once only.
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _match(names: Sequence[str], patterns: Iterable[str], *, what: str) -> set[str]:
    patterns = _patterns(patterns)
    matched: set[str] = set()
    for pattern in patterns:
        hits = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise InvalidArgumentError(
                f"{what} pattern {pattern!r} matches no tensor; names look like {list(names[:3])}"
            )
        matched.update(hits)
    return matched


def _select_largest(flats: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Sorted flat indices, per tensor, of the k largest values of all ``flats`` together.

    Ties at the threshold go to earlier tensors, then lower indices. A random sample gives a
    value ``low`` just below the k-th largest; one pass over the data keeps the positions and
    values of everything >= ``low`` (about k of them), and the exact threshold and the final
    choice are then made on that small band alone. If the sample was unlucky (fewer than k
    values >= ``low``, probability ~1e-9) the pass is repeated with no lower bound, so the
    result is always exact.
    """
    if not flats:
        return []
    # One common dtype, so a threshold found in one tensor means the same in every other.
    dtype = flats[0].dtype
    for flat in flats[1:]:
        dtype = torch.promote_types(dtype, flat.dtype)
    flats = [flat.to(dtype) for flat in flats]
    total = sum(flat.numel() for flat in flats)
    if k == 0:
        return [torch.zeros(0, dtype=torch.int64) for _ in flats]
    if k == total:
        return [torch.arange(flat.numel()) for flat in flats]

    low = _sample_lower_bound(flats, k, total) if total > _DIRECT_LIMIT else None
    while True:
        positions, values = [], []
        for flat in flats:
            if low is None:
                positions.append(torch.arange(flat.numel(), device=flat.device))
                values.append(flat)
            else:
                at = torch.nonzero(flat >= low).reshape(-1)
                positions.append(at)
                values.append(flat[at])
        band = torch.cat(values)
        if band.numel() >= k:
            break
        low = None  # the sample put the bound above the threshold: take everything
    threshold = torch.kthvalue(band, band.numel() - k + 1).values
    ties_needed = k - int(torch.count_nonzero(band > threshold))
    chosen = []
    for at, value in zip(positions, values, strict=True):
        keep = value > threshold
        if ties_needed > 0:
            tied = torch.nonzero(value == threshold).reshape(-1)[:ties_needed]
            keep[tied] = True
            ties_needed -= tied.numel()
        chosen.append(at[keep].cpu())
    return chosen


def _sample_lower_bound(flats: list[torch.Tensor], k: int, total: int) -> torch.Tensor:
    """A sampled value that, with overwhelming probability, is at or below the k-th largest."""
    # A fixed seed keeps the run time reproducible; the result is exact for any sample.
    generator = torch.Generator().manual_seed(0)
    parts = []
    for flat in flats:
        count = math.ceil(_SAMPLE_SIZE * flat.numel() / total)
        if count and flat.numel():
            positions = torch.randint(flat.numel(), (count,), generator=generator)
            parts.append(flat.take(positions.to(flat.device)))
    sample = torch.cat(parts).sort(descending=True).values
    size = sample.numel()
    fraction = k / total
    # The number of sample values above the true threshold is ~Binomial(size, fraction); going
    # this many standard deviations past its mean keeps the bound below the threshold.
    rank = max(0, math.ceil(size * fraction + _BRACKET_SIGMAS * math.sqrt(size * fraction * (1.0 - fraction)) + 1.0))
    if rank >= size:
        return torch.tensor(-math.inf, dtype=sample.dtype, device=sample.device)
    return sample[rank]


# Tensors of a model or state dict -----------------------------------------------------------------


def _named_tensors(model_or_state: ModelOrState) -> dict[str, torch.Tensor]:
    """A module's trainable parameters, or a state dict's floating-point tensors, in order."""
    if isinstance(model_or_state, nn.Module):
        return {name: p.detach() for name, p in model_or_state.named_parameters() if p.requires_grad}
    if isinstance(model_or_state, Mapping):
        return {
            name: tensor.detach()
            for name, tensor in model_or_state.items()
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
        }
    raise InvalidArgumentError(f"expected an nn.Module or a state dict of tensors, not {type(model_or_state).__name__}")


def _tensor_table(model_or_state: ModelOrState) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state, nn.Module):
        return {name: p.detach() for name, p in model_or_state.named_parameters()}
    return _named_tensors(model_or_state)
