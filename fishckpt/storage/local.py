"""The local POSIX backend: temp file, fsync, link or rename, directory fsync, and ``flock``."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import secrets
import shutil
import time
from collections.abc import Callable, Collection, Iterable, Iterator
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
def exclusive_lock(lock_path: Path, *, timeout: float = 0.0) -> Iterator[None]:
    """Holds an exclusive advisory lock on ``lock_path``, waiting up to ``timeout`` seconds for it.

    The wait polls with a growing sleep (1 ms to 50 ms), so a waiting writer costs
    nothing noticeable. fcntl locks are released by the kernel when the holder dies,
    so a killed writer never leaves the store locked.

    Raises:
        StoreLockedError: Another process still held the lock when the time ran out.
    """
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            break
        except FileNotFoundError:
            # The folder is being swapped by a create with overwrite (two renames): wait for it.
            if time.monotonic() > deadline + 1.0:
                raise
            time.sleep(0.001)
    try:
        pause = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    waited = f" for {timeout:g} s" if timeout > 0 else ""
                    raise StoreLockedError(
                        f"{lock_path.parent}: another process is writing to this store (it holds "
                        f"{lock_path.name}; waited{waited or ' not at all'}); wait for it to finish and retry, "
                        "pass a longer lock_timeout (CLI: --wait), or save into another store"
                    ) from error
                time.sleep(min(pause, left))
                pause = min(pause * 2, 0.05)
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
        if self.root.name in ("", ".", ".."):  # ".", "..", "/": name the folder itself
            self.root = Path(os.path.abspath(self.root))

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
        self,
        name: str,
        *,
        cache_key: str | None = None,
        verify: Callable[[memoryview], None] | None = None,
        refresh: bool = False,
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

    def lock(self, *, timeout: float = 0.0) -> contextlib.AbstractContextManager[None]:
        return exclusive_lock(self.root / LOCK_NAME, timeout=timeout)

    def remove_stale_temps(self, folder: str) -> None:
        remove_stale_temps(self.root / folder)

    def make_folder(self, folder: str) -> None:
        """Creates ``folder`` (used while building a new store)."""
        (self.root / folder).mkdir()
        fsync_dir(self.root / folder)

    # The store's life cycle --------------------------------------------------------------------

    def root_state(self, markers: Collection[str], owned: Collection[str] = ()) -> RootState:
        root = self.root
        if not root.exists():
            return RootState.NOT_A_FOLDER if root.is_symlink() else RootState.MISSING
        if not root.is_dir():
            return RootState.NOT_A_FOLDER
        if any((root / marker).is_file() for marker in markers):
            return RootState.STORE
        leftovers = [entry for entry in root.iterdir() if not _interrupted_create(entry, owned)]
        return RootState.OTHER if leftovers else RootState.EMPTY

    @contextlib.contextmanager
    def new_root(
        self, *, replace: bool, marker: str, owned: Collection[str] = (), timeout: float = 0.0
    ) -> Iterator[Storage]:
        """Builds the new store in a hidden sibling folder, then makes it appear whole.

        A missing target: the folder is renamed into place. An existing empty target
        (one holding only an interrupted create's leftovers counts as empty): the
        leftovers go, then the new files move in with ``marker`` last, so the folder
        itself stays (a shell whose working directory it is keeps working). A store to
        replace: under its writer lock, it is renamed away and the new folder into place.
        A create killed at any point leaves no store, and its hidden folder is removed
        by the next create of the same path.
        """
        path = self.root.absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_staging(path)
        staging = temp_path_for(path)
        staging.mkdir()
        try:
            # Held while building: tells a create of the same path that this folder is not abandoned.
            with exclusive_lock(staging / LOCK_NAME):
                yield LocalStorage(staging)
                fsync_dir(staging)
                if replace:
                    with exclusive_lock(path / LOCK_NAME, timeout=timeout):
                        retired = temp_path_for(path)
                        path.rename(retired)
                        staging.rename(path)
                    shutil.rmtree(retired)
                elif path.is_dir():
                    for entry in list(path.iterdir()):
                        if _interrupted_create(entry, owned):
                            _remove(entry)
                    moved = sorted(
                        (entry for entry in staging.iterdir() if entry.name != LOCK_NAME),
                        key=lambda entry: entry.name == marker,  # the marker last
                    )
                    for entry in moved:
                        entry.rename(path / entry.name)
                    fsync_dir(path)
                    (staging / LOCK_NAME).unlink()
                    staging.rmdir()
                else:
                    staging.rename(path)
            fsync_dir(path.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _interrupted_create(entry: Path, owned: Collection[str]) -> bool:
    """Whether a folder entry is what a killed create or write leaves: a temp file, or an owned name.

    An owned folder counts only if it is empty, so saved steps are never taken for leftovers.
    """
    if entry.name.startswith(TEMP_PREFIX) or entry.name == LOCK_NAME:
        return True
    if entry.name not in owned:
        return False
    return not entry.is_dir() or entry.is_symlink() or not any(entry.iterdir())


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink(missing_ok=True)


def _remove_abandoned_staging(path: Path) -> None:
    """Removes hidden folders that creates of ``path`` left when killed: ones whose lock nobody holds."""
    suffix = f"-{path.name}"
    for entry in path.parent.iterdir():
        if not (entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(suffix) and entry.is_dir()):
            continue
        try:
            with exclusive_lock(entry / LOCK_NAME):
                shutil.rmtree(entry)
        except (StoreLockedError, FileNotFoundError, NotADirectoryError):
            continue  # a create in progress, or gone already
