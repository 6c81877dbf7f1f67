"""Hugging Face Transformers: ``FishTrainer`` (FISH training with sparse checkpoints) and ``export_hf``.

``pip install 'fishckpt[hf]'`` brings transformers and accelerate. Names are imported on first
use (PEP 562): ``export_hf`` needs neither library, and ``import fishckpt.hf`` imports neither;
``from fishckpt.hf import FishTrainer`` raises ``MissingDependencyError`` naming the pip command
when transformers is missing.

    >>> from fishckpt.hf import FishTrainer
    >>> trainer = FishTrainer(model=model, args=args, train_dataset=train, keep_ratio=0.005)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["FishTrainer", "export_hf"]

_WHERE = {"FishTrainer": "fishckpt.hf.trainer", "export_hf": "fishckpt.hf.export"}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fishckpt.hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from .export import export_hf
    from .trainer import FishTrainer
