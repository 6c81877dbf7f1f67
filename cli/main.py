"""The `fishckpt` click group, its error boundary and the entry point."""

from __future__ import annotations

import errno
import warnings
from typing import Any

import click

import fishckpt

from .commands import diff, mask, report, steps, store, verify


def describe_os_error(error: OSError) -> str:
    """A one-line message for a failed file operation, naming the file and what to do."""
    where = error.filename if error.filename is not None else "file"
    if error.errno == errno.ENOSPC:
        return f"{where}: no space left on device; free some space or write elsewhere (nothing was half-written)"
    if isinstance(error, FileNotFoundError):
        # Our own FileNotFoundErrors carry a full message and no filename.
        return f"{where}: no such file or folder; check the path" if error.filename is not None else str(error)
    if isinstance(error, FileExistsError):
        return f"{where}: already exists; pass --force to replace it"
    if isinstance(error, PermissionError):
        return f"{where}: permission denied; check the file's permissions"
    if isinstance(error, IsADirectoryError):
        return f"{where}: is a folder; give a file"
    return f"{where}: {error.strerror or error}"


class FishckptGroup(click.Group):
    """A click group that turns expected failures into ``Error: <message>`` and exit 1.

    Library errors (FishckptError) and file-system errors are expected: the user
    sees the message, not a traceback. Anything else is a bug and keeps its traceback.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except fishckpt.FishckptError as error:
            raise click.ClickException(str(error)) from error
        except OSError as error:
            raise click.ClickException(describe_os_error(error)) from error


@click.group(cls=FishckptGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    fishckpt.__version__,
    prog_name="fishckpt",
    # Says whether saves run the C scan, so a slow exact-check save on a compiler-less install can be explained.
    message="%(prog)s, version %(version)s (exact-check scan: "
    + ("C" if fishckpt.native_scan_available() else "pure Python")
    + ")",
)
@click.option("-q", "--quiet", is_flag=True, help="Show no progress bars (they appear only on a terminal anyway).")
def cli(quiet: bool) -> None:
    """Store checkpoints of fixed-sparse-mask training as base + masked values.

    A store holds the dense base once, the mask once, and one small verified
    file per saved step. Run `fishckpt COMMAND --help` for each command.
    """


for command in (
    store.init,
    store.save,
    store.restore,
    store.export,
    store.upgrade,
    steps.ls,
    steps.rm,
    steps.prune,
    diff.diff,
    verify.verify,
    report.report,
    mask.mask,
):
    cli.add_command(command)


def main() -> None:
    # torch warns on every complex32 tensor it makes; a store holding one would print it on each command.
    warnings.filterwarnings("ignore", message="ComplexHalf support is experimental", category=UserWarning)
    cli(prog_name="fishckpt")
