"""A step's content coded against the base: captured values to a step record and sections, and back."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import FormatError
from ..format import codec, digests
from ..format.bits import element_words, numpy_words
from ..format.codec import Section
from ..format.container import Container
from ..format.dtypes import dtype_row
from ..format.manifest import TensorEntry
from ..format.stepfile import OutsideRecord, StepRecord, TrainingRecord, TrainingTensor, ValueStream
from .capture import Captured
from .layout import StoreLayout

Extras = dict[str, tuple[torch.Tensor | None, torch.Tensor]]  # positions (None if dense), words


@dataclass
class Decoded:
    """A step file decoded: masked element words and outside-mask changes per tensor."""

    where: str
    record: StepRecord
    container: Container
    masked: dict[str, torch.Tensor]
    extras: Extras


@dataclass
class Encoded:
    """A step ready to be written, and what it says about changes outside the mask."""

    record: StepRecord
    sections: list[Section]
    changed: dict[str, int]  # entries changed outside the mask, per tensor
    storage: dict[str, str]  # "sparse" or "dense", per tensor in ``changed``


def encode(
    layout: StoreLayout,
    step: int,
    captured: Captured,
    metadata: dict[str, Any],
    training: tuple[Any, list[torch.Tensor]] | None = None,
) -> Encoded:
    """Codes a captured state as a step record and its sections (docs/format.md, "Checkpoint file")."""
    masked, extras = captured.masked, captured.extras
    sections: list[Section] = []
    values = []
    for group in layout.value_groups():
        new_words = np.concatenate([numpy_words(masked[name]) for name, _, _ in group.members])
        values.append(ValueStream(group.width, new_words.size, len(sections)))
        sections.extend(codec.encode_delta(new_words, group.base_words, group.order))
    base = layout.base()
    outside = []
    changed: dict[str, int] = {}
    modes: dict[str, str] = {}
    for name, (positions, words) in extras.items():
        entry = layout.entries[name]
        base_elements = element_words(base[name])
        count = positions.numel()
        first = len(sections)
        if count * (8 + entry.dtype.itemsize) < entry.nbytes:
            gap_width, gap_sections = codec.encode_positions(positions.numpy())
            sections.extend(gap_sections)
            sections.extend(
                codec.encode_delta(numpy_words(words), numpy_words(base_elements.index_select(0, positions)))
            )
            mode = "sparse"
        else:
            gap_width = 0
            full = base_elements.clone()
            full.index_copy_(0, positions, words)
            sections.extend(codec.encode_delta(numpy_words(full), numpy_words(base_elements)))
            mode = "dense"
        outside.append(OutsideRecord(name, mode, count, gap_width, first, len(sections) - first))
        changed[name], modes[name] = count, mode
    tensor_digests = {
        entry.name: tensor_digest(entry, masked[entry.name], *(extras.get(entry.name) or (None, None)))
        for entry in layout.owners
    }
    training_record = None
    if training is not None:
        tree, tensors = training
        table = []
        for tensor in tensors:
            row = dtype_row(tensor.dtype, key="training state")
            first = len(sections)
            sections.extend(codec.encode_words(numpy_words(element_words(tensor))))
            table.append(TrainingTensor(row.name, tuple(tensor.shape), first, len(sections) - first))
        training_record = TrainingRecord(tree, table)
    record = StepRecord(
        step=step,
        created=time.time(),
        base_digest=layout.manifest.base_digest,
        mask_digest=layout.manifest.mask_digest,
        k=layout.mask.k,
        values=values,
        outside=outside,
        digests=tensor_digests,
        metadata=metadata,
        training=training_record,
        section_lengths=[len(section.payload) for section in sections],
    )
    return Encoded(record, sections, changed, modes)


def tensor_digest(
    entry: TensorEntry, masked: torch.Tensor, positions: torch.Tensor | None, words: torch.Tensor | None
) -> str:
    """The digest of a rebuilt tensor (docs/format.md, "Tensor digests"), from what the step set."""
    return digests.tensor_digest(
        entry.digest,
        numpy_words(masked),
        None if positions is None else positions.numpy(),
        None if words is None else numpy_words(words),
    )


def decode(layout: StoreLayout, record: StepRecord, container: Container, *, where: str) -> Decoded:
    """Decodes a checked step file's masked values and outside-mask records (O(k))."""
    try:
        return _decode(layout, record, container, where=where)
    except (KeyError, TypeError, ValueError) as error:
        raise FormatError(f"{where}: malformed checkpoint: {error!r}") from error


def _decode(layout: StoreLayout, record: StepRecord, container: Container, *, where: str) -> Decoded:
    plans = layout.plans()
    masked: dict[str, torch.Tensor] = {}
    groups = layout.value_groups()
    if len(record.values) != len(groups):
        raise FormatError(f"{where}: {len(record.values)} value streams, the store has {len(groups)}")
    for group, stream in zip(groups, record.values, strict=True):
        if stream.width != group.width or stream.count != group.base_words.size:
            raise FormatError(
                f"{where}: value stream of width {stream.width} has {stream.count} words, expected "
                f"{group.base_words.size} of width {group.width}"
            )
        planes = [container.section(stream.first + i) for i in range(stream.width)]
        words = codec.decode_delta(planes, group.base_words, group.order)
        for name, lo, hi in group.members:
            template = plans[name].base_masked
            masked[name] = torch.from_numpy(words[lo:hi].copy()).view(template.dtype).reshape(template.shape)
    for entry in layout.owners:
        if entry.name not in masked:
            masked[entry.name] = plans[entry.name].base_masked[:0]
    extras: Extras = {}
    base = layout.base()
    for outside in record.outside:
        name = outside.name
        found = layout.entries.get(name)
        if found is None or found.alias_of is not None:
            raise FormatError(f"{where}: changes recorded for unknown tensor {name!r}")
        entry = found
        base_elements = element_words(base[name])
        if outside.mode == "sparse":
            count, gap_width = outside.count, outside.gap_width
            if not 0 < count <= entry.numel or gap_width not in (4, 8):
                raise FormatError(f"{where}: tensor {name!r}: bad outside-mask record")
            positions = torch.from_numpy(
                codec.decode_positions(
                    [container.section(outside.first + i) for i in range(gap_width)], count, gap_width
                )
            )
            if int(positions[-1]) >= entry.numel:
                raise FormatError(f"{where}: tensor {name!r}: outside-mask position out of range")
            if bool(torch.isin(positions, plans[name].index).any()):
                raise FormatError(f"{where}: tensor {name!r}: an outside-mask position lies inside the mask")
            base_words = numpy_words(base_elements.index_select(0, positions))
            planes = [container.section(outside.first + gap_width + i) for i in range(outside.sections - gap_width)]
            words = codec.decode_delta(planes, base_words)
            extras[name] = (
                positions,
                torch.from_numpy(words).view(base_elements.dtype).reshape((count, *base_elements.shape[1:])),
            )
        elif outside.mode == "dense":
            planes = [container.section(outside.first + i) for i in range(outside.sections)]
            words = codec.decode_delta(planes, numpy_words(base_elements))
            extras[name] = (None, torch.from_numpy(words).view(base_elements.dtype).reshape(base_elements.shape))
        else:
            raise FormatError(f"{where}: tensor {name!r}: unknown outside-mask mode {outside.mode!r}")
    return Decoded(where, record, container, masked, extras)
