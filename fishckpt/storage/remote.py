"""Object storage and other fsspec file systems (``s3://``, ``memory://``, ``file://``, ...) behind ``Storage``.

The commit rule (docs/storage.md) without rename:

- **S3**: every object is one ``PutObject``, or one multipart upload completed by one
  request; either becomes visible whole or not at all. A create-only publish sends
  ``If-None-Match: *``, so of two writers racing for one name the server lets exactly
  one succeed and answers the other 412, which becomes ``FileExistsError`` (and the
  store's ``StepExistsError``). That conditional create is what replaces ``flock``:
  ``lock`` here only excludes other writers in this process.
- **Other fsspec file systems** (``file://``, ``memory://``, ...): the bytes go to a hidden
  temp name beside the target, then ``mv``; a create checks that the target is absent
  first. Visible all at once where ``mv`` is a rename; two writers in different
  processes racing for one name may both succeed (last one wins).
- A store is created in place, its manifest last (new_root); there is no folder rename.

The base is downloaded once per machine into a local cache keyed by the digest the
store passes as ``cache_key``; ``verify`` runs on every fresh download before it is
kept. Every failure of the remote side reaches the caller as ``StorageError`` naming
the URL, except the two the interface defines: ``FileNotFoundError`` for a missing
object and ``FileExistsError`` for a create that lost.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import re
import secrets
import tempfile
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import StorageError, StoreExistsError, StoreLockedError
from .base import ObjectInfo, Pieces, RootState, Storage

T = TypeVar("T")

TEMP_PREFIX = ".tmp-"
INSTALL_HINT = "pip install 'fishckpt[remote]'"
S3_PROTOCOLS = ("s3", "s3a")
# Pieces are gathered in memory up to this size (step files: O(k)); a larger object (the base)
# is spooled to a local temp file in the cache folder and uploaded from there.
SPOOL_IN_MEMORY_BYTES = 64 << 20
# The base is downloaded in ranged parts, a few at once: parallel streams help on real object
# stores, and memory stays bounded (parts x size).
DOWNLOAD_PART_BYTES = 32 << 20
DOWNLOAD_PARTS_AT_ONCE = 4
# botocore's "standard" retry mode: exponential backoff with jitter for throttling (SlowDown, 429,
# 503) and dropped connections. s3fs retries SlowDown around that, 5 times, so a request that is
# throttled every time gives up after at most 5 x 3 attempts (at most about 17 s of waiting).
DEFAULT_S3_RETRIES = {"mode": "standard", "total_max_attempts": 3}

_THROTTLED = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "TooManyRequests",
    "ServiceUnavailable",
    "429",
    "503",
}
_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "403",
}
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
_NETWORK = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ProxyConnectionError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ClientPayloadError",
    "FSTimeoutError",
}

# One writer lock per store location in this process. Object stores have no flock; across
# processes the conditional create keeps racing saves apart (see the module docstring).
_process_locks: dict[str, threading.Lock] = {}
_process_locks_guard = threading.Lock()


def url_scheme(location: str) -> str | None:
    """The scheme of ``location`` if it is a URL (``s3://...``, ``memory://...``), else None.

    A drive letter (``C:/``) is not a scheme, so only names of two or more characters count.
    """
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]+)://", location)
    return match.group(1).lower() if match else None


def default_cache_dir() -> Path:
    """Where downloaded bases are kept: ``$XDG_CACHE_HOME/fishckpt/bases``, else ``~/.cache/fishckpt/bases``."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "fishckpt" / "bases"


def _options_for(protocol: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The caller's fsspec options, plus our defaults for S3 where the caller set none."""
    options = dict(storage_options or {})
    if protocol in S3_PROTOCOLS:
        # Listings are cached per process by default; another process's new step would be missed.
        options.setdefault("use_listings_cache", False)
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", dict(DEFAULT_S3_RETRIES))
        options["config_kwargs"] = config
    return options


def _map_copy(path: Path) -> memoryview:
    """``path`` mapped copy-on-write (pages read on first use; writes stay private)."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return memoryview(bytearray())  # mmap cannot map an empty file
        return memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY))


def _cache_file_name(cache_key: str) -> str:
    """A file name for ``cache_key``: the key itself where it is a plain token, else its sha256."""
    if re.fullmatch(r"[A-Za-z0-9._\-]{1,120}", cache_key) and not cache_key.startswith("."):
        return cache_key
    return hashlib.sha256(cache_key.encode()).hexdigest()


# Error translation -------------------------------------------------------------------------------


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _server_code(error: BaseException) -> tuple[str | None, str | None, int | None]:
    """The S3 error code, message and HTTP status of the first botocore ClientError in the chain."""
    for link in _chain(error):
        response = getattr(link, "response", None)
        if isinstance(response, dict):
            details = response.get("Error") or {}
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            return details.get("Code"), details.get("Message"), status
    return None, None, None


def _class_names(error: BaseException) -> set[str]:
    return {cls.__name__ for link in _chain(error) for cls in type(link).__mro__}


def precondition_failed(error: BaseException) -> bool:
    """Whether a write was refused because its ``If-None-Match: *`` did not hold (the object exists)."""
    code, _, status = _server_code(error)
    return code == "PreconditionFailed" or status == 412 or isinstance(error, FileExistsError)


class FsspecStorage(Storage):
    """A store at an fsspec URL; S3 gets conditional writes, every backend a local cache of the base.

    Example:
        >>> storage = FsspecStorage("s3://bucket/run1", storage_options={"profile": "training"})
        >>> store = CheckpointStore.open(storage)
    """

    caches_objects = True
    atomic_replace = False  # no folder rename on object storage: new_root(replace=True) deletes first

    def __init__(
        self,
        url: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        scheme = url_scheme(url)
        if scheme is None:
            raise StorageError(f"{url}: not a URL (scheme://...); pass a local path for a local store")
        self._url = url.rstrip("/")
        self._scheme = scheme
        self._fs, root = _file_system(url, scheme, _options_for(scheme, storage_options))
        self._root = root.rstrip("/")
        self._conditional = scheme in S3_PROTOCOLS
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._published: list[str] | None = None  # names written inside new_root, to undo on failure

    @property
    def url(self) -> str:
        return self._url

    @property
    def conditional_writes(self) -> bool:
        """Whether a create is decided by the server (``If-None-Match: *``) rather than check-then-write."""
        return self._conditional

    def _path(self, name: str) -> str:
        return f"{self._root}/{name}" if name else self._root

    def _call(self, what: str, name: str | None, action: Callable[[], T]) -> T:
        """Runs one file-system call; every failure but a missing object or a lost create becomes StorageError."""
        where = self.where(name) if name else self._url
        try:
            return action()
        except StorageError:
            raise
        except Exception as error:
            translated = self._translate(error, what, where)
            if translated is error:
                raise
            raise translated from None  # the message quotes the server's answer; no botocore traceback

    def _translate(self, error: Exception, what: str, where: str) -> Exception:
        code, message, status = _server_code(error)
        names = _class_names(error)
        detail = f"{code}: {message}" if code else f"{type(error).__name__}: {error}"
        if code == "NoSuchBucket":
            bucket = self._root.split("/", 1)[0]
            return StorageError(
                f"{where}: bucket {bucket!r} does not exist at this endpoint; create it first "
                "(fishckpt never creates buckets), or check the URL and AWS_ENDPOINT_URL"
            )
        if isinstance(error, FileNotFoundError):
            return error
        if isinstance(error, FileExistsError) or (what == "create" and precondition_failed(error)):
            return error if isinstance(error, FileExistsError) else FileExistsError(f"{where}: already exists")
        if not self._conditional:  # a local or in-memory file system: its own error says it all
            return StorageError(f"{where}: {what} failed ({type(error).__name__}: {error})")
        if names & _NO_CREDENTIALS:
            return StorageError(
                f"{where}: no credentials found for {what}. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or AWS_PROFILE, or pass storage_options={'key': ..., 'secret': ...} ("
                f"{type(error).__name__}: {error})"
            )
        if code in _DENIED or status == 403 or isinstance(error, PermissionError):
            return StorageError(
                f"{where}: access denied for {what} ({detail}). Check the credentials (AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or storage_options) and that they may use this bucket"
            )
        if code in _THROTTLED or status in (429, 503) or getattr(error, "errno", None) == errno.EBUSY:
            return StorageError(
                f"{where}: the server kept throttling {what} requests ({detail}) after retrying with backoff; "
                "try again later, or raise config_kwargs={'retries': {'total_max_attempts': N}} in storage_options"
            )
        if names & _NETWORK or isinstance(error, ConnectionError | TimeoutError):
            return StorageError(
                f"{where}: cannot reach the storage endpoint for {what} ({type(error).__name__}: {error}). "
                "Check the network and the endpoint (AWS_ENDPOINT_URL or storage_options['client_kwargs'])"
            )
        return StorageError(f"{where}: {what} failed ({detail})")

    # Reading -----------------------------------------------------------------------------------

    def read(self, name: str) -> bytes:
        """The whole object in one GET (what the store reads whole is O(k): manifest, mask, a step)."""
        # Left to itself, s3fs first sends a HEAD to decide whether to split the read into ranges.
        options = {"max_concurrency": 1} if self._conditional else {}
        data: bytes = self._call("read", name, lambda: self._fs.cat_file(self._path(name), **options))
        return data

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)``, fetched with one ranged request (``Range: bytes=start-(stop-1)``)."""
        if stop <= start:
            self.stat_required(name)
            return b""

        def fetch() -> bytes:
            try:
                found: bytes = self._fs.cat_file(self._path(name), start=start, end=stop)
            except Exception as error:
                code, _, status = _server_code(error)
                if code == "InvalidRange" or status == 416:  # starts at or past the end
                    self.stat_required(name)
                    return b""
                raise
            return found

        return self._call("ranged read", name, fetch)

    def stat_required(self, name: str) -> ObjectInfo:
        """``stat``, raising FileNotFoundError where the object is missing."""
        found = self.stat(name)
        if found is None:
            raise FileNotFoundError(f"{self.where(name)}: no such object")
        return found

    def map(
        self,
        name: str,
        *,
        cache_key: str | None = None,
        verify: Callable[[memoryview], None] | None = None,
        refresh: bool = False,
    ) -> memoryview:
        """The object's bytes; with ``cache_key``, from the local cache, downloading and verifying it once."""
        if cache_key is None:
            return memoryview(bytearray(self.read(name)))
        cached = self.cache_dir / _cache_file_name(cache_key)
        if refresh or not cached.is_file():
            self._download(name, cached, verify)
        return _map_copy(cached)

    def cache_path(self, cache_key: str) -> Path:
        """Where the object cached under ``cache_key`` lies (whether or not it is there yet)."""
        return self.cache_dir / _cache_file_name(cache_key)

    def _download(self, name: str, cached: Path, verify: Callable[[memoryview], None] | None) -> None:
        """Downloads ``name`` beside ``cached``, verifies it, then renames it into place.

        Two processes may download the same object at once; both rename identical
        verified bytes into place, so either result is right.
        """
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(
                f"{self.where(name)}: cannot create the cache folder {self.cache_dir} ({error}); "
                "pass cache_dir= to choose another"
            ) from error
        temp = cached.with_name(f"{TEMP_PREFIX}{secrets.token_hex(8)}-{cached.name}")
        try:
            self._fetch(name, temp)
            if verify is not None:
                verify(_map_copy(temp))
            os.replace(temp, cached)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()

    def _fetch(self, name: str, local: Path) -> None:
        """Writes object ``name`` to ``local`` with ranged GETs, DOWNLOAD_PARTS_AT_ONCE at a time.

        s3fs's own ``get_file`` opens a GET of the whole object and, for a large one, drops it
        to start ranged parts instead: a request and some bytes wasted. An object that changes
        size meanwhile yields a short file, which ``verify`` refuses.
        """
        path = self._path(name)
        size = self.stat_required(name).size
        batch = DOWNLOAD_PART_BYTES * DOWNLOAD_PARTS_AT_ONCE
        with open(local, "wb") as out:
            for first in range(0, size, batch):
                starts = list(range(first, min(first + batch, size), DOWNLOAD_PART_BYTES))
                ends = [min(start + DOWNLOAD_PART_BYTES, size) for start in starts]
                parts: list[bytes] = self._call(
                    "download",
                    name,
                    lambda starts=starts, ends=ends: self._fs.cat_ranges(  # type: ignore[misc]
                        [path] * len(starts), starts, ends, on_error="raise"
                    ),
                )
                for part in parts:
                    out.write(part)

    def stat(self, name: str) -> ObjectInfo | None:
        try:
            info: dict[str, Any] = self._call("stat", name, lambda: self._info(self._path(name)))
        except FileNotFoundError:
            return None
        if info.get("type") != "file":
            return None
        # ETag and modification time tell a replaced object from the old one on every backend we know.
        version = tuple(
            str(info.get(key)) for key in ("ETag", "LastModified", "mtime", "created", "ino") if key in info
        )
        return ObjectInfo(int(info["size"]), (int(info["size"]), *version))

    def _info(self, path: str) -> dict[str, Any]:
        """What ``stat`` needs. On S3 one HEAD: s3fs's ``info`` follows a 404 with a LIST, to
        look for a "directory" of that name, which a store's object names never are."""
        if not self._conditional:
            found: dict[str, Any] = self._fs.info(path)
            return found
        bucket, key, _ = self._fs.split_path(path)
        head = self._fs.call_s3("head_object", Bucket=bucket, Key=key)
        return {
            "type": "file",
            "size": head["ContentLength"],
            "ETag": head.get("ETag"),
            "LastModified": head.get("LastModified"),
        }

    def list(self, folder: str) -> list[str]:
        path = self._path(folder.rstrip("/"))
        try:
            found: list[str] = self._call("list", folder, lambda: self._fs.ls(path, detail=False))
        except FileNotFoundError:
            return []
        base = self._fs._strip_protocol(path).rstrip("/") + "/"
        names = []
        for entry in found:
            relative = self._fs._strip_protocol(entry).rstrip("/")
            if relative.startswith(base):
                relative = relative[len(base) :]
                if relative and "/" not in relative:
                    names.append(relative)
        return names

    # Writing -----------------------------------------------------------------------------------

    def publish(self, name: str, pieces: Pieces, *, overwrite: bool) -> int:
        path = self._path(name)
        with self._spooled(pieces) as (data, local, size):
            if self._conditional:
                mode = "overwrite" if overwrite else "create"
                self._call("create" if not overwrite else "upload", name, lambda: self._upload(path, data, local, mode))
            else:
                self._publish_by_rename(name, path, data, local, overwrite=overwrite)
        if self._published is not None:
            self._published.append(name)
        return size

    def _upload(self, path: str, data: bytes | None, local: Path | None, mode: str) -> None:
        """One atomic upload: a single PUT, or a multipart upload completed in one request (s3fs)."""
        if local is not None:
            self._fs.put_file(str(local), path, mode=mode)
        else:
            self._fs.pipe_file(path, data, mode=mode)

    def _publish_by_rename(
        self, name: str, path: str, data: bytes | None, local: Path | None, *, overwrite: bool
    ) -> None:
        parent, _, leaf = path.rpartition("/")
        temp = f"{parent}/{TEMP_PREFIX}{secrets.token_hex(8)}-{leaf}"
        try:
            self._call("upload", name, lambda: self._upload(temp, data, local, "overwrite"))
            if not overwrite and self.stat(name) is not None:
                raise FileExistsError(f"{self.where(name)}: already exists")
            self._call("rename", name, lambda: self._fs.mv(temp, path))
        except BaseException:
            with contextlib.suppress(Exception):
                self._fs.rm_file(temp)
            raise

    @contextlib.contextmanager
    def _spooled(self, pieces: Pieces) -> Iterator[tuple[bytes | None, Path | None, int]]:
        """The pieces as bytes in memory, or as a local temp file once they exceed SPOOL_IN_MEMORY_BYTES."""
        held: list[bytes] = []
        size = 0
        spool = None
        spool_path: Path | None = None
        try:
            for piece in pieces:
                size += len(piece)
                if spool is None:
                    held.append(bytes(piece))
                    if size > SPOOL_IN_MEMORY_BYTES:
                        self.cache_dir.mkdir(parents=True, exist_ok=True)
                        descriptor, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".upload", dir=self.cache_dir)
                        spool_path = Path(name)
                        spool = os.fdopen(descriptor, "wb")
                        for part in held:
                            spool.write(part)
                        held = []
                else:
                    spool.write(piece)
            if spool is not None:
                spool.close()
                yield None, spool_path, size
            else:
                yield b"".join(held), None, size
        finally:
            if spool is not None:
                spool.close()
            if spool_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    spool_path.unlink()

    def delete(self, name: str) -> None:
        self.stat_required(name)  # S3 answers a delete of a missing key with success
        self._call("delete", name, lambda: self._fs.rm_file(self._path(name)))

    def lock(self, *, timeout: float = 0.0) -> contextlib.AbstractContextManager[None]:
        """Excludes other writers of this store in this process only (see the module docstring)."""
        with _process_locks_guard:
            held = _process_locks.setdefault(f"{self._scheme}://{self._root}", threading.Lock())
        return _holding(held, self._url, timeout)

    def remove_stale_temps(self, folder: str) -> None:
        """Nothing: a temp left by a killed writer is hidden and harmless, and deleting temps
        here could break another process's upload, which no lock excludes (docs/storage.md)."""

    def make_folder(self, folder: str) -> None:
        if not self._conditional:  # object stores have no folders
            self._call("make folder", folder, lambda: self._fs.makedirs(self._path(folder), exist_ok=True))

    # The store's life cycle --------------------------------------------------------------------

    def root_state(self, markers: Collection[str], owned: Collection[str] = ()) -> RootState:
        try:
            info: dict[str, Any] = self._call("stat", None, lambda: self._fs.info(self._root))
        except FileNotFoundError:
            if self._conditional:
                self._check_bucket()
            return RootState.MISSING
        if info.get("type") == "file":
            return RootState.NOT_A_FOLDER
        if any(self.stat(marker) is not None for marker in markers):
            return RootState.STORE
        return RootState.OTHER if self._holds_foreign(owned) else RootState.EMPTY

    def _holds_foreign(self, owned: Collection[str]) -> bool:
        """Whether anything is here beyond what an interrupted create of a store leaves (saved steps count)."""
        return any(name not in owned or (name == "steps" and self.list("steps")) for name in self.list(""))

    def _check_bucket(self) -> None:
        """A missing key and a missing bucket look alike to HEAD; listing the bucket tells them apart."""
        bucket = self._root.split("/", 1)[0]
        self._call("list", None, lambda: self._fs.ls(bucket, detail=False))

    @contextlib.contextmanager
    def new_root(
        self, *, replace: bool, marker: str, owned: Collection[str] = (), timeout: float = 0.0
    ) -> Iterator[Storage]:
        """Builds the store in place: there is no rename of a folder on object storage.

        The store publishes its manifest last, so the location becomes a store all at
        once. If the block raises, what it published is deleted again; a writer killed
        mid-create leaves objects without a manifest, which ``root_state`` reports as
        OTHER (delete them to create a store there). With ``replace``, every object of
        the old store is deleted first: not atomic, and readers of the old store then
        get errors, never wrong weights (docs/storage.md).
        """
        with self.lock(timeout=timeout):
            if replace:
                self._remove_store(marker)
            else:
                leftovers = [name for name in self.list("") if name in owned and name != "steps"]
                if leftovers:  # what a killed create left here: no manifest, so no store
                    self._call("delete", None, lambda: self._fs.rm([self._path(name) for name in leftovers]))
            if not self._conditional:
                self._call("make folder", None, lambda: self._fs.makedirs(self._root, exist_ok=True))
            staging = FsspecStorage.__new__(FsspecStorage)
            staging.__dict__.update(self.__dict__)
            staging._published = []
            try:
                yield staging
            except FileExistsError as error:
                self._undo(staging._published)
                raise StoreExistsError(
                    f"{self._url}: another process created a store here at the same time ({error})"
                ) from None
            except BaseException:
                self._undo(staging._published)
                raise

    def _undo(self, names: Sequence[str]) -> None:
        for name in reversed(names):
            with contextlib.suppress(Exception):
                self._fs.rm_file(self._path(name))

    def _remove_store(self, marker: str) -> None:
        """Deletes every object under the root (the store being replaced), its manifests first, so that
        readers find no store rather than part of one; the rest in one batch where the backend has one."""
        for name in (marker, "fishckpt.json"):
            if self.stat(name) is not None:
                self._call("delete", name, lambda name=name: self._fs.rm_file(self._path(name)))  # type: ignore[misc]
        found: Sequence[str] = self._call("list", None, lambda: self._fs.find(self._root))
        if found:
            self._call("delete", None, lambda: self._fs.rm(found))


@contextlib.contextmanager
def _holding(held: threading.Lock, url: str, timeout: float) -> Iterator[None]:
    if not (held.acquire(timeout=timeout) if timeout > 0 else held.acquire(blocking=False)):
        raise StoreLockedError(f"{url}: another writer in this process is writing to this store; wait for it to finish")
    try:
        yield
    finally:
        held.release()


def _file_system(url: str, scheme: str, options: dict[str, Any]) -> tuple[Any, str]:
    """fsspec's file system for ``url``, or a StorageError naming what to install."""
    try:
        import fsspec
    except ImportError:
        raise StorageError(f"{url}: {scheme}:// stores need fsspec; install it with {INSTALL_HINT}") from None
    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError:
        raise StorageError(
            f"{url}: no fsspec backend handles {scheme}://; use s3://, file://, memory:// or a local path"
        ) from None
    except ImportError as error:
        hint = INSTALL_HINT if scheme in S3_PROTOCOLS else f"{INSTALL_HINT} and the package fsspec names: {error}"
        raise StorageError(f"{url}: {scheme}:// stores need a package that is not installed; {hint}") from None
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except (TypeError, ValueError) as error:
        raise StorageError(f"{url}: storage_options were refused: {error}") from None
    return fs, str(root)
