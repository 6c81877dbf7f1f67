"""Progress bars: shown on a terminal only, and never with --quiet."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

import click

T = TypeVar("T")


def progress(items: Iterable[T], *, description: str, unit: str, total: int | None = None) -> Iterator[T]:
    """Yields ``items``, drawing a tqdm bar on stderr when stderr is a terminal and --quiet is off.

    Bars go to stderr so that stdout (tables, JSON) stays clean for pipes.
    """
    context = click.get_current_context(silent=True)
    quiet = bool(context and context.find_root().params.get("quiet"))
    if quiet or not sys.stderr.isatty():
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=description, total=total, unit=unit, file=sys.stderr, leave=False)
