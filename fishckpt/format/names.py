"""The fixed names of a store's files (docs/format.md, "Store layout"); no name is ever read from a file."""

from __future__ import annotations

import re

MANIFEST_V1 = "fishckpt.json"
MANIFEST_V2 = "manifest.safetensors"
BASE_NAME = "base.safetensors"
MASK_NAME_V1 = "mask.fishmask"
MASK_NAME_V2 = "mask.safetensors"
STEPS_DIR = "steps"
LOCK_NAME = ".lock"

_STEP_SUFFIX = {1: ".fishckpt", 2: ".safetensors"}
_STEP_FILE = {
    version: re.compile(r"^step-([0-9]+)" + re.escape(suffix) + "$") for version, suffix in _STEP_SUFFIX.items()
}


def manifest_name(version: int) -> str:
    return MANIFEST_V1 if version == 1 else MANIFEST_V2


def mask_name(version: int) -> str:
    return MASK_NAME_V1 if version == 1 else MASK_NAME_V2


def step_file_name(step: int, version: int = 2) -> str:
    """The one canonical name of step ``step``'s file."""
    return f"step-{step:012d}{_STEP_SUFFIX[version]}"


def step_key(step: int, version: int = 2) -> str:
    """The step file's name within the store."""
    return f"{STEPS_DIR}/{step_file_name(step, version)}"


def step_of(file_name: str, version: int = 2) -> int | None:
    """The step a file name in ``steps/`` denotes, or None if it is not a canonical step file name."""
    match = _STEP_FILE[version].match(file_name)
    if match is None:
        return None
    step = int(match.group(1))
    return step if file_name == step_file_name(step, version) else None


_PART_FILE = re.compile(r"^step-([0-9]{12,})\.([0-9a-f]+)\.part-([0-9]{5,})-of-([0-9]{5,})\.safetensors$")


def part_file_name(step: int, token: str, rank: int, world: int) -> str:
    """The file in ``steps/`` that rank ``rank`` of ``world`` writes for step ``step`` in the save ``token``."""
    return f"step-{step:012d}.{token}.part-{rank:05d}-of-{world:05d}.safetensors"


def part_step_of(file_name: str) -> int | None:
    """The step a part file's name belongs to, or None if it is not a part file's name."""
    match = _PART_FILE.match(file_name)
    return None if match is None else int(match.group(1))
