"""The exception and warning types fishckpt raises, all rooted at FishckptError."""

from __future__ import annotations

__all__ = [
    "BaseMismatchError",
    "FishckptError",
    "FormatError",
    "IntegrityError",
    "MaskMismatchError",
    "OutsideMaskWarning",
    "StateMismatchError",
    "StepExistsError",
    "StepNotFoundError",
    "StoreExistsError",
    "StoreLockedError",
]


class FishckptError(Exception):
    """Base class of every error fishckpt raises on purpose."""


class FormatError(FishckptError):
    """A file is not in a format this version of fishckpt can read."""


class IntegrityError(FishckptError):
    """Stored bytes do not match their recorded digest: corruption or truncation."""


class MaskMismatchError(FishckptError):
    """A mask does not fit the tensors it is applied to, or is not the store's mask."""


class BaseMismatchError(FishckptError):
    """A checkpoint belongs to a store with a different base or mask."""


class StateMismatchError(FishckptError):
    """A state dict differs from the base in keys, shapes or dtypes."""


class StepNotFoundError(FishckptError, KeyError):
    """The requested step is not in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StepExistsError(FishckptError):
    """A step is already saved and overwriting was not asked for."""


class StoreExistsError(FishckptError):
    """A store (or other files) already exists where a new store was to be created."""


class StoreLockedError(FishckptError):
    """Another process holds the store's write lock."""


class OutsideMaskWarning(UserWarning):
    """A saved state changed entries outside the mask; they were stored too."""
