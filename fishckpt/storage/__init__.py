"""Where a store's bytes live: the ``Storage`` interface and its backends."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError, StorageError
from .base import ObjectInfo, RootState, Storage
from .local import LocalStorage
from .memory import MemoryStorage
from .remote import FsspecStorage, url_scheme  # fsspec itself is imported only when a URL is opened

__all__ = ["FsspecStorage", "LocalStorage", "MemoryStorage", "ObjectInfo", "RootState", "Storage", "open_storage"]

# "s3:/bucket/run" is what "s3://bucket/run" becomes after a trip through Path; it must never
# become a local folder named "s3:".
_COLLAPSED_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):/(?!/)")


def open_storage(
    location: str | Path | Storage,
    *,
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
) -> Storage:
    """The backend for a store location: a ``Storage`` as given, a URL through fsspec, or a local folder.

    Args:
        location: A local path (the POSIX backend, with flock and rename), a URL such as
            ``s3://bucket/run1``, ``file:///data/run1`` or ``memory://run1`` (fsspec,
            ``pip install 'fishckpt[remote]'``), or a ``Storage``.
        storage_options: fsspec keyword arguments for a URL (s3fs: ``key``, ``secret``,
            ``profile``, ``client_kwargs={"endpoint_url": ...}``, ...). Credentials and the
            endpoint also come the standard way: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
            AWS_PROFILE, AWS_ENDPOINT_URL.
        cache_dir: Where a remote store's base is cached (default ``~/.cache/fishckpt/bases``,
            or ``$XDG_CACHE_HOME/fishckpt/bases``); local stores need no cache and ignore it.

    Raises:
        StorageError: The URL's scheme has no installed fsspec backend (the message names the
            package to install), or the storage options were refused.
        InvalidArgumentError: Options were given for a location that takes none.

    Example:
        >>> open_storage("s3://bucket/run1", storage_options={"profile": "training"})
    """
    if isinstance(location, Storage):
        if storage_options:
            raise InvalidArgumentError("storage_options apply to a URL, not to a Storage object")
        return location
    text = str(location)
    if url_scheme(text) is not None:
        return FsspecStorage(text, storage_options=storage_options, cache_dir=cache_dir)
    collapsed = _COLLAPSED_URL.match(text)
    if collapsed:
        raise StorageError(
            f"{text}: looks like a {collapsed.group(1)}:// URL that lost a slash (a Path cannot hold '//'); "
            f"pass the URL as a string, e.g. '{collapsed.group(1)}://{text[collapsed.end() :]}'"
        )
    if storage_options:
        raise InvalidArgumentError(f"{text}: storage_options apply to URLs (s3://...), not to a local path")
    return LocalStorage(location)
