"""Which state-file format the command line writes; reading and writing are the library's."""

from __future__ import annotations

from pathlib import Path

from fishckpt import STATE_FORMATS

# File suffixes that mean "PyTorch file" when --format is not given; everything else is safetensors.
TORCH_SUFFIXES = frozenset({".pt", ".pth", ".bin"})
FORMATS = STATE_FORMATS


def format_for(path: Path, explicit: str | None) -> str:
    """The output format: ``explicit`` if given, else ``pt`` for .pt/.pth/.bin and safetensors otherwise."""
    if explicit is not None:
        return explicit
    return "pt" if path.suffix.lower() in TORCH_SUFFIXES else "safetensors"
