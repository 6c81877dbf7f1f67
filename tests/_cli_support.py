"""Small seeded models, their checkpoint files and a CliRunner wrapper, shared by tests/test_cli*.py."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file

from fishckpt import Mask
from fishckpt_cli.main import cli

# Trainable entries per tensor (flat indices). b[0] is outside the mask: steps that move it
# exercise the outside-mask path. "count" and "flag" are not floating point and not in the mask.
MASK_INDEX = {"w": [0, 5, 17, 100, 200, 511], "b": [1, 3], "h": [2]}
SHAPES = {"w": (32, 16), "b": (16,), "h": (8,)}
QUIET_NAN = 0x7FC00001  # a NaN with a payload: restore must keep the payload bits


def run(*args: object, env: Mapping[str, str | None] | None = None) -> Result:
    """Runs the CLI in-process; unexpected exceptions propagate so their tracebacks show.

    ``env`` is set in os.environ for the run only (a None value unsets the variable).
    """
    return CliRunner(env=env).invoke(cli, [str(arg) for arg in args], prog_name="fishckpt", catch_exceptions=False)


def base_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(SHAPES["w"], generator=generator),
        "b": torch.randn(SHAPES["b"], generator=generator),
        "h": torch.randn(SHAPES["h"], generator=generator).half(),
        "count": torch.tensor(7, dtype=torch.int64),
        "flag": torch.zeros(4, dtype=torch.bool),
    }


def make_mask() -> Mask:
    return Mask.from_indices(MASK_INDEX, SHAPES)


def step_state(step: int, *, outside: bool = False) -> dict[str, torch.Tensor]:
    """The base with every masked entry moved (seeded by ``step``); ``outside`` also moves b[0]."""
    state = {name: tensor.clone() for name, tensor in base_state().items()}
    generator = torch.Generator().manual_seed(100 + step)
    for name, index in MASK_INDEX.items():
        flat = state[name].view(-1)
        flat[index] = torch.randn(len(index), generator=generator).to(flat.dtype)
    if step == 2:  # special bit patterns inside the mask
        state["w"].view(-1)[0] = torch.tensor(QUIET_NAN, dtype=torch.int32).view(torch.float32)
        state["w"].view(-1)[5] = -0.0
    if outside:
        state["b"][0] += 1.0
    return state


@dataclass
class Files:
    """A base, a mask and checkpoint files: step 1 safetensors, steps 2 and 3 PyTorch (3 moves b[0])."""

    root: Path
    base: Path
    mask: Path
    steps: dict[int, Path]

    @property
    def store(self) -> Path:
        return self.root / "store"


def make_files(root: Path) -> Files:
    save_file(base_state(), root / "base.safetensors")
    make_mask().save(root / "mask.fishmask")
    steps = {1: root / "step1.safetensors", 2: root / "step2.pt", 3: root / "step3.pt"}
    save_file(step_state(1), steps[1])
    torch.save(step_state(2), steps[2])
    torch.save(step_state(3, outside=True), steps[3])
    return Files(root, root / "base.safetensors", root / "mask.fishmask", steps)


def make_store(files: Files, *, saved: tuple[int, ...] = ()) -> Path:
    """Creates ``files.store`` and saves the given steps from their files."""
    result = run("init", files.store, "--base", files.base, "--mask", files.mask)
    assert result.exit_code == 0, result.output
    for step in saved:
        result = run("save", files.store, files.steps[step], "--step", step, "-m", f"step {step}")
        assert result.exit_code == 0, result.output
    return files.store


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def safetensors_offset(path: Path, tensor: str) -> int:
    """The file offset of ``tensor``'s first data byte."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    start = json.loads(raw[8 : 8 + length])[tensor]["data_offsets"][0]
    return int(8 + length + start)
