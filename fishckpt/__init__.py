"""fishckpt: train with fixed sparse masks and checkpoint only the masked values.

Names are imported on first use (PEP 562), so ``import fishckpt`` costs nothing,
and reading a store's headers (``fishckpt.Catalog``, ``fishckpt ls``) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# Every public name, and the module that defines it.
_EXPORTS = {
    "fishckpt.errors": [
        "BaseMismatchError",
        "FishckptError",
        "FormatError",
        "HeadNotTrainableWarning",
        "IntegrityError",
        "InvalidArgumentError",
        "MaskLeakWarning",
        "MaskMismatchError",
        "MissingDependencyError",
        "MissingFileError",
        "OutsideMaskError",
        "OutsideMaskWarning",
        "StateMismatchError",
        "StepExistsError",
        "StepNotFoundError",
        "StorageError",
        "StoreExistsError",
        "StoreLockedError",
        "StoreReplacedError",
        "UnshuffledDataWarning",
        "VerifyError",
        "VerifyFailure",
    ],
    "fishckpt.diff": ["StateDiff", "TensorDiff", "diff_states"],
    "fishckpt.hf.export": ["export_hf"],
    "fishckpt.mask": ["Mask"],
    "fishckpt.method.clip": ["clip_masked_grad_norm_"],
    "fishckpt.method.fisher": ["fisher_scores"],
    "fishckpt.method.optim": ["GradientMask", "SparseAdamW", "mask_gradients"],
    "fishckpt.method.select": ["bitfit_mask", "diff_mask", "fish_mask", "random_mask"],
    "fishckpt.statefiles": ["STATE_FORMATS", "load_state_file", "save_state_file"],
    "fishckpt.store.catalog": ["Catalog"],
    "fishckpt.store.records": ["CheckpointInfo", "OutsideMaskTotal", "SaveInfo", "StoreReport", "VerifyReport"],
    "fishckpt.store.native": ["native_scan_available"],
    "fishckpt.store.store": ["CheckpointStore", "PendingSave"],
    "fishckpt.train.checkpointer": ["Checkpointer", "resume"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "STATE_FORMATS",
    "BaseMismatchError",
    "Catalog",
    "CheckpointInfo",
    "CheckpointStore",
    "Checkpointer",
    "FishckptError",
    "FormatError",
    "GradientMask",
    "HeadNotTrainableWarning",
    "IntegrityError",
    "InvalidArgumentError",
    "Mask",
    "MaskLeakWarning",
    "MaskMismatchError",
    "MissingDependencyError",
    "MissingFileError",
    "OutsideMaskError",
    "OutsideMaskTotal",
    "OutsideMaskWarning",
    "PendingSave",
    "SaveInfo",
    "SparseAdamW",
    "StateDiff",
    "StateMismatchError",
    "StepExistsError",
    "StepNotFoundError",
    "StorageError",
    "StoreExistsError",
    "StoreLockedError",
    "StoreReplacedError",
    "StoreReport",
    "TensorDiff",
    "UnshuffledDataWarning",
    "VerifyError",
    "VerifyFailure",
    "VerifyReport",
    "__version__",
    "bitfit_mask",
    "clip_masked_grad_norm_",
    "diff_mask",
    "diff_states",
    "export_hf",
    "fish_mask",
    "fisher_scores",
    "load_state_file",
    "mask_gradients",
    "native_scan_available",
    "random_mask",
    "resume",
    "save_state_file",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fishckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name if name != "native_scan_available" else "available")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from .diff import StateDiff, TensorDiff, diff_states
    from .errors import (
        BaseMismatchError,
        FishckptError,
        FormatError,
        HeadNotTrainableWarning,
        IntegrityError,
        InvalidArgumentError,
        MaskLeakWarning,
        MaskMismatchError,
        MissingDependencyError,
        MissingFileError,
        OutsideMaskError,
        OutsideMaskWarning,
        StateMismatchError,
        StepExistsError,
        StepNotFoundError,
        StorageError,
        StoreExistsError,
        StoreLockedError,
        StoreReplacedError,
        UnshuffledDataWarning,
        VerifyError,
        VerifyFailure,
    )
    from .hf.export import export_hf
    from .mask import Mask
    from .method.clip import clip_masked_grad_norm_
    from .method.fisher import fisher_scores
    from .method.optim import GradientMask, SparseAdamW, mask_gradients
    from .method.select import bitfit_mask, diff_mask, fish_mask, random_mask
    from .statefiles import STATE_FORMATS, load_state_file, save_state_file
    from .store.catalog import Catalog
    from .store.native import available as native_scan_available
    from .store.records import CheckpointInfo, OutsideMaskTotal, SaveInfo, StoreReport, VerifyReport
    from .store.store import CheckpointStore, PendingSave
    from .train.checkpointer import Checkpointer, resume
