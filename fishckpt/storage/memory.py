"""An in-memory backend: the store's own test suite runs on it, and it needs no disk."""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Collection, Iterator

from ..errors import StoreLockedError
from .base import ObjectInfo, Pieces, RootState, Storage

_versions = itertools.count(1)


class MemoryStorage(Storage):
    """A store held in a dict in this process; atomic by construction, gone when the object is."""

    def __init__(self, name: str = "memory") -> None:
        self._name = name
        self._objects: dict[str, bytes] = {}
        self._versions: dict[str, int] = {}
        self._guard = threading.Lock()
        self._writer = threading.Lock()

    @property
    def url(self) -> str:
        return f"memory://{self._name}"

    def _get(self, name: str) -> bytes:
        with self._guard:
            try:
                return self._objects[name]
            except KeyError:
                raise FileNotFoundError(f"{self.where(name)}: no such object") from None

    def read(self, name: str) -> bytes:
        return self._get(name)

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        return self._get(name)[start:stop]

    def map(
        self,
        name: str,
        *,
        cache_key: str | None = None,
        verify: Callable[[memoryview], None] | None = None,
        refresh: bool = False,
    ) -> memoryview:
        return memoryview(bytearray(self._get(name)))

    def stat(self, name: str) -> ObjectInfo | None:
        with self._guard:
            data = self._objects.get(name)
            return None if data is None else ObjectInfo(len(data), self._versions[name])

    def list(self, folder: str) -> list[str]:
        prefix = folder.rstrip("/") + "/" if folder else ""
        with self._guard:
            return [
                name[len(prefix) :]
                for name in self._objects
                if name.startswith(prefix) and "/" not in name[len(prefix) :]
            ]

    def publish(self, name: str, pieces: Pieces, *, overwrite: bool) -> int:
        data = b"".join(bytes(piece) for piece in pieces)
        with self._guard:
            if name in self._objects and not overwrite:
                raise FileExistsError(f"{self.where(name)}: already exists")
            self._objects[name] = data
            self._versions[name] = next(_versions)
        return len(data)

    def delete(self, name: str) -> None:
        with self._guard:
            if self._objects.pop(name, None) is None:
                raise FileNotFoundError(f"{self.where(name)}: no such object")
            del self._versions[name]

    @contextlib.contextmanager
    def lock(self, *, timeout: float = 0.0) -> Iterator[None]:
        acquired = self._writer.acquire(timeout=timeout) if timeout > 0 else self._writer.acquire(blocking=False)
        if not acquired:
            raise StoreLockedError(f"{self.url}: another writer holds this store's lock; wait for it to finish")
        try:
            yield
        finally:
            self._writer.release()

    def root_state(self, markers: Collection[str], owned: Collection[str] = ()) -> RootState:
        with self._guard:
            if any(marker in self._objects for marker in markers):
                return RootState.STORE
            leftovers = [name for name in self._objects if name.split("/")[0] not in owned]
            return RootState.OTHER if leftovers else RootState.EMPTY

    @contextlib.contextmanager
    def new_root(
        self, *, replace: bool, marker: str, owned: Collection[str] = (), timeout: float = 0.0
    ) -> Iterator[Storage]:
        staging = MemoryStorage(self._name)
        yield staging
        with self.lock(timeout=timeout) if replace else contextlib.nullcontext(), self._guard:
            self._objects = dict(staging._objects)
            self._versions = dict(staging._versions)
