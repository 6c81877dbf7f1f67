"""The exception and warning types fishckpt raises, all rooted at FishckptError."""

from __future__ import annotations

__all__ = [
    "BaseMismatchError",
    "FishckptError",
    "FormatError",
    "IntegrityError",
    "InvalidArgumentError",
    "MaskLeakWarning",
    "MaskMismatchError",
    "OutsideMaskError",
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


class InvalidArgumentError(FishckptError, ValueError):
    """An argument is out of range, conflicts with another, or is of an unsupported kind.

    It is also a ValueError, so code written against the usual Python convention still catches it.
    """


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


class OutsideMaskError(FishckptError):
    """A strict save found entries changed outside the mask; nothing was written."""


class OutsideMaskWarning(UserWarning):
    """A saved state changed entries outside the mask; they were stored too."""


class MaskLeakWarning(UserWarning):
    """An optimizer will move weights outside the mask (weight decay, or momentum left from earlier steps)."""
