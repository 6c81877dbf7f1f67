"""fishckpt: train with fixed sparse masks and checkpoint only the masked values."""

from ._errors import (
    BaseMismatchError,
    FishckptError,
    FormatError,
    IntegrityError,
    InvalidArgumentError,
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
from ._mask import Mask
from ._store import CheckpointInfo, CheckpointStore, SaveInfo, VerifyError, VerifyFailure

__version__ = "0.1.0"

__all__ = [
    "BaseMismatchError",
    "CheckpointInfo",
    "CheckpointStore",
    "FishckptError",
    "FormatError",
    "IntegrityError",
    "InvalidArgumentError",
    "Mask",
    "MaskMismatchError",
    "OutsideMaskError",
    "OutsideMaskWarning",
    "SaveInfo",
    "StateMismatchError",
    "StepExistsError",
    "StepNotFoundError",
    "StoreExistsError",
    "StoreLockedError",
    "VerifyError",
    "VerifyFailure",
    "__version__",
    "load_state_file",
    "save_state_file",
]
