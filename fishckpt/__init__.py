"""fishckpt: train with fixed sparse masks and checkpoint only the masked values."""

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
    MissingFileError,
    OutsideMaskError,
    OutsideMaskWarning,
    StateMismatchError,
    StepExistsError,
    StepNotFoundError,
    StoreExistsError,
    StoreLockedError,
    UnshuffledDataWarning,
    VerifyError,
    VerifyFailure,
)
from .mask import Mask
from .method.clip import clip_masked_grad_norm_
from .method.fisher import fisher_scores
from .method.optim import GradientMask, SparseAdamW, mask_gradients
from .method.select import bitfit_mask, diff_mask, fish_mask, random_mask
from .statefiles import STATE_FORMATS, load_state_file, save_state_file
from .store.records import CheckpointInfo, OutsideMaskTotal, SaveInfo, StoreReport
from .store.scan import native_available as native_scan_available
from .store.store import CheckpointStore

__version__ = "0.1.0"

__all__ = [
    "STATE_FORMATS",
    "BaseMismatchError",
    "CheckpointInfo",
    "CheckpointStore",
    "FishckptError",
    "FormatError",
    "GradientMask",
    "HeadNotTrainableWarning",
    "IntegrityError",
    "InvalidArgumentError",
    "Mask",
    "MaskLeakWarning",
    "MaskMismatchError",
    "MissingFileError",
    "OutsideMaskError",
    "OutsideMaskTotal",
    "OutsideMaskWarning",
    "SaveInfo",
    "SparseAdamW",
    "StateDiff",
    "StateMismatchError",
    "StepExistsError",
    "StepNotFoundError",
    "StoreExistsError",
    "StoreLockedError",
    "StoreReport",
    "TensorDiff",
    "UnshuffledDataWarning",
    "VerifyError",
    "VerifyFailure",
    "__version__",
    "bitfit_mask",
    "clip_masked_grad_norm_",
    "diff_mask",
    "diff_states",
    "fish_mask",
    "fisher_scores",
    "load_state_file",
    "mask_gradients",
    "native_scan_available",
    "random_mask",
    "save_state_file",
]
