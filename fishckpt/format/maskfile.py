"""The compact mask file (docs/format.md, "Mask file"): sorted positions of every tensor as gaps in byte planes.

Written as a format v2 file (``mask.safetensors``); format v1's container (``mask.fishmask``) is still read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from ..errors import FormatError
from . import codec, container, stfile

Shapes = dict[str, tuple[int, ...]]
Indices = dict[str, npt.NDArray[np.int64]]


KIND = "mask"


def _positions(
    indices: Mapping[str, npt.NDArray[np.int64]], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[int, list[codec.Section]]:
    all_indices = [indices[name] for name in shapes]
    flat = np.concatenate(all_indices) if all_indices else np.zeros(0, np.int64)
    # Gaps restart at each tensor: positions are made increasing across tensors by offsets.
    offsets = (
        np.repeat(
            np.cumsum([0, *[math.prod(s) for s in shapes.values()][:-1]]).astype(np.int64),
            [len(i) for i in all_indices],
        )
        if all_indices
        else np.zeros(0, np.int64)
    )
    return codec.encode_positions(flat + offsets)


def encode(
    indices: Mapping[str, npt.NDArray[np.int64]], shapes: Mapping[str, tuple[int, ...]], digest: str
) -> list[bytes]:
    """The v2 mask file's bytes, as pieces, for sorted unique int64 indices per tensor (in ``shapes`` order)."""
    width, sections = _positions(indices, shapes)
    record = {
        "entries": [[name, list(shape), int(indices[name].size)] for name, shape in shapes.items()],
        "gap_width": width,
        "digest": digest,
    }
    return stfile.pack(KIND, record, [(f"positions.p{plane}", section) for plane, section in enumerate(sections)])


def encode_v1(
    indices: Mapping[str, npt.NDArray[np.int64]], shapes: Mapping[str, tuple[int, ...]], digest: str
) -> list[bytes]:
    """The format v1 mask file's bytes (kept to write test fixtures of old stores)."""
    width, sections = _positions(indices, shapes)
    header = {
        "kind": "mask",
        "tensors": [[name, list(shape), int(indices[name].size)] for name, shape in shapes.items()],
        "gap_width": width,
        "digest": digest,
    }
    return container.pack(container.MASK_MAGIC, header, sections)


def is_mask_file(data: bytes) -> bool:
    """Whether a file's first bytes are a fishckpt mask file's (v1), or a safetensors file naming itself a mask (v2)."""
    return data.startswith(container.MASK_MAGIC) or stfile.names_kind(data, KIND)


def decode(data: bytes, *, where: str) -> tuple[Indices, Shapes, str]:
    """Checks and decodes a mask file's bytes into (indices, shapes, recorded digest).

    The caller builds the Mask and compares its digest with the recorded one.

    Raises:
        IntegrityError: The file is corrupted or truncated.
        FormatError: The content breaks a rule of the format.
    """
    if data.startswith(container.MASK_MAGIC):
        parsed = container.parse(where, data, container.MASK_MAGIC, what="mask")
        header: dict[str, object] = parsed.header
        entries_key, sections = "tensors", len(parsed.header["sections"])

        def plane(number: int) -> bytes:
            return parsed.section(number)
    else:
        file = stfile.read_whole(data, kind=KIND, where=where)
        file.check_all()
        header, entries_key, sections = file.record, "entries", len(file.names())

        def plane(number: int) -> bytes:
            return file.section(f"positions.p{number}")

    try:
        table = [
            (str(name), tuple(int(s) for s in shape), int(count))
            for name, shape, count in header[entries_key]  # type: ignore[attr-defined]
        ]
        width = int(header["gap_width"])  # type: ignore[call-overload]
    except (KeyError, TypeError, ValueError) as error:
        raise FormatError(f"{where}: malformed mask header: {error}") from error
    if width not in (4, 8) or sections != width:
        raise FormatError(f"{where}: unsupported gap width {width}")
    total = sum(count for _, _, count in table)
    if any(count < 0 for _, _, count in table) or total > sum(math.prod(shape) for _, shape, _ in table):
        raise FormatError(f"{where}: mask header declares more entries than its tensors hold")
    if any(any(s < 0 for s in shape) for _, shape, _ in table):
        raise FormatError(f"{where}: a tensor has a negative dimension")
    planes = [plane(i) for i in range(width)]
    if any(len(plane_bytes) != total for plane_bytes in planes):
        # A byte per declared entry in every plane; fewer would fail inside numpy, more would be ignored.
        raise FormatError(
            f"{where}: mask position planes hold {sorted({len(plane_bytes) for plane_bytes in planes})} bytes, "
            f"but the header declares {total} entries"
        )
    flat = codec.decode_positions(planes, total, width)
    indices: Indices = {}
    shapes: Shapes = {}
    start, offset = 0, 0
    for name, shape, count in table:
        if name in shapes:
            raise FormatError(f"{where}: tensor {name!r} appears twice")
        numel = math.prod(shape)
        local = flat[start : start + count] - offset
        if count and (int(local[0]) < 0 or int(local[-1]) >= numel):
            raise FormatError(f"{where}: indices of tensor {name!r} are out of range for shape {shape}")
        indices[name], shapes[name] = local, shape
        start += count
        offset += numel
    return indices, shapes, str(header.get("digest"))
