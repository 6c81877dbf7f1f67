"""Arguments and checks that several commands share."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    import torch

    from fishckpt import Catalog, CheckpointStore, Mask

PATH = click.Path(path_type=Path)
DEFAULT_WAIT = 30.0  # seconds; the library's own default lock_timeout


class StepNumber(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.2 on
    """A step: ASCII digits only (Python's int() would take full-width digits, and " 12", too)."""

    name = "step"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        text = str(value)
        if not text or not text.isascii() or not text.isdigit():
            self.fail(f"{text!r} is not a step number (a non-negative integer in ASCII digits)", param, ctx)
        return int(text)


STEP = StepNumber()

# The library's rule (docs/storage.md): a string with a scheme of two or more characters is a URL,
# so "C:/runs" stays a path. It is repeated here because a Path must never be made of a URL:
# Path("s3://bucket/run") is "s3:/bucket/run".
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+://")


def is_url(location: str | Path) -> bool:
    """Whether ``location`` is a URL (``s3://...``, ``memory://...``) rather than a local path."""
    return isinstance(location, str) and _URL.match(location) is not None


class StoreLocationType(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.2 on
    """STORE: a URL kept as text, or a local path (a Path, exactly as ``click.Path`` gave it)."""

    name = "store"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> Path | str:
        if isinstance(value, Path):
            return value
        text = os.fsdecode(value) if isinstance(value, bytes) else str(value)
        return text if is_url(text) else Path(text)


class StorageOptionType(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.2 on
    """``KEY=VALUE``: VALUE is JSON where it parses (``true``, ``3``, ``{"endpoint_url": ...}``), else text."""

    name = "key=value"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, Any]:
        if isinstance(value, tuple):
            return value
        text = str(value)
        key, equals, raw = text.partition("=")
        if not equals:
            self.fail(f"{text!r} is not KEY=VALUE (e.g. profile=training, anon=true)", param, ctx)
        if not key.isidentifier():
            self.fail(f"{key!r} is not an option name (a Python identifier, as fsspec takes them)", param, ctx)
        try:
            return key, json.loads(raw)
        except ValueError:
            return key, raw  # not JSON: the text itself (profile=training)


STORE_LOCATION = StoreLocationType()
STORAGE_OPTION = StorageOptionType()


@dataclass(frozen=True)
class StoreLocation:
    """Where STORE is and how to reach it: what every command opens or creates a store with.

    ``where`` is a local folder (a Path) or a URL (text); ``storage_options`` and ``cache_dir``
    go to the library with it (a local store takes no options and needs no cache).
    """

    where: Path | str
    storage_options: dict[str, Any] | None = None
    cache_dir: Path | None = None

    def __str__(self) -> str:
        """The location for messages, as the library writes it (``store.location``)."""
        return self.where.rstrip("/") if isinstance(self.where, str) else str(self.where)

    @property
    def is_url(self) -> bool:
        return isinstance(self.where, str)

    def catalog(self) -> Catalog:
        """The store's manifest and step headers (no torch import: ``ls``, ``report``)."""
        from fishckpt import Catalog

        return Catalog.open(self.where, storage_options=self.storage_options, cache_dir=self.cache_dir)

    def is_store(self) -> bool:
        from fishckpt import CheckpointStore

        return CheckpointStore.is_store(self.where, storage_options=self.storage_options)

    def open(self, *, lock_timeout: float = DEFAULT_WAIT) -> CheckpointStore:
        from fishckpt import CheckpointStore

        return CheckpointStore.open(
            self.where, lock_timeout=lock_timeout, storage_options=self.storage_options, cache_dir=self.cache_dir
        )

    def create(
        self, base: dict[str, torch.Tensor], mask: Mask, *, overwrite: bool, lock_timeout: float
    ) -> CheckpointStore:
        from fishckpt import CheckpointStore

        return CheckpointStore.create(
            self.where,
            base,
            mask,
            overwrite=overwrite,
            lock_timeout=lock_timeout,
            storage_options=self.storage_options,
            cache_dir=self.cache_dir,
        )


store_argument = click.argument("store_path", metavar="STORE", type=STORE_LOCATION)


def store_options(command: Callable[..., None]) -> Callable[..., None]:
    """Adds ``--storage-option`` and ``--cache-dir``, and hands the command ``store``, a StoreLocation.

    Goes last (nearest the function), so the two options come last in ``--help``; the command's
    STORE argument (``store_argument``) and these two become the one ``store`` parameter.
    """

    @functools.wraps(command)
    def with_store(
        *args: Any,
        store_path: Path | str,
        storage_options: tuple[tuple[str, Any], ...],
        cache_dir: Path | None,
        **kwargs: Any,
    ) -> None:
        command(*args, store=_location(store_path, storage_options, cache_dir), **kwargs)

    with_store = click.option(
        "--cache-dir",
        type=click.Path(file_okay=False, path_type=Path),
        metavar="DIR",
        help="Where a URL store's base is cached, downloaded once per machine (default ~/.cache/fishckpt/bases).",
    )(with_store)
    return click.option(
        "--storage-option",
        "storage_options",
        type=STORAGE_OPTION,
        multiple=True,
        metavar="KEY=VALUE",
        help="An fsspec/s3fs option for a URL store (repeatable); VALUE is JSON where it parses, "
        'e.g. anon=true or client_kwargs=\'{"endpoint_url": "http://..."}\'.',
    )(with_store)


def _location(where: Path | str, pairs: tuple[tuple[str, Any], ...], cache_dir: Path | None) -> StoreLocation:
    options: dict[str, Any] = {}
    for key, value in pairs:
        if key in options:
            raise click.BadParameter(
                f"{key} is given twice; give each key once (a dict value is JSON: {key}='{{...}}')",
                ctx=click.get_current_context(),
                param_hint="'--storage-option'",
            )
        options[key] = value
    if options and not is_url(where):
        raise click.BadParameter(
            f"applies to a store at a URL (s3://..., memory://...), not to the local path {where}",
            ctx=click.get_current_context(),
            param_hint="'--storage-option'",
        )
    return StoreLocation(where, options or None, cache_dir)


wait_option = click.option(
    "--wait",
    "wait",
    type=click.FloatRange(min=0.0),
    default=DEFAULT_WAIT,
    show_default=True,
    help="Seconds to wait for another writer's lock on the store before giving up.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text (schema: docs/cli.md).")
force_option = click.option("--force", is_flag=True, help="Replace the output if it exists.")


def check_output(path: Path, *, force: bool) -> None:
    """Fails early, before any work, if ``path`` cannot be written.

    The write itself is still atomic and refuses an existing file without
    ``--force``, so a file that appears in the meantime is not clobbered either.
    """
    if path.is_dir():
        raise click.ClickException(f"{path}: is a folder; give a file name to write")
    if path.exists() and not force:
        raise click.ClickException(f"{path}: already exists; pass --force to replace it")
    parent = path.parent
    if not parent.is_dir():
        raise click.ClickException(f"{parent}: no such folder; create it first")


def write_output(path: Path, data: bytes, *, force: bool) -> None:
    """Writes an output file whole or not at all: a temp file beside it, fsync, rename (or link without --force)."""
    temp = path.with_name(f".tmp-{secrets.token_hex(8)}-{path.name}")
    try:
        with open(temp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if force:
            os.replace(temp, path)
        else:
            os.link(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
