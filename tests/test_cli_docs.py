"""Every CLI command has help text and a section in docs/cli.md naming each of its options."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from fishckpt_cli.main import cli

DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def _commands(group: click.Group, prefix: str) -> Iterator[tuple[str, click.Command]]:
    context = click.Context(group, info_name=prefix)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        assert command is not None
        path = f"{prefix} {name}"
        yield path, command
        if isinstance(command, click.Group):
            yield from _commands(command, path)


COMMANDS = sorted(_commands(cli, "fishckpt"), key=lambda item: item[0])


def _section(path: str) -> str:
    """The text under the ``### `path` `` heading, up to the next heading."""
    text = DOCS.read_text(encoding="utf-8")
    match = re.search(rf"^### `{re.escape(path)}`\n(.*?)(?=^#{{1,3}} |\Z)", text, flags=re.S | re.M)
    assert match, f"docs/cli.md has no section '### `{path}`'"
    return match.group(1)


def test_the_commands_are_all_there() -> None:
    assert [path for path, _ in COMMANDS] == [
        "fishckpt diff", "fishckpt export", "fishckpt init", "fishckpt ls", "fishckpt mask", "fishckpt mask diff",
        "fishckpt mask info", "fishckpt mask random", "fishckpt prune", "fishckpt report",
        "fishckpt restore", "fishckpt rm", "fishckpt save", "fishckpt upgrade", "fishckpt verify",
    ]  # fmt: skip


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[path for path, _ in COMMANDS])
def test_command_has_help_and_docs(path: str, command: click.Command) -> None:
    assert command.help and command.help.strip(), f"{path} has no help text"
    section = _section(path)
    for parameter in command.params:
        assert not isinstance(parameter, click.Option) or parameter.help, f"{path} {parameter.opts} has no help"
        if isinstance(parameter, click.Option) and "--help" not in parameter.opts:
            longest = max(parameter.opts, key=len)
            assert longest in section, f"docs/cli.md section for {path} does not mention {longest}"


@pytest.mark.parametrize(
    "path", ["fishckpt ls", "fishckpt diff", "fishckpt verify", "fishckpt report", "fishckpt mask info"]
)
def test_json_commands_document_their_schema(path: str) -> None:
    assert "```json" in _section(path)


def test_quick_start_exists() -> None:
    text = DOCS.read_text(encoding="utf-8")
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    for command in ("init", "save", "ls", "report", "restore", "verify"):
        assert f"fishckpt {command} " in quick_start
