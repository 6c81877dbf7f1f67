"""The one interface through which a store reads and writes every byte: ``Storage``.

A store names its files with relative keys (``"fishckpt.json"``,
``"steps/step-000000000010.fishckpt"``); a backend maps them to where the bytes
live. The store never touches ``os`` or ``Path`` itself, so a new backend
(object storage through fsspec) plugs in here with no change to the store.

The shape follows PyTorch DCP's ``FileSystemBase`` and fsspec's
``AbstractFileSystem``: whole and ranged reads, a mapping where the backend has
one, listing, and deletes; plus the two things a store needs that they leave to
the caller: an *atomic publish* (a name appears complete or not at all, and a
create never clobbers a racing writer) and a *writer lock*.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Collection, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import Enum

Pieces = Iterable[bytes | memoryview]


@dataclass(frozen=True)
class ObjectInfo:
    """What ``stat`` knows of a stored object: its size and a token that changes when it is replaced."""

    size: int
    version: object


class RootState(Enum):
    """What a store location holds before a store is created there."""

    MISSING = "missing"
    EMPTY = "empty"
    STORE = "store"  # holds a store's commit marker
    OTHER = "other"  # holds other files
    NOT_A_FOLDER = "not a folder"


class Storage(abc.ABC):
    """Where one store's bytes live. Keys are ``/``-separated names relative to the store root.

    Missing objects raise ``FileNotFoundError`` from every read; ``publish`` of an
    existing name without ``overwrite`` raises ``FileExistsError`` and changes nothing.
    """

    #: Whether ``map`` serves a remote object from a local cache (``refresh`` then reads the stored object).
    caches_objects: bool = False
    #: Whether ``new_root(replace=True)`` swaps stores at once, the old one readable until the swap.
    atomic_replace: bool = True

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The store's location as the user gave it, for messages."""

    def where(self, name: str) -> str:
        """The full location of ``name``, for messages."""
        return f"{self.url.rstrip('/')}/{name}"

    # Reading -----------------------------------------------------------------------------------

    @abc.abstractmethod
    def read(self, name: str) -> bytes:
        """The whole object."""

    @abc.abstractmethod
    def read_range(self, name: str, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of the object (fewer where it is shorter)."""

    @abc.abstractmethod
    def map(
        self,
        name: str,
        *,
        cache_key: str | None = None,
        verify: Callable[[memoryview], None] | None = None,
        refresh: bool = False,
    ) -> memoryview:
        """The object's bytes as a writable buffer, copy-on-write: writes never reach the stored object.

        A local file is memory-mapped, so nothing is read until used. A remote backend
        downloads the object once per machine into a local cache under ``cache_key`` (a
        digest of the content: the same key always means the same bytes), calls ``verify``
        on a fresh download before keeping it (``verify`` raises to refuse it, and nothing
        is kept), and maps the cached file. ``refresh`` downloads and verifies the stored
        object again even when a cached copy exists, and replaces that copy only if the
        download passes (``verify`` of a store checks the bucket, not this machine's cache).
        Local backends ignore all three.
        """

    @abc.abstractmethod
    def stat(self, name: str) -> ObjectInfo | None:
        """Size and version of ``name``, or None if there is no such object."""

    @abc.abstractmethod
    def list(self, folder: str) -> list[str]:
        """Names of the objects directly in ``folder`` (relative to it); empty if there is none."""

    # Writing -----------------------------------------------------------------------------------

    @abc.abstractmethod
    def publish(self, name: str, pieces: Pieces, *, overwrite: bool) -> int:
        """Writes ``pieces`` as ``name``, all at once: readers see the old state or the whole new object.

        Returns:
            The number of bytes written.

        Raises:
            FileExistsError: ``name`` exists and ``overwrite`` is false; nothing changed.
        """

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Removes ``name``; ``FileNotFoundError`` if it is not there."""

    @abc.abstractmethod
    def lock(self, *, timeout: float = 0.0) -> AbstractContextManager[None]:
        """Holds the store's writer lock, waiting up to ``timeout`` seconds; then raises StoreLockedError."""

    def remove_stale_temps(self, folder: str) -> None:  # noqa: B027  # optional: not every backend has temps
        """Deletes what interrupted writes left in ``folder``. Call only while holding the lock."""

    def make_folder(self, folder: str) -> None:  # noqa: B027  # optional: object stores have no folders
        """Creates ``folder``, where the backend has folders."""

    # The store's life cycle --------------------------------------------------------------------

    @abc.abstractmethod
    def root_state(self, markers: Collection[str], owned: Collection[str] = ()) -> RootState:
        """What the location holds.

        Args:
            markers: Names whose presence makes it a store.
            owned: Top-level names a store creates: a location holding only these (what an
                interrupted create leaves) and temp files counts as EMPTY.
        """

    @abc.abstractmethod
    def new_root(
        self, *, replace: bool, marker: str, owned: Collection[str] = (), timeout: float = 0.0
    ) -> AbstractContextManager[Storage]:
        """A place to build a new store that appears at this location all at once when the block ends.

        Yields the storage to write the new store into; ``marker`` (its commit marker)
        must be made visible last. If the block raises, nothing of it remains. With
        ``replace``, the store at this location is swapped out under its writer lock
        (waiting up to ``timeout`` seconds); otherwise anything ``root_state`` counted
        as an interrupted create's leftovers (``owned`` names) is removed first.

        Object storage has no folder rename: ``FsspecStorage`` builds in place, and the
        store appears at once because the store publishes its marker (the manifest) last.
        There, a builder killed midway leaves objects without a marker (docs/storage.md).
        """
