"""The optional C extension (store/_native.c), found without importing torch."""

from __future__ import annotations

from types import ModuleType

module: ModuleType | None
try:
    from . import _native as module
except ImportError:  # built without a C compiler: the torch loops give identical results
    module = None


def available() -> bool:
    """Whether the C extension was built; without it an exact-check save takes about twice as long."""
    return module is not None
