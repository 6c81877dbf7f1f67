"""The fixed names of a store's files (docs/format.md, "Store layout"); no name is ever read from a file."""

from __future__ import annotations

import re

MANIFEST_NAME = "fishckpt.json"
BASE_NAME = "base.safetensors"
MASK_NAME = "mask.fishmask"
STEPS_DIR = "steps"
LOCK_NAME = ".lock"

_STEP_FILE = re.compile(r"^step-([0-9]+)\.fishckpt$")


def step_file_name(step: int) -> str:
    """The one canonical name of step ``step``'s file."""
    return f"step-{step:012d}.fishckpt"


def step_key(step: int) -> str:
    """The step file's name within the store."""
    return f"{STEPS_DIR}/{step_file_name(step)}"


def step_of(file_name: str) -> int | None:
    """The step a file name in ``steps/`` denotes, or None if it is not a canonical step file name."""
    match = _STEP_FILE.match(file_name)
    if match is None:
        return None
    step = int(match.group(1))
    return step if file_name == step_file_name(step) else None
