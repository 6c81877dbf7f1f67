"""Fisher information scores: the mean per-example squared gradient of every trainable parameter."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
from tqdm.auto import tqdm

from ..errors import InvalidArgumentError, UnshuffledDataWarning

__all__ = ["fisher_scores"]

LossFn = Callable[[Any, Any], torch.Tensor]
Mode = Literal["empirical", "expected"]
Method = Literal["auto", "vmap", "loop"]

_IGNORE_INDEX = -100  # the label value PyTorch and Hugging Face use for "no target here"


def fisher_scores(
    model: nn.Module,
    data: Iterable[Any],
    *,
    loss_fn: LossFn | None = None,
    num_samples: int = 1024,
    mode: Mode = "empirical",
    method: Method = "auto",
    chunk_size: int = 8,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information of every trainable parameter, from per-example gradients.

    The score of entry i is ``(1/N) Σ_n (∂loss_n/∂θ_i)²``, the mean over N examples of the
    *per-example* squared gradient (not the square of a batch-mean gradient). With
    ``mode="expected"`` each example's term is ``Σ_c p(c|x) (∂ log p(c|x)/∂θ_i)²`` under the
    model's own (detached) predicted distribution, so no labels are needed.

    The model runs in eval mode (dropout off). Afterwards every submodule's train/eval flag,
    every parameter, every ``.grad`` (including ``None``) and every buffer is exactly as it was.

    Batches: ``data`` yields batches whose tensors share a leading batch dimension.
    ``(inputs, labels)`` tuples or lists call ``model(inputs)`` (``model(*inputs)`` /
    ``model(**inputs)`` when ``inputs`` is a sequence / mapping); dicts call ``model(**batch)``;
    a bare tensor calls ``model(batch)``. Without ``loss_fn`` the loss is cross-entropy of the
    output's logits (the output itself, ``.logits`` or ``["logits"]``) against the labels
    (``batch[1]`` or ``batch["labels"]``; label -100 is ignored), else the output's ``.loss``.

    Shuffle the data. Only the first ``num_samples`` examples are used, in the order ``data``
    gives them, so a data set sorted by label or source scores only its first part. A torch
    ``DataLoader`` whose sampler is sequential (``shuffle=False``) over a data set with more
    than ``num_samples`` examples raises an :class:`UnshuffledDataWarning`; other iterables
    cannot be checked.

    Args:
        model: The model; only parameters with ``requires_grad`` are scored.
        data: Any iterable of batches. Iteration stops after ``num_samples`` examples, cutting
            the last batch; fewer examples are used if ``data`` runs out first.
        loss_fn: ``loss_fn(model_output, batch) -> scalar`` for one example; ``batch`` is then a
            one-example batch with the same structure as the batches of ``data``.
            Not allowed with ``mode="expected"``.
        num_samples: How many examples to average over (the reference code uses 1024).
        mode: ``"empirical"`` (true labels) or ``"expected"`` (the model's predicted labels;
            needs one distribution of logits per example, and costs one gradient per class).
        method: ``"vmap"`` computes per-example gradients with ``torch.func`` (vmap of grad),
            ``"loop"`` one example at a time; ``"auto"`` tries vmap and, if the model cannot be
            vmapped, warns once and loops.
        chunk_size: Examples whose gradients are held at once by the vmap path. Peak extra memory
            is about ``2 x chunk_size x 4 bytes x parameters`` (times the class count in
            ``"expected"`` mode).
        progress: Show a tqdm progress bar on stderr when stderr is a terminal (or in a Jupyter
            notebook); never in logs, pipes or captured output.

    Returns:
        ``{name: fp32 tensor shaped like the parameter}`` for every trainable parameter, in
        ``named_parameters()`` order.

    Raises:
        InvalidArgumentError: A bad option, no examples, or batches from which no loss can be derived.

    Warns:
        UnshuffledDataWarning: ``data`` is a ``DataLoader`` with a sequential sampler that holds
            more than ``num_samples`` examples.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
        >>> scores = fisher_scores(model, data, num_samples=8, progress=False)
        >>> scores["weight"].shape, scores["weight"].dtype
        (torch.Size([3, 4]), torch.float32)
    """
    if mode not in ("empirical", "expected"):
        raise InvalidArgumentError(f"mode must be 'empirical' or 'expected', not {mode!r}")
    if method not in ("auto", "vmap", "loop"):
        raise InvalidArgumentError(f"method must be 'auto', 'vmap' or 'loop', not {method!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise InvalidArgumentError(f"num_samples must be a positive int, not {num_samples!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidArgumentError(f"chunk_size must be a positive int, not {chunk_size!r}")
    if mode == "expected" and loss_fn is not None:
        raise InvalidArgumentError(
            "mode='expected' sums over the model's predicted classes and uses no loss; drop loss_fn, "
            "or use mode='empirical'"
        )

    _warn_if_ordered(data, num_samples)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise InvalidArgumentError("the model has no parameters with requires_grad=True to score")
    objective = _Objective(model, loss_fn, mode)
    scores = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in trainable.items()}

    seen = 0
    use_vmap = method != "loop"
    # disable=None: tqdm shows the bar only when its stream (stderr) is a terminal, and in
    # notebooks; a library's bar would otherwise fill every log and captured output.
    bar_disabled = None if progress else True
    with (
        _PreservedModelState(model),
        torch.enable_grad(),
        tqdm(total=num_samples, disable=bar_disabled, unit="ex", desc="fisher scores", leave=False) as bar,
    ):
        model.eval()
        # Detached leaves: gradients flow to these, so the model's own .grad and any hooks
        # users registered on its parameters are never involved.
        params = {name: p.detach() for name, p in trainable.items()}
        scorer = _VmapScorer(model, objective, params, scores)
        for batch in data:
            leaves, rebuild = _flatten(batch)
            batch_size = _batch_size(leaves)
            take = min(batch_size, num_samples - seen)
            if take < batch_size:
                leaves = [leaf[:take] if _is_batched(leaf) else leaf for leaf in leaves]
            for start in range(0, take, chunk_size):
                chunk = [leaf[start : start + chunk_size] if _is_batched(leaf) else leaf for leaf in leaves]
                size = min(chunk_size, take - start)
                if use_vmap:
                    try:
                        scorer.add_chunk(chunk, rebuild)
                    except Exception as error:
                        if method == "vmap":
                            raise
                        # One warning, then loop for the rest: models with data-dependent control
                        # flow, .item() calls or in-place ops on inputs cannot be vmapped.
                        warnings.warn(
                            f"fisher_scores: the model cannot be vmapped ({type(error).__name__}: "
                            f"{_first_line(error)}); falling back to a slower per-example loop. "
                            "Pass method='loop' to skip this attempt.",
                            UserWarning,
                            stacklevel=2,
                        )
                        use_vmap = False
                if not use_vmap:
                    _loop_chunk(objective, params, chunk, rebuild, size, scores)
                seen += size
                bar.update(size)
            if seen >= num_samples:
                break  # before asking the loader for a batch that would not be used
    if seen == 0:
        raise InvalidArgumentError("fisher_scores got no examples: data yielded no batches")
    for score in scores.values():
        score.div_(seen)
    return scores


def _warn_if_ordered(data: Iterable[Any], num_samples: int) -> None:
    """Warns when ``data`` is a DataLoader that will hand over the first examples of its data set, in order.

    Only what can be known without false alarms: a map-style data set read by a
    ``SequentialSampler`` (``shuffle=False``) that holds more examples than will be used. When
    every example is used their order does not matter (the score is a mean), and iterable data
    sets, lists of batches and custom samplers may well be shuffled already.
    """
    if not isinstance(data, DataLoader):
        return
    batch_sampler = data.batch_sampler
    sampler = batch_sampler.sampler if isinstance(batch_sampler, BatchSampler) else data.sampler
    if not isinstance(sampler, SequentialSampler):
        return
    try:
        size = len(data.dataset)  # type: ignore[arg-type]  # map-style data sets have a length
    except TypeError:
        return
    if size > num_samples:
        warnings.warn(
            f"fisher_scores uses the first {num_samples} of the {size} examples, and this DataLoader gives "
            "them in data-set order (its sampler is sequential); if the data set is sorted (by label, "
            "source or length) the scores describe only that first part. Pass a DataLoader with "
            "shuffle=True (and a seeded generator for reproducible masks).",
            UnshuffledDataWarning,
            stacklevel=3,
        )


class _Objective:
    """Turns (model output, one-example batch) into the loss or the log-probabilities to differentiate."""

    def __init__(self, model: nn.Module, loss_fn: LossFn | None, mode: Mode) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.mode = mode

    def forward(self, params: Mapping[str, torch.Tensor], batch: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            return torch.func.functional_call(self.model, dict(params), args, kwargs)

        return _call_model(call, batch)

    def loss(self, params: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        output = self.forward(params, batch)
        loss = _default_loss(output, batch) if self.loss_fn is None else self.loss_fn(output, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise InvalidArgumentError("the loss must be a scalar tensor (one example per call)")
        return loss.reshape(())

    def log_probs(self, params: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        logits = _logits(self.forward(params, batch))
        if logits is None:
            raise InvalidArgumentError(
                "mode='expected' needs logits: the model must return a tensor, or an output with .logits"
            )
        if logits.numel() != logits.shape[-1]:
            raise InvalidArgumentError(
                f"mode='expected' needs one distribution per example, but logits have shape "
                f"{tuple(logits.shape)} for one example; use mode='empirical'"
            )
        return torch.log_softmax(logits.float().reshape(-1), dim=0)


class _VmapScorer:
    """Per-example gradients with torch.func (vmap of grad), vectorised over the examples of a chunk.

    In "empirical" mode, ``nn.Embedding`` weights are handled apart: a dense per-example gradient
    of a 30k x 384 word embedding is 47 MB of zeros but for the few rows the example looks up, and
    allocating and squaring those zeros cost more than the rest of the backward pass. Instead a
    zero "probe" is added to the lookup's output, its per-example gradient (one row per looked-up
    id) is taken, and the rows are summed per (example, id) and squared into the scores. This is
    exact for lookups without ``max_norm`` or ``scale_grad_by_freq`` whose weight is used
    nowhere else, which is checked once with plain autograd before it is relied on.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: _Objective,
        params: dict[str, torch.Tensor],
        scores: dict[str, torch.Tensor],
    ) -> None:
        self.objective = objective
        self.params = params
        self.scores = scores
        self.lookups: dict[str, _Lookup] | None = None if objective.mode == "empirical" else {}
        self._candidates = _lookup_candidates(model, params)

    def add_chunk(self, chunk: list[Any], rebuild: Callable[[list[Any]], Any]) -> None:
        """Adds the chunk's per-example squared gradients to the scores.

        Nothing is added unless the whole chunk succeeds, so a failure can be retried by the loop.
        """
        batched = [i for i, leaf in enumerate(chunk) if _is_batched(leaf)]
        first = rebuild([leaf[:1] if _is_batched(leaf) else leaf for leaf in chunk])
        if self.lookups is None:
            self.lookups = self._lookups_used_only_once(first)
        shapes = self._lookup_output_shapes(first) if self.lookups else {}
        lookups = {name: lookup for name, lookup in self.lookups.items() if name in shapes}
        fixed = {lookup.weight_name: self.params[lookup.weight_name] for lookup in lookups.values()}
        dense = {name: p for name, p in self.params.items() if name not in fixed}
        probes = {
            name: torch.zeros(shapes[name], dtype=fixed[lk.weight_name].dtype, device=fixed[lk.weight_name].device)
            for name, lk in lookups.items()
        }
        objective = self.objective

        def one_example(
            dense: dict[str, torch.Tensor], probes: dict[str, torch.Tensor], batched_leaves: list[torch.Tensor]
        ) -> Any:
            leaves = list(chunk)
            for i, leaf in zip(batched, batched_leaves, strict=True):
                leaves[i] = leaf.unsqueeze(0)  # the model expects a batch dimension
            batch = rebuild(leaves)
            if objective.mode == "expected":
                return self._expected_squares(dense, batch)

            def loss_of(
                dense: dict[str, torch.Tensor], probes: dict[str, torch.Tensor]
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
                looked_up: dict[str, torch.Tensor] = {}

                def add_probe(name: str, ids: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
                    looked_up[name] = ids
                    return output + probes[name]

                with _lookup_hooks({name: lk.module for name, lk in lookups.items()}, add_probe):
                    loss = objective.loss({**dense, **fixed}, batch)
                return loss, looked_up

            return torch.func.grad(loss_of, argnums=(0, 1), has_aux=True)(dense, probes)

        result = torch.func.vmap(one_example, in_dims=(None, None, 0))(dense, probes, [chunk[i] for i in batched])
        if objective.mode == "expected":
            for name, squares in result.items():  # already weighted squares
                self.scores[name] += squares.sum(0)
            return
        (grads, probe_grads), ids = result
        # Everything that can fail runs before the first addition (see the docstring).
        row_squares = {name: lookup.row_squares(ids[name], probe_grads[name]) for name, lookup in lookups.items()}
        for name, stacked in grads.items():
            # Squaring into the accumulator one example at a time avoids a second chunk-sized
            # temporary; for large tensors the allocation alone costs more than the arithmetic.
            for grad in stacked:
                self.scores[name].addcmul_(grad, grad)
        for name, (rows, squares) in row_squares.items():
            self.scores[lookups[name].weight_name].index_add_(0, rows, squares)

    def _expected_squares(self, params: dict[str, torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:
        def log_probs(params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            log_p = self.objective.log_probs(params, batch)
            return log_p, log_p.detach()

        jacobian, log_p = torch.func.jacrev(log_probs, has_aux=True)(params)
        prob = log_p.exp()
        return {name: torch.tensordot(prob, j.float().square(), dims=1) for name, j in jacobian.items()}

    def _lookups_used_only_once(self, example: Any) -> dict[str, _Lookup]:
        """The candidate lookups called once per forward and whose weight feeds the loss through that call alone."""
        if not self._candidates:
            return {}
        calls: dict[str, int] = dict.fromkeys(self._candidates, 0)

        def cut(name: str, ids: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
            calls[name] += 1
            return output.detach()  # with the lookup cut off, the loss must not depend on the weight

        weights = {
            lk.weight_name: self.params[lk.weight_name].detach().requires_grad_(True)
            for lk in self._candidates.values()
        }
        with _lookup_hooks({name: lk.module for name, lk in self._candidates.items()}, cut):
            loss = self.objective.loss({**self.params, **weights}, example)
        grads: tuple[torch.Tensor | None, ...] = (None,) * len(weights)
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
        reached = {name for name, grad in zip(weights, grads, strict=True) if grad is not None}
        return {
            name: lookup
            for name, lookup in self._candidates.items()
            if calls[name] == 1 and lookup.weight_name not in reached
        }

    def _lookup_output_shapes(self, example: Any) -> dict[str, torch.Size]:
        """Output shape of each lookup for one example; a lookup not called exactly once is dropped."""
        assert self.lookups is not None
        shapes: dict[str, torch.Size] = {}
        calls: dict[str, int] = dict.fromkeys(self.lookups, 0)

        def record(name: str, ids: torch.Tensor, output: torch.Tensor) -> None:
            calls[name] += 1
            shapes[name] = output.shape

        with torch.no_grad(), _lookup_hooks({name: lk.module for name, lk in self.lookups.items()}, record):
            self.objective.forward(self.params, example)
        for name, count in calls.items():
            if count != 1:
                del self.lookups[name]
                shapes.pop(name, None)
        return shapes


class _Lookup:
    """An nn.Embedding whose per-example weight gradient is built from its looked-up rows."""

    def __init__(self, module: nn.Embedding, weight_name: str) -> None:
        self.module = module
        self.weight_name = weight_name

    def row_squares(self, ids: torch.Tensor, output_grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and squared per-example row gradients of a chunk, from its ids and output gradients.

        ``score.index_add_(0, rows, squares)`` then adds Σ_n (per-example gradient)² to the score.
        """
        examples, rows, width = output_grads.shape[0], self.module.num_embeddings, output_grads.shape[-1]
        ids = ids.reshape(examples, -1)
        grads = output_grads.reshape(examples, -1, width)
        if ids.shape[1] != grads.shape[1]:
            raise RuntimeError(f"embedding {self.weight_name!r}: ids and output gradients do not line up")
        # One key per (example, id): gradients of repeated ids within an example add up before squaring.
        keys = (torch.arange(examples, device=ids.device).unsqueeze(1) * rows + ids).reshape(-1)
        grads = grads.reshape(-1, width)
        if self.module.padding_idx is not None:  # nn.Embedding never passes gradient to this row
            keep = ids.reshape(-1) != self.module.padding_idx
            keys, grads = keys[keep], grads[keep]
        unique, inverse = torch.unique(keys, return_inverse=True)
        summed = torch.zeros(unique.numel(), width, dtype=torch.float32, device=grads.device)
        summed.index_add_(0, inverse, grads.float())
        return unique % rows, summed.square()


def _lookup_candidates(model: nn.Module, params: dict[str, torch.Tensor]) -> dict[str, _Lookup]:
    # A weight registered under two names (tied input and output embeddings) also gets gradient
    # from its other use, so it must take the ordinary dense path.
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    candidates = {}
    for name, module in model.named_modules():
        weight_name = f"{name}.weight" if name else "weight"
        if (
            type(module) is nn.Embedding  # subclasses may override forward
            and weight_name in params
            and module.max_norm is None
            and not module.scale_grad_by_freq
            and owners.get(id(module.weight)) == 1
        ):
            candidates[name] = _Lookup(module, weight_name)
    return candidates


@contextmanager
def _lookup_hooks(
    modules: Mapping[str, nn.Module], on_lookup: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor | None]
) -> Iterator[None]:
    """Calls ``on_lookup(name, ids, output)`` after each module's forward; a returned tensor replaces the output."""

    def make(name: str) -> Callable[..., torch.Tensor | None]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor
        ) -> torch.Tensor | None:
            ids = args[0] if args else kwargs["input"]
            return on_lookup(name, ids, output)

        return hook

    handles = [module.register_forward_hook(make(name), with_kwargs=True) for name, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _loop_chunk(
    objective: _Objective,
    params: dict[str, torch.Tensor],
    chunk: list[Any],
    rebuild: Callable[[list[Any]], Any],
    size: int,
    scores: dict[str, torch.Tensor],
) -> None:
    """Adds the chunk's per-example squared gradients to ``scores``, one example at a time."""
    names = list(params)
    leaf_params = {name: p.requires_grad_(True) for name, p in ((n, params[n].detach()) for n in names)}
    inputs = [leaf_params[name] for name in names]

    def add(grads: tuple[torch.Tensor | None, ...], weight: float) -> None:
        for name, g in zip(names, grads, strict=True):
            if g is not None:  # None: the parameter did not take part in this example's loss
                scores[name].addcmul_(g, g, value=weight)

    for i in range(size):
        batch = rebuild([leaf[i : i + 1] if _is_batched(leaf) else leaf for leaf in chunk])
        if objective.mode == "empirical":
            loss = objective.loss(leaf_params, batch)
            add(torch.autograd.grad(loss, inputs, allow_unused=True), 1.0)
        else:
            log_p = objective.log_probs(leaf_params, batch)
            prob = log_p.detach().exp()
            for c in range(log_p.numel()):
                grads = torch.autograd.grad(log_p[c], inputs, retain_graph=c + 1 < log_p.numel(), allow_unused=True)
                add(grads, float(prob[c]))


# Batches ------------------------------------------------------------------------------------------


def _flatten(batch: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """Splits a batch into its leaves and a function that rebuilds the same structure from new leaves."""
    if isinstance(batch, Mapping):
        keys = list(batch)
        parts = [_flatten(batch[key]) for key in keys]
        return _join(parts, lambda rebuilt: dict(zip(keys, rebuilt, strict=True)))
    if isinstance(batch, (tuple, list)):
        kind = type(batch)
        parts = [_flatten(item) for item in batch]
        if kind is tuple or kind is list:
            return _join(parts, kind)
        return _join(parts, lambda rebuilt: kind(*rebuilt))  # named tuples
    return [batch], lambda leaves: leaves[0]


def _join(
    parts: list[tuple[list[Any], Callable[[list[Any]], Any]]], make: Callable[[list[Any]], Any]
) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    leaves = [leaf for part_leaves, _ in parts for leaf in part_leaves]
    sizes = [len(part_leaves) for part_leaves, _ in parts]

    def rebuild(new_leaves: list[Any]) -> Any:
        rebuilt, start = [], 0
        for (_, part_rebuild), size in zip(parts, sizes, strict=True):
            rebuilt.append(part_rebuild(new_leaves[start : start + size]))
            start += size
        return make(rebuilt)

    return leaves, rebuild


def _is_batched(leaf: Any) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.dim() > 0


def _batch_size(leaves: list[Any]) -> int:
    sizes = {int(leaf.shape[0]) for leaf in leaves if _is_batched(leaf)}
    if len(sizes) != 1:
        raise InvalidArgumentError(
            "every tensor in a batch must share its leading (batch) dimension; "
            f"found leading sizes {sorted(sizes) or 'none (no tensors)'}"
        )
    return sizes.pop()


def _call_model(call: Callable[..., Any], batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return call(**batch)
    if isinstance(batch, (tuple, list)):
        inputs = batch[0]
        if isinstance(inputs, Mapping):
            return call(**inputs)
        if isinstance(inputs, (tuple, list)):
            return call(*inputs)
        return call(inputs)
    return call(batch)


def _labels(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, Mapping):
        labels = batch.get("labels")
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        labels = batch[1]
    else:
        labels = None
    return labels if isinstance(labels, torch.Tensor) else None


def _logits(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else None


def _default_loss(output: Any, batch: Any) -> torch.Tensor:
    logits, labels = _logits(output), _labels(batch)
    if logits is not None and labels is not None:
        if labels.is_floating_point():
            raise InvalidArgumentError(
                f"the default loss is cross-entropy on class labels, but the labels are {labels.dtype}; "
                "pass loss_fn(output, batch) for other targets"
            )
        return nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=_IGNORE_INDEX
        )
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    raise InvalidArgumentError(
        "cannot derive a loss: give (inputs, labels) batches for a model returning logits, dict batches "
        "with 'labels' for a model whose output has .logits or .loss, or pass loss_fn(output, batch)"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else "no message"


# Leaving the model as it was -----------------------------------------------------------------


class _PreservedModelState:
    """Restores train/eval flags, .grad fields and buffers of a model when the block ends.

    Parameters need no copy: scoring only reads them. Buffers are copied because an arbitrary
    module may update them in forward even in eval mode.
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._training: list[tuple[nn.Module, bool]] = []
        self._grads: list[tuple[nn.Parameter, torch.Tensor | None]] = []
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> _PreservedModelState:
        self._training = [(module, module.training) for module in self._model.modules()]
        self._grads = [(p, p.grad) for p in self._model.parameters()]
        self._buffers = [(buffer, buffer.detach().clone()) for buffer in self._model.buffers()]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for module, training in self._training:
            module.training = training  # not .train(): that would also reset the children
        for param, grad in self._grads:
            param.grad = grad
        with torch.no_grad():
            for buffer, saved in self._buffers:
                buffer.copy_(saved)  # a same-dtype copy moves bits, NaN payloads and -0.0 included
