"""Where a store's bytes live: the ``Storage`` interface and its backends."""

from __future__ import annotations

from pathlib import Path

from .base import ObjectInfo, RootState, Storage
from .local import LocalStorage
from .memory import MemoryStorage

__all__ = ["LocalStorage", "MemoryStorage", "ObjectInfo", "RootState", "Storage", "open_storage"]


def open_storage(location: str | Path | Storage) -> Storage:
    """The backend for a store location: a ``Storage`` as given, or a local folder."""
    if isinstance(location, Storage):
        return location
    return LocalStorage(location)
