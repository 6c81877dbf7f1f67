"""Arguments and checks that several commands share."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import click

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

store_argument = click.argument("store_path", metavar="STORE", type=PATH)
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
