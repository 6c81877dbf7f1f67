"""fisher_scores: per-example squared gradients, both code paths, and leaving the model untouched."""

from __future__ import annotations

import copy
import io
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from conftest import assert_bits_equal
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler, TensorDataset

from fishckpt import InvalidArgumentError, UnshuffledDataWarning, fisher_scores


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Dropout(0.5), nn.Linear(7, 3))


def _batches(seed: int = 1, sizes: tuple[int, ...] = (6, 6, 6)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=generator), torch.randint(0, 3, (n,), generator=generator)) for n in sizes]


def _hand_empirical(model: nn.Module, examples: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Independent reference: one example at a time, plain autograd, on a copy in eval mode."""
    model = copy.deepcopy(model).eval()
    params = dict(model.named_parameters())
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for x, y in examples:
        loss = nn.functional.cross_entropy(model(x[None]), y[None])
        grads = torch.autograd.grad(loss, list(params.values()))
        for name, g in zip(params, grads, strict=True):
            total[name] += g**2
    return {name: value / len(examples) for name, value in total.items()}


def _hand_expected(model: nn.Module, inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model).eval()
    params = dict(model.named_parameters())
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for x in inputs:
        log_p = torch.log_softmax(model(x[None])[0], dim=0)
        for c in range(log_p.numel()):
            grads = torch.autograd.grad(-log_p[c], list(params.values()), retain_graph=True)
            for name, g in zip(params, grads, strict=True):
                total[name] += log_p[c].exp().detach() * g**2
    return {name: value / len(inputs) for name, value in total.items()}


def _examples(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i], y[i]) for x, y in batches for i in range(x.shape[0])]


def _assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].dtype == torch.float32
        torch.testing.assert_close(actual[name], expected[name].float(), rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_empirical_matches_hand_computed_loop(method: str) -> None:
    model, batches = _mlp(), _batches()
    scores = fisher_scores(model, batches, num_samples=18, method=method, chunk_size=4, progress=False)  # type: ignore[arg-type]
    _assert_close(scores, _hand_empirical(model, _examples(batches)))
    # The square of the batch-mean gradient is a different quantity: make sure we are not computing it.
    evaluated = copy.deepcopy(model).eval()
    mean_grad = torch.autograd.grad(
        nn.functional.cross_entropy(evaluated(batches[0][0]), batches[0][1]), list(evaluated.parameters())
    )
    assert not torch.allclose(scores["0.weight"], mean_grad[0] ** 2)


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_expected_matches_hand_computed_loop(method: str) -> None:
    model, batches = _mlp(), _batches()
    scores = fisher_scores(
        model,
        batches,
        num_samples=18,
        mode="expected",
        method=method,
        chunk_size=5,
        progress=False,  # type: ignore[arg-type]
    )
    _assert_close(scores, _hand_expected(model, [x for x, _ in _examples(batches)]))


@pytest.mark.parametrize("mode", ["empirical", "expected"])
def test_vmap_and_loop_agree(mode: str) -> None:
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.LayerNorm(24), nn.Linear(24, 5))
    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(7, 2, 8, generator=generator), torch.randint(0, 5, (7,), generator=generator))] * 2
    vmapped = fisher_scores(model, batches, num_samples=14, mode=mode, method="vmap", chunk_size=3, progress=False)  # type: ignore[arg-type]
    looped = fisher_scores(model, batches, num_samples=14, mode=mode, method="loop", progress=False)  # type: ignore[arg-type]
    _assert_close(vmapped, looped)


class _Counter(nn.Module):
    """Updates a buffer in forward even in eval mode, like some custom normalisation layers."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("nan_payload", torch.tensor([float("nan"), -0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.calls.add_(1)
        return x


@pytest.mark.parametrize("method", ["vmap", "loop", "auto"])
def test_model_is_left_exactly_as_it_was(method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Dropout(0.5), nn.Linear(7, 3))
    if method != "vmap":
        model.insert(2, _Counter())  # in-place buffer updates cannot be vmapped
    model.train()
    model[1].eval()  # mixed flags: must come back per module, not via model.train()
    with torch.no_grad():  # non-trivial running stats
        model[1].running_mean.normal_()
        model[1].num_batches_tracked.fill_(7)
    model[0].bias.requires_grad_(False)
    model[0].weight.grad = torch.randn(7, 5)
    grad_object = model[0].weight.grad
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if method == "auto":
        with pytest.warns(UserWarning, match="cannot be vmapped"):
            scores = fisher_scores(model, _batches(), num_samples=10, method="auto", progress=False)
    else:
        scores = fisher_scores(model, _batches(), num_samples=10, method=method, progress=False)  # type: ignore[arg-type]
    assert "0.bias" not in scores and "0.weight" in scores  # only requires_grad parameters
    assert [m.training for m in model.modules()] == flags
    assert model[0].weight.grad is grad_object
    assert all(p.grad is None for name, p in model.named_parameters() if name != "0.weight")
    for key, value in model.state_dict().items():
        assert_bits_equal(value, state[key], key=key)


def test_stops_after_num_samples_and_cuts_the_last_batch() -> None:
    model, batches = _mlp(), _batches(sizes=(4, 4, 4, 4))
    pulled = []

    def data():  # type: ignore[no-untyped-def]
        for batch in batches:
            pulled.append(batch)
            yield batch

    scores = fisher_scores(model, data(), num_samples=6, progress=False)
    assert len(pulled) == 2  # the third batch is never requested
    _assert_close(scores, _hand_empirical(model, _examples(batches)[:6]))
    # Data shorter than num_samples: the mean is over what there was.
    _assert_close(
        fisher_scores(model, batches[:1], num_samples=1024, progress=False),
        _hand_empirical(model, _examples(batches[:1])),
    )


@dataclass
class _Output:
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None


class _DictModel(nn.Module):
    """Hugging Face calling convention: model(**batch) with input_ids, attention_mask, labels."""

    def __init__(self, *, give_logits: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 3)
        self.give_logits = give_logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> _Output:
        weights = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * weights).sum(1) / weights.sum(1)
        logits = self.head(pooled)
        if self.give_logits:
            return _Output(logits=logits)
        return _Output(loss=nn.functional.cross_entropy(logits, labels))


@pytest.mark.parametrize("give_logits", [True, False])
def test_dict_batches_with_logits_or_loss(give_logits: bool) -> None:
    torch.manual_seed(0)
    model = _DictModel(give_logits=give_logits)
    generator = torch.Generator().manual_seed(5)
    batch = {
        "input_ids": torch.randint(0, 11, (6, 5), generator=generator),
        "attention_mask": (torch.rand(6, 5, generator=generator) > 0.3).long(),
        "labels": torch.randint(0, 3, (6,), generator=generator),
    }
    batch["attention_mask"][:, 0] = 1
    scores = fisher_scores(model, [batch], method="vmap", progress=False)

    def plain(ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        weights = attention.unsqueeze(-1).float()
        return model.head((model.embed(ids) * weights).sum(1) / weights.sum(1))

    reference = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for i in range(6):
        loss = nn.functional.cross_entropy(
            plain(batch["input_ids"][i : i + 1], batch["attention_mask"][i : i + 1]), batch["labels"][i : i + 1]
        )
        for name, g in zip(reference, torch.autograd.grad(loss, list(model.parameters())), strict=True):
            reference[name] += g**2 / 6
    _assert_close(scores, reference)


class _Lookups(nn.Module):
    """Every way an embedding weight can be used, for the vmap path's sparse handling of lookups."""

    def __init__(self) -> None:
        super().__init__()
        self.words = nn.Embedding(13, 4, padding_idx=0)  # repeated ids and a padding row
        self.positions = nn.Embedding(6, 4)  # ids made inside forward, not taken from the batch
        self.twice = nn.Embedding(5, 4)  # looked up twice per forward
        self.reused = nn.Embedding(7, 4)  # weight also used directly, as an output projection
        self.tied = nn.Embedding(9, 4)  # weight registered a second time, as the head's
        self.head = nn.Linear(4, 9, bias=False)
        self.head.weight = self.tied.weight
        self.scaled = nn.Embedding(8, 4, scale_grad_by_freq=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        hidden = self.words(ids) + self.positions(positions) + self.twice(ids % 5) * self.twice(ids % 3)
        hidden = hidden + self.tied(ids % 9) + self.scaled(ids % 8) + self.reused(ids % 7)
        hidden = torch.tanh(hidden).mean(1)
        return torch.cat([self.head(hidden), hidden @ self.reused.weight.t()], dim=1)


def test_embedding_lookups_match_the_loop() -> None:
    torch.manual_seed(0)
    model = _Lookups()
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 4, (6, 6), generator=generator)  # small range: many repeats, some padding
    batches = [(ids, torch.randint(0, 16, (6,), generator=generator))]
    vmapped = fisher_scores(model, batches, method="vmap", chunk_size=4, progress=False)
    looped = fisher_scores(model, batches, method="loop", progress=False)
    _assert_close(vmapped, looped)
    assert bool((vmapped["reused.weight"][4:] != 0).any())  # rows reached only through the projection
    assert bool((vmapped["words.weight"][0] == 0).all())  # the padding row gets no gradient


def test_custom_loss_fn_gets_one_example_batches() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(5, 3), torch.randn(5, 1)
    seen_sizes = []

    def loss_fn(output: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        seen_sizes.append(batch[0].shape[0])
        return ((output - batch[1]) ** 2).sum()

    scores = fisher_scores(model, [(x, y)], loss_fn=loss_fn, method="loop", progress=False)
    assert set(seen_sizes) == {1}
    residual = (model(x) - y).detach()  # d/dw (w·x + b - y)² = 2 r x
    torch.testing.assert_close(scores["weight"], ((2 * residual * x) ** 2).mean(0, keepdim=True))
    torch.testing.assert_close(scores["bias"], ((2 * residual) ** 2).mean(0))


class _NotVmappable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum().item()) > 1e9:  # data-dependent control flow defeats vmap
            return x[:, :3]
        return self.linear(x)


def test_auto_falls_back_to_loop_once_with_a_warning() -> None:
    model = _NotVmappable()
    batches = _batches(sizes=(4, 4, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = fisher_scores(model, batches, chunk_size=2, progress=False)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "cannot be vmapped" in messages[0] and "method='loop'" in messages[0]
    _assert_close(auto, fisher_scores(model, batches, method="loop", progress=False))
    with pytest.raises(RuntimeError):
        fisher_scores(model, batches, method="vmap", progress=False)


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal_stderr(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, batches = _mlp(), _batches()
    fisher_scores(model, batches, num_samples=12, progress=True)  # captured stderr is no terminal
    assert capsys.readouterr() == ("", "")
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    fisher_scores(model, batches, num_samples=12, progress=True)
    assert "fisher scores" in terminal.getvalue()
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    fisher_scores(model, batches, num_samples=12, progress=False)
    assert quiet.getvalue() == ""
    assert capsys.readouterr() == ("", "")


def _dataset(size: int = 18) -> TensorDataset:
    generator = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(size, 5, generator=generator), torch.randint(0, 3, (size,), generator=generator))


def test_warns_when_an_ordered_dataloader_is_cut_short() -> None:
    model, dataset = _mlp(), _dataset(18)
    with pytest.warns(UnshuffledDataWarning, match=r"first 12 of the 18 examples.*shuffle=True"):
        ordered = fisher_scores(model, DataLoader(dataset, batch_size=6), num_samples=12, progress=False)
    # The scores are still those of the first 12 examples: the warning changes nothing else.
    _assert_close(ordered, _hand_empirical(model, [dataset[i] for i in range(12)]))
    batched = DataLoader(dataset, batch_sampler=BatchSampler(SequentialSampler(dataset), 4, drop_last=False))
    with pytest.warns(UnshuffledDataWarning):
        fisher_scores(model, batched, num_samples=8, progress=False)


def test_no_shuffling_warning_where_order_cannot_matter_or_is_unknown() -> None:
    model, dataset = _mlp(), _dataset(18)
    shuffled = DataLoader(dataset, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(0))

    class Stream(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
        def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            return iter(dataset[i] for i in range(len(dataset)))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fisher_scores(model, shuffled, num_samples=12, progress=False)
        fisher_scores(model, DataLoader(dataset, batch_size=6), num_samples=18, progress=False)  # every example
        fisher_scores(model, DataLoader(dataset, batch_size=6), num_samples=100, progress=False)
        fisher_scores(model, DataLoader(Stream(), batch_size=6), num_samples=12, progress=False)
        fisher_scores(model, _batches(), num_samples=12, progress=False)  # a list: its order is the caller's


def test_accumulates_in_fp32_for_other_dtypes() -> None:
    model = _mlp().double()
    batches = [(x.double(), y) for x, y in _batches()]
    scores = fisher_scores(model, batches, progress=False)
    assert {score.dtype for score in scores.values()} == {torch.float32}


def test_invalid_arguments() -> None:
    model, batches = _mlp(), _batches()
    with pytest.raises(InvalidArgumentError, match="mode must be 'empirical' or 'expected'"):
        fisher_scores(model, batches, mode="fisher", progress=False)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="drop loss_fn"):
        fisher_scores(model, batches, mode="expected", loss_fn=lambda out, batch: out.sum(), progress=False)
    with pytest.raises(InvalidArgumentError, match="num_samples must be a positive int"):
        fisher_scores(model, batches, num_samples=0, progress=False)
    with pytest.raises(InvalidArgumentError, match="got no examples"):
        fisher_scores(model, [], progress=False)
    with pytest.raises(InvalidArgumentError, match="cannot derive a loss"):
        fisher_scores(model, [torch.randn(4, 5)], method="loop", progress=False)
    with pytest.raises(InvalidArgumentError, match="share its leading"):
        fisher_scores(model, [(torch.randn(4, 5), torch.zeros(3, dtype=torch.long))], progress=False)
