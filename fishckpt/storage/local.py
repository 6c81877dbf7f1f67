"""The local POSIX backend: temp file, fsync, link or rename, directory fsync, and ``flock``."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import StoreLockedError
from .base import ObjectInfo, Pieces, RootState, Storage

TEMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"


def fsync_dir(directory: Path) -> None:
    """Makes a rename or unlink inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(path: Path) -> Path:
    """A unique hidden name beside ``path``; the store ignores such names when listing."""
    return path.with_name(f"{TEMP_PREFIX}{secrets.token_hex(8)}-{path.name}")


@contextlib.contextmanager
def atomic_writer(path: Path, *, overwrite: bool) -> Iterator[BinaryIO]:
    """A file handle whose contents appear at ``path`` only if the block completes.

    The data goes to a temp name first and is fsynced; only then is it published
    and the directory fsynced. A new file is published with ``link()``, which
    fails if ``path`` exists, so a racing writer is never clobbered; with
    ``overwrite`` it is ``rename()``d over the old one. A crash or an exception
    at any point leaves at most a hidden temp file, never a partial ``path``.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false (nothing is changed).
    """
    temp = temp_path_for(path)
    try:
        with open(temp, "xb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(temp, path)
        else:
            os.link(temp, path)
            os.unlink(temp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path, pieces: Iterable[bytes | memoryview], *, overwrite: bool) -> int:
    """Writes ``pieces`` to ``path`` through ``atomic_writer``; returns the number of bytes written."""
    written = 0
    with atomic_writer(path, overwrite=overwrite) as handle:
        for piece in pieces:
            handle.write(piece)
            written += len(piece)
    return written


def remove_stale_temps(directory: Path) -> None:
    """Deletes temp files left by an interrupted write. Call only while holding the lock."""
    for entry in directory.iterdir():
        if entry.name.startswith(TEMP_PREFIX) and entry.is_file():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Holds an exclusive advisory lock on ``lock_path`` or raises StoreLockedError at once.

    fcntl locks are released by the kernel when the holder dies, so a killed
    writer never leaves the store locked.
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreLockedError(
                    f"{lock_path.parent}: another process is writing to this store "
                    f"(it holds {lock_path.name}); wait for it to finish, or save into another store"
                ) from error
            raise
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class LocalStorage(Storage):
    """A store in a local folder, with every guarantee of docs/format.md's commit rule."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def url(self) -> str:
        return str(self.root)

    def where(self, name: str) -> str:
        return str(self.root / name)

    def path(self, name: str) -> Path:
        """The local path of ``name``."""
        return self.root / name

    # Reading -----------------------------------------------------------------------------------

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        with open(self.root / name, "rb") as handle:
            handle.seek(start)
            return handle.read(max(0, stop - start))

    def map(
        self, name: str, *, cache_key: str | None = None, verify: Callable[[memoryview], None] | None = None
    ) -> memoryview:
        with open(self.root / name, "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                return memoryview(bytearray())  # mmap cannot map an empty file
            # ACCESS_COPY is MAP_PRIVATE: pages are read on first use, and writes stay private.
            return memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY))

    def stat(self, name: str) -> ObjectInfo | None:
        try:
            found = (self.root / name).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(found.st_size, (found.st_ino, found.st_mtime_ns, found.st_size))

    def list(self, folder: str) -> list[str]:
        try:
            return [entry.name for entry in (self.root / folder).iterdir()]
        except FileNotFoundError:
            return []

    # Writing -----------------------------------------------------------------------------------

    def publish(self, name: str, pieces: Pieces, *, overwrite: bool) -> int:
        return atomic_write(self.root / name, pieces, overwrite=overwrite)

    def delete(self, name: str) -> None:
        path = self.root / name
        path.unlink()
        fsync_dir(path.parent)

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return exclusive_lock(self.root / LOCK_NAME)

    def remove_stale_temps(self, folder: str) -> None:
        remove_stale_temps(self.root / folder)

    def make_folder(self, folder: str) -> None:
        """Creates ``folder`` (used while building a new store)."""
        (self.root / folder).mkdir()
        fsync_dir(self.root / folder)

    # The store's life cycle --------------------------------------------------------------------

    def root_state(self, marker: str) -> RootState:
        if not self.root.exists():
            return RootState.MISSING
        if not self.root.is_dir():
            return RootState.NOT_A_FOLDER
        if (self.root / marker).is_file():
            return RootState.STORE
        return RootState.OTHER if any(self.root.iterdir()) else RootState.EMPTY

    @contextlib.contextmanager
    def new_root(self, *, replace: bool) -> Iterator[Storage]:
        """Builds the new store in a hidden sibling folder, then renames it into place.

        An interrupted create therefore leaves nothing that looks like a store.
        """
        path = self.root
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = temp_path_for(path)
        staging.mkdir()
        try:
            yield LocalStorage(staging)
            fsync_dir(staging)
            if replace:
                retired = temp_path_for(path)
                path.rename(retired)
                staging.rename(path)
                shutil.rmtree(retired)
            else:
                if path.exists():
                    path.rmdir()  # an empty folder the caller made
                staging.rename(path)
            fsync_dir(path.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
