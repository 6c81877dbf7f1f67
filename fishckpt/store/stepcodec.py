"""A step's content coded against the base: captured values to a step file's content, and a step file back.

The decoded form is the same for both format versions: every masked value in one
byte buffer (the mask table's layout, store/table.py) and, per tensor that moved
outside the mask, the changed positions and their words. Decoding proves the
content against the digest(s) the file records, so what comes out is what was saved.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from ..errors import FormatError, IntegrityError
from ..format import codec, digests
from ..format import tree as tree_format
from ..format.bits import WORD_DTYPE, differs, element_words, numpy_words
from ..format.codec import Section
from ..format.dtypes import dtype_by_name, dtype_row
from ..format.manifest import TensorEntry
from ..format.stepfile import StepContent, StepFile, StepRecord, TrainingRecord
from .layout import StoreLayout

Values = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Change:
    """A tensor's entries that differ from the base outside the mask.

    ``positions`` (ascending) and ``words`` are canonical: exactly the entries that differ.
    ``dense`` holds the whole tensor's words where the step stored it densely.
    """

    positions: torch.Tensor
    words: torch.Tensor
    dense: torch.Tensor | None = None


@dataclass
class Decoded:
    """A step, decoded and proved against its recorded digest(s)."""

    where: str
    record: StepRecord
    file: StepFile
    values: Values  # every masked value, in the mask table's layout
    changes: dict[str, Change]  # in manifest order
    parts: list[Decoded] | None = None  # a sharded step: each rank's part, decoded (their training states)


@dataclass
class Encoded:
    """A step ready to be written, and what it says about changes outside the mask."""

    content: StepContent
    changed: dict[str, int]  # entries changed outside the mask, per tensor
    storage: dict[str, str]  # "sparse" or "dense", per tensor in ``changed``


# Encoding ---------------------------------------------------------------------------------------


def encode(
    layout: StoreLayout,
    step: int,
    values: Values,
    changes: dict[str, Change],
    metadata: dict[str, Any],
    training: tuple[Any, list[torch.Tensor]] | None,
    *,
    store_id: str,
) -> Encoded:
    """Codes a captured state as the content of a v2 step file (docs/format.md, "Step file")."""
    table = layout.table
    base_values = layout.base_values()
    streams = []
    for group in table.groups:
        planes = codec.encode_delta(
            table.group_words(values, group), table.group_words(base_values, group), group.order
        )
        streams.append((group.width, group.count, planes))
    base = layout.base()
    outside = []
    changed: dict[str, int] = {}
    modes: dict[str, str] = {}
    for name, change in changes.items():
        entry = layout.entries[name]
        base_elements = element_words(base[name])
        positions, words = change.positions, change.words
        count, width = positions.numel(), entry.dtype.word_bytes
        if count * (8 + entry.dtype.itemsize) < entry.nbytes:
            gap_width, gap_planes = codec.encode_positions(positions.numpy())
            value_planes = codec.encode_delta(numpy_words(words), numpy_words(base_elements.index_select(0, positions)))
            outside.append((name, "sparse", count, gap_width, width, gap_planes, value_planes))
            modes[name] = "sparse"
        else:
            full = base_elements.clone()
            full.index_copy_(0, positions, words)
            value_planes = codec.encode_delta(numpy_words(full), numpy_words(base_elements))
            outside.append((name, "dense", count, 0, width, [], value_planes))
            modes[name] = "dense"
        changed[name] = count
    content = StepContent(
        store_id=store_id,
        step=step,
        created=time.time(),
        base_digest=layout.manifest.base_digest,
        mask_digest=layout.manifest.mask_digest,
        k=layout.mask.k,
        digest=step_digest(layout, values, changes),
        metadata=metadata,
        values=streams,
        outside=outside,
        training=None if training is None else _encode_training(*training),
    )
    return Encoded(content, changed, modes)


def step_digest(layout: StoreLayout, values: Values, changes: dict[str, Change]) -> str:
    return digests.step_digest(
        layout.manifest.base_digest,
        layout.manifest.mask_digest,
        values,
        (
            (layout.position[name], change.positions.numpy(), numpy_words(change.words))
            for name, change in sorted(changes.items(), key=lambda item: layout.position[item[0]])
        ),
    )


def _encode_training(tree: Any, tensors: list[torch.Tensor]) -> tuple[Section, list[tuple[int, int, list[Section]]]]:
    """The training state as its JSON tree (with the tensors' dtypes and shapes) and one stream per word width."""
    table = []
    by_width: dict[int, list[npt.NDArray[np.unsignedinteger]]] = {}
    for tensor in tensors:
        row = dtype_row(tensor.dtype, key="training state")
        table.append([row.name, list(tensor.shape)])
        by_width.setdefault(row.word_bytes, []).append(numpy_words(element_words(tensor)))
    streams = []
    for width in sorted(by_width):
        words = np.concatenate(by_width[width]) if by_width[width] else np.zeros(0, np.uint8)
        streams.append((width, int(words.size), codec.encode_words(words)))
    tree_json = json.dumps({"tree": tree, "tensors": table}, separators=(",", ":"), allow_nan=False).encode()
    return codec.compress(tree_json), streams


# Decoding ---------------------------------------------------------------------------------------


def decode(layout: StoreLayout, record: StepRecord, file: StepFile, *, where: str, check: bool = True) -> Decoded:
    """Decodes a checked step file's masked values and outside-mask records (O(k)).

    With ``check``, the decoded content is proved against the digest(s) the file
    records, and a mismatch raises IntegrityError naming the file (and the tensor, v1).
    """
    try:
        decoded = _decode(layout, record, file, where=where)
    except (KeyError, TypeError, ValueError) as error:
        raise FormatError(f"{where}: malformed step: {error!r}") from error
    if check:
        failures = content_failures(layout, decoded)
        if failures:
            tensors = [name for name in failures if name is not None]
            which = f" (tensor {', '.join(map(repr, tensors[:5]))})" if tensors else ""
            raise IntegrityError(
                f"{where}: the step's content does not match the digest recorded at save{which}; "
                "the step file is damaged; restore it from a copy or delete this step"
            )
    return decoded


def _decode(layout: StoreLayout, record: StepRecord, file: StepFile, *, where: str) -> Decoded:
    table = layout.table
    base_values = layout.base_values()
    if len(record.values) != len(table.groups):
        raise FormatError(f"{where}: {len(record.values)} value streams, the store has {len(table.groups)}")
    values = table.new_values()
    for group, stream in zip(table.groups, record.values, strict=True):
        if stream.width != group.width or stream.count != group.count:
            raise FormatError(
                f"{where}: value stream of width {stream.width} has {stream.count} words, expected "
                f"{group.count} of width {group.width}"
            )
        planes = [file.section(key) for key in stream.sections]
        words = codec.decode_delta(planes, table.group_words(base_values, group), group.order)
        values[group.start : group.stop] = words.view(np.uint8)
    changes: dict[str, Change] = {}
    base = layout.base()
    seen = -1
    for outside in record.outside:
        name = outside.name
        entry = layout.entries.get(name)
        if entry is None or entry.alias_of is not None:
            raise FormatError(f"{where}: changes recorded for unknown tensor {name!r}")
        if layout.position[name] <= seen:
            raise FormatError(f"{where}: outside-mask records are not in manifest order (at {name!r})")
        seen = layout.position[name]
        base_elements = element_words(base[name])
        index = layout.index(name)
        if outside.mode == "sparse":
            count, gap_width = outside.count, outside.gap_width
            if not 0 < count <= entry.numel or gap_width not in (4, 8):
                raise FormatError(f"{where}: tensor {name!r}: bad outside-mask record")
            planes = [file.section(key) for key in outside.position_sections]
            positions = torch.from_numpy(codec.decode_positions(planes, count, gap_width))
            if int(positions[-1]) >= entry.numel:
                raise FormatError(f"{where}: tensor {name!r}: outside-mask position out of range")
            if bool(torch.isin(positions, index).any()):
                raise FormatError(f"{where}: tensor {name!r}: an outside-mask position lies inside the mask")
            base_words = numpy_words(base_elements.index_select(0, positions))
            words = codec.decode_delta([file.section(key) for key in outside.value_sections], base_words)
            shaped = torch.from_numpy(words).view(base_elements.dtype).reshape((count, *base_elements.shape[1:]))
            changes[name] = Change(positions, shaped)
        elif outside.mode == "dense":
            planes = [file.section(key) for key in outside.value_sections]
            words = codec.decode_delta(planes, numpy_words(base_elements))
            dense = torch.from_numpy(words).view(base_elements.dtype).reshape(base_elements.shape)
            changed = differs(dense, base_elements)
            changed[index] = False
            positions = torch.nonzero(changed).reshape(-1)
            changes[name] = Change(positions, dense.index_select(0, positions), dense)
        else:
            raise FormatError(f"{where}: tensor {name!r}: unknown outside-mask mode {outside.mode!r}")
    return Decoded(where, record, file, values, changes)


def content_failures(layout: StoreLayout, decoded: Decoded) -> list[str | None]:
    """The tensors whose decoded content misses its recorded digest (v1), or [None] if the step digest fails (v2)."""
    record = decoded.record
    if record.version >= 2:
        return [] if step_digest(layout, decoded.values, decoded.changes) == record.digest else [None]
    failures: list[str | None] = []
    for entry in layout.owners:
        if tensor_digest_v1(layout, entry, decoded) != record.tensor_digests.get(entry.name):
            failures.append(entry.name)
    return failures


def tensor_digest_v1(layout: StoreLayout, entry: TensorEntry, decoded: Decoded) -> str:
    """Format v1's per-tensor digest of the decoded step (format.md, "Tensor digests (v1)")."""
    row = layout.table.row_of[entry.name]
    change = decoded.changes.get(entry.name)
    return digests.tensor_digest(
        entry.digest,
        layout.table.row_values(decoded.values, row),
        None if change is None else change.positions.numpy(),
        None if change is None else numpy_words(change.words),
    )


def decode_training(decoded: Decoded) -> dict[str, Any]:
    """The training state a step holds, as saved (``{}`` if none was)."""
    record, where, file = decoded.record.training, decoded.where, decoded.file
    if record is None:
        return {}
    try:
        tensors = _training_tensors(record, file, where)
        tree = tree_format.decode_tree(record.tree, tensors, where=where)
    except (KeyError, TypeError, ValueError) as error:
        raise FormatError(f"{where}: malformed training state: {error!r}") from error
    if not isinstance(tree, dict):
        raise FormatError(f"{where}: malformed training state")
    return tree


def _training_tensors(record: TrainingRecord, file: StepFile, where: str) -> list[torch.Tensor]:
    rows = [dtype_by_name(tensor.dtype, where=where) for tensor in record.tensors]
    counts = [
        math.prod(tensor.shape) * (row.itemsize // row.word_bytes)
        for tensor, row in zip(record.tensors, rows, strict=True)
    ]
    if record.streams:  # v2: one stream per word width, tensors in order
        words_by_width = {}
        for stream in record.streams:
            expected = sum(count for count, row in zip(counts, rows, strict=True) if row.word_bytes == stream.width)
            if stream.count != expected:
                raise FormatError(
                    f"{where}: training stream of width {stream.width} has {stream.count} words, not {expected}"
                )
            words_by_width[stream.width] = codec.decode_words(
                [file.section(key) for key in stream.sections], stream.count, stream.width
            )
        offsets = dict.fromkeys(words_by_width, 0)
        pieces = []
        for count, row in zip(counts, rows, strict=True):
            start = offsets[row.word_bytes]
            pieces.append(words_by_width[row.word_bytes][start : start + count])
            offsets[row.word_bytes] = start + count
    else:  # v1: each tensor its own sections
        pieces = [
            codec.decode_words([file.section(key) for key in tensor.sections], count, row.word_bytes)
            for tensor, count, row in zip(record.tensors, counts, rows, strict=True)
        ]
    out = []
    for tensor, row, words in zip(record.tensors, rows, pieces, strict=True):
        flat = torch.from_numpy(words.copy()).view(WORD_DTYPE[row.word_bytes])
        out.append(flat.view(row.torch_dtype).reshape(tensor.shape))
    return out
