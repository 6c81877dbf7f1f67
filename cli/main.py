"""The `fishckpt` click group and entry point."""

from __future__ import annotations

import click

import fishckpt


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(fishckpt.__version__, prog_name="fishckpt")
def cli() -> None:
    """Store checkpoints of fixed-sparse-mask training as base + masked values."""


def main() -> None:
    cli(prog_name="fishckpt")
