"""Durable file writes (temp name, fsync, rename, directory fsync) and the store lock."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from ._errors import StoreLockedError

TEMP_PREFIX = ".tmp-"


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
