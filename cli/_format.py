"""How the command line shows numbers, times, tables and JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import click

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(count: int) -> str:
    """``1536`` -> ``"1.5 KiB"``; whole bytes below 1 KiB."""
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in _UNITS[1:]:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            break
    return f"{value:.1f} {unit}"


def compression_ratio(dense_bytes: int, stored_bytes: int) -> float:
    """How many times smaller the stored form is than the dense one (inf if nothing was stored)."""
    return dense_bytes / stored_bytes if stored_bytes else math.inf


def format_ratio(ratio: float) -> str:
    return "inf" if math.isinf(ratio) else f"{ratio:.1f}x"


def smaller_or_larger(ratio: float) -> str:
    """A dense/stored ratio in words: ``"12.5x smaller"``, or ``"1.3x larger"`` below 1."""
    if ratio >= 1 or ratio == 0:
        return f"{format_ratio(ratio)} smaller"
    return f"{format_ratio(1 / ratio)} larger"


def utc_iso(timestamp: float) -> str:
    """A Unix time as ``2024-05-01T12:00:00Z``."""
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def json_number(value: float) -> float | str:
    """JSON has no NaN or infinity; those become the strings "nan", "inf", "-inf" (see docs/cli.md)."""
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (also inside dicts and lists) made a string, as ``json_number`` does."""
    if isinstance(value, float):
        return json_number(value)
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def echo_json(document: dict[str, Any]) -> None:
    # allow_nan=False: a stray NaN must fail here rather than produce invalid JSON for the reader.
    click.echo(json.dumps(document, indent=2, allow_nan=False))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[bool]) -> str:
    """Plain aligned columns; ``right`` says which columns are right-aligned (numbers)."""
    widths = [len(header) for header in headers]
    for row in rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(width) if align_right else cell.ljust(width)
            for cell, width, align_right in zip(cells, widths, right, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])
