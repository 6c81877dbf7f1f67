"""Every exception and warning type fishckpt raises; the errors are all rooted at FishckptError."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
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
]


class FishckptError(Exception):
    """Base class of every error fishckpt raises on purpose."""


class FormatError(FishckptError):
    """A file is not in a format this version of fishckpt can read."""


class MissingFileError(FishckptError, FileNotFoundError):
    """A file the caller named does not exist.

    It is also a FileNotFoundError, so code written against the usual Python convention still catches it.
    """

    def __str__(self) -> str:  # OSError would format its args as a tuple
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(FishckptError, ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` that brings it.

    It is also an ImportError, so code that guards optional imports the usual way still catches it.
    """


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
    """A state dict does not fit: keys, shapes or dtypes differ from the base, or a value is not a dense tensor."""


class StepNotFoundError(FishckptError, KeyError):
    """The requested step is not in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class StepExistsError(FishckptError):
    """A step is already saved and overwriting was not asked for."""


class StoreExistsError(FishckptError):
    """A store (or other files) already exists where a new store was to be created."""


class StorageError(FishckptError):
    """Where a store lives could not be used: missing credentials or bucket, the network, throttling, no backend.

    The message names the URL and says what to check; the server's own error code is quoted in it.
    """


class StoreLockedError(FishckptError):
    """Another process held the store's write lock for longer than the wait allowed."""


class StoreReplacedError(BaseMismatchError):
    """The store at a path was replaced (or removed) since this store object opened it; nothing was written."""


class OutsideMaskError(FishckptError):
    """A strict save found entries changed outside the mask; nothing was written."""


class OutsideMaskWarning(UserWarning):
    """A saved state changed entries outside the mask; they were stored too."""


class MaskLeakWarning(UserWarning):
    """An optimizer will move weights outside the mask (weight decay, or momentum left from earlier steps)."""


class UnshuffledDataWarning(UserWarning):
    """``fisher_scores`` was given data in a fixed order and will use only its first examples."""


class HeadNotTrainableWarning(UserWarning):
    """A mask leaves out part of what looks like the task head: a ``classifier``, ``fc``, ``lm_head`` or ``score``."""


@dataclass(frozen=True)
class VerifyFailure:
    """One problem ``verify`` found: the file, and the tensor where known."""

    file: Path | str
    tensor: str | None
    problem: str

    def __str__(self) -> str:
        where = f" (tensor {self.tensor!r})" if self.tensor else ""
        return f"{self.file}{where}: {self.problem}"


class VerifyError(IntegrityError):
    """Raised by ``verify``; ``failures`` lists every problem found, ``report`` what was checked."""

    def __init__(self, failures: list[VerifyFailure], report: object = None) -> None:
        self.failures = failures
        self.report = report
        lines = "\n".join(f"  {failure}" for failure in failures)
        super().__init__(f"{len(failures)} integrity problem(s):\n{lines}")
