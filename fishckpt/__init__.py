"""fishckpt: train with fixed sparse masks and checkpoint only the masked values."""

from ._errors import (
    BaseMismatchError,
    FishckptError,
    FormatError,
    IntegrityError,
    MaskMismatchError,
    OutsideMaskWarning,
    StateMismatchError,
    StepExistsError,
    StepNotFoundError,
    StoreExistsError,
    StoreLockedError,
)
from ._mask import Mask

__version__ = "0.1.0"

__all__ = [
    "BaseMismatchError",
    "FishckptError",
    "FormatError",
    "IntegrityError",
    "Mask",
    "MaskMismatchError",
    "OutsideMaskWarning",
    "StateMismatchError",
    "StepExistsError",
    "StepNotFoundError",
    "StoreExistsError",
    "StoreLockedError",
    "__version__",
]
