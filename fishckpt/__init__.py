"""fishckpt: train with fixed sparse masks and checkpoint only the masked values."""

from ._errors import (
    BaseMismatchError,
    FishckptError,
    FormatError,
    IntegrityError,
    InvalidArgumentError,
    MaskLeakWarning,
    MaskMismatchError,
    OutsideMaskError,
    OutsideMaskWarning,
    StateMismatchError,
    StepExistsError,
    StepNotFoundError,
    StoreExistsError,
    StoreLockedError,
)
from ._files import load_state_file, save_state_file
from ._fisher import fisher_scores
from ._mask import Mask
from ._optim import GradientMask, SparseAdamW, mask_gradients
from ._records import CheckpointInfo, SaveInfo, VerifyError, VerifyFailure
from ._select import bitfit_mask, diff_mask, fish_mask, random_mask
from ._store import CheckpointStore

__version__ = "0.1.0"

__all__ = [
    "BaseMismatchError",
    "CheckpointInfo",
    "CheckpointStore",
    "FishckptError",
    "FormatError",
    "GradientMask",
    "IntegrityError",
    "InvalidArgumentError",
    "Mask",
    "MaskLeakWarning",
    "MaskMismatchError",
    "OutsideMaskError",
    "OutsideMaskWarning",
    "SaveInfo",
    "SparseAdamW",
    "StateMismatchError",
    "StepExistsError",
    "StepNotFoundError",
    "StoreExistsError",
    "StoreLockedError",
    "VerifyError",
    "VerifyFailure",
    "__version__",
    "bitfit_mask",
    "diff_mask",
    "fish_mask",
    "fisher_scores",
    "load_state_file",
    "mask_gradients",
    "random_mask",
    "save_state_file",
]
