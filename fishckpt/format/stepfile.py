"""A step file's record as typed dataclasses, read from format v1 or v2 and written as v2 (docs/format.md).

The store sees one ``StepRecord`` whatever the version; where the versions
differ (v1 keeps a digest per tensor and numbers its sections, v2 keeps one
digest per step and names them), the record says so and ``StepFile.section``
takes either kind of key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import FormatError
from . import container, stfile
from .codec import Section

KIND = "step"
PART_KIND = "step-part"
PART_RANGES = "part.ranges"
SectionKey = int | str


@dataclass(frozen=True)
class ValueStream:
    """The masked values of every tensor whose words are ``width`` bytes: one byte plane per section."""

    width: int
    count: int  # words in the stream
    sections: tuple[SectionKey, ...]


@dataclass(frozen=True)
class OutsideRecord:
    """A tensor's entries that differ from the base outside the mask.

    ``sparse``: positions (``gap_width`` planes) and their values' delta planes.
    ``dense``: the whole tensor's delta planes; ``gap_width`` is 0 and there are no positions.
    """

    name: str
    mode: str  # "sparse" or "dense"
    count: int  # entries changed outside the mask
    gap_width: int
    position_sections: tuple[SectionKey, ...]
    value_sections: tuple[SectionKey, ...]


@dataclass(frozen=True)
class TrainingTensor:
    """One tensor of the training state: its dtype name and shape (v1: and its own sections)."""

    dtype: str
    shape: tuple[int, ...]
    sections: tuple[SectionKey, ...] = ()


@dataclass(frozen=True)
class TrainingRecord:
    """Optimizer, scheduler and RNG state: a JSON tree whose ``{"$tensor": i}`` leaves are ``tensors[i]``.

    v2 codes the tensors' words as one stream per word width (``streams``), in tensor order.
    """

    tree: Any
    tensors: list[TrainingTensor]
    streams: list[ValueStream] = field(default_factory=list)


@dataclass(frozen=True)
class PartRef:
    """One part of a sharded step, as the step file lists it: the part file and what it must hold."""

    file: str  # the part file's name in the steps folder
    checksum: str  # the part file's header checksum
    digest: str  # the part's own step digest
    bytes: int
    training_bytes: int


@dataclass(frozen=True)
class ShardsRecord:
    """A sharded step's step file: the parts that hold its content, one per rank, each written by its rank."""

    world: int
    parts: list[PartRef]
    outside: dict[str, int]  # entries changed outside the mask, per tensor, summed over the parts


@dataclass(frozen=True)
class PartRecord:
    """What a part file says about itself: which rank of how many wrote it, in which save (``token``)."""

    rank: int
    world: int
    token: str


@dataclass
class StepRecord:
    """Everything a step file's header says, for either format version."""

    version: int
    step: int
    created: float
    base_digest: str
    mask_digest: str
    k: int
    values: list[ValueStream]
    outside: list[OutsideRecord]
    metadata: dict[str, Any]
    store_id: str | None = None  # v2
    digest: str | None = None  # v2: the step digest
    tensor_digests: dict[str, str] = field(default_factory=dict)  # v1: a digest per tensor
    training: TrainingRecord | None = None
    stored_bytes: int = 0
    training_bytes: int = 0  # stored bytes of the training state, within stored_bytes
    shards: ShardsRecord | None = None  # v2, a sharded step: its content is in part files
    part: PartRecord | None = None  # v2, a part file

    @property
    def total_bytes(self) -> int:
        """Stored bytes of the step: its file, and its part files for a sharded step."""
        return self.stored_bytes + (sum(part.bytes for part in self.shards.parts) if self.shards else 0)

    @property
    def total_training_bytes(self) -> int:
        return self.training_bytes + (sum(part.training_bytes for part in self.shards.parts) if self.shards else 0)


class StepFile(Protocol):
    """Sections of a checked step file, decoded on demand."""

    def section(self, key: Any) -> bytes: ...


@dataclass
class _V1Sections:
    parsed: container.Container

    def section(self, key: Any) -> bytes:
        return self.parsed.section(int(key))


# Reading ------------------------------------------------------------------------------------------


def parse(data: bytes, *, where: str, sections: bool = True, kind: str = KIND) -> tuple[StepRecord, StepFile]:
    """Checks a whole step file of either version and reads its record.

    Args:
        data: The whole file.
        where: Names the file in errors.
        sections: Also check every section's digest now, and read the training tree.
            ``False`` reads the record alone (what ``info`` needs); the header is checked either way.
        kind: ``PART_KIND`` to read a part file of a sharded step (v2 only).

    Raises:
        IntegrityError: The file is damaged or truncated.
        FormatError: Not a step file, an unknown version, or a malformed record.
    """
    if data.startswith(container.CHECKPOINT_MAGIC) and kind == KIND:
        parsed = container.parse(where, data, container.CHECKPOINT_MAGIC, what="checkpoint")
        return _record_v1(parsed.header, where=where, stored=len(data)), _V1Sections(parsed)
    file = stfile.read_whole(data, kind=kind, where=where)
    if sections:
        file.check_all()
    return _record_v2(file, training_tree=sections), file


def _record_v2(file: stfile.File, *, training_tree: bool) -> StepRecord:
    where, body = file.where, file.record
    try:
        values = [
            ValueStream(_int(v["width"]), _int(v["count"]), _planes(f"values.w{_int(v['width'])}", _int(v["width"])))
            for v in body["values"]
        ]
        outside = []
        for number, entry in enumerate(body["outside"]):
            gap_width, width = _int(entry["gap_width"]), _int(entry["width"])
            outside.append(
                OutsideRecord(
                    name=_str(entry["tensor"]),
                    mode=_str(entry["mode"]),
                    count=_int(entry["count"]),
                    gap_width=gap_width,
                    position_sections=_planes(f"outside.{number}.positions", gap_width),
                    value_sections=_planes(f"outside.{number}.values", width),
                )
            )
        training = None
        training_bytes = 0
        if body.get("training") is not None:
            streams = [
                ValueStream(
                    _int(s["width"]), _int(s["count"]), _planes(f"training.w{_int(s['width'])}", _int(s["width"]))
                )
                for s in body["training"]["streams"]
            ]
            table = json.loads(file.section("training.tree")) if training_tree else {"tree": None, "tensors": []}
            training = TrainingRecord(
                tree=table["tree"],
                tensors=[TrainingTensor(_str(d), tuple(_int(s) for s in shape)) for d, shape in table["tensors"]],
                streams=streams,
            )
            training_bytes = sum(file.stored_length(name) for name in file.names() if name.startswith("training."))
        metadata = body["metadata"]
        if not isinstance(metadata, dict):
            raise TypeError("metadata must be an object")
        shards = None
        if body.get("shards") is not None:
            found = body["shards"]
            counts = found["outside"]
            if not isinstance(counts, dict):
                raise TypeError("shards.outside must be an object")
            shards = ShardsRecord(
                world=_int(found["world"]),
                parts=[
                    PartRef(
                        _str(part["file"]),
                        _str(part["checksum"]),
                        _str(part["digest"]),
                        _int(part["bytes"]),
                        _int(part["training_bytes"]),
                    )
                    for part in found["parts"]
                ],
                outside={_str(name): _int(count) for name, count in counts.items()},
            )
        part = None
        if file.kind == PART_KIND:
            found = body["part"]
            part = PartRecord(_int(found["rank"]), _int(found["world"]), _str(found["token"]))
        return StepRecord(
            version=2,
            step=_int(body["step"]),
            created=float(body["created"]),
            base_digest=_str(body["base_digest"]),
            mask_digest=_str(body["mask_digest"]),
            k=_int(body["k"]),
            values=values,
            outside=outside,
            metadata=metadata,
            store_id=_str(body["store_id"]),
            digest=_str(body["digest"]),
            training=training,
            stored_bytes=file.stored_bytes,
            training_bytes=training_bytes,
            shards=shards,
            part=part,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise FormatError(f"{where}: malformed step record: {error!r}") from error


def _record_v1(header: dict[str, Any], *, where: str, stored: int) -> StepRecord:
    if header.get("kind") != "checkpoint":
        raise FormatError(f"{where}: not a checkpoint file (kind {header.get('kind')!r})")
    try:
        lengths = [int(entry[1]) for entry in header["sections"]]
        training = None
        training_bytes = 0
        if header.get("training") is not None:
            body = header["training"]
            tensors = []
            for dtype, shape, first, count in body["tensors"]:
                keys = tuple(range(_int(first), _int(first) + _int(count)))
                tensors.append(TrainingTensor(_str(dtype), tuple(_int(s) for s in shape), keys))
                training_bytes += sum(lengths[key] for key in keys if 0 <= key < len(lengths))
            training = TrainingRecord(tree=body["tree"], tensors=tensors)
        metadata = header.get("metadata") or {}
        digests = header["digests"]
        if not isinstance(metadata, dict) or not isinstance(digests, dict):
            raise TypeError("metadata and digests must be objects")
        outside = []
        for name, mode, count, gap_width, first, sections in header["outside_mask"]:
            first, sections, gap_width = _int(first), _int(sections), _int(gap_width)
            split = first + (gap_width if mode == "sparse" else 0)
            outside.append(
                OutsideRecord(
                    name=_str(name),
                    mode=_str(mode),
                    count=_int(count),
                    gap_width=gap_width,
                    position_sections=tuple(range(first, split)),
                    value_sections=tuple(range(split, first + sections)),
                )
            )
        return StepRecord(
            version=1,
            step=_int(header["step"]),
            created=float(header["created"]),
            base_digest=_str(header["base_digest"]),
            mask_digest=_str(header["mask_digest"]),
            k=_int(header["k"]),
            values=[
                ValueStream(_int(w), _int(c), tuple(range(_int(f), _int(f) + _int(w)))) for w, c, f in header["values"]
            ],
            outside=outside,
            metadata=metadata,
            tensor_digests={str(name): str(value) for name, value in digests.items()},
            training=training,
            stored_bytes=stored,
            training_bytes=training_bytes,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise FormatError(f"{where}: malformed checkpoint header: {error!r}") from error


def _planes(prefix: str, width: int) -> tuple[str, ...]:
    return tuple(f"{prefix}.p{plane}" for plane in range(width))


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


# Writing (v2) -------------------------------------------------------------------------------------


@dataclass
class StepContent:
    """What a v2 step file holds, before it is laid out: the record's fields and the coded planes."""

    store_id: str
    step: int
    created: float
    base_digest: str
    mask_digest: str
    k: int
    digest: str
    metadata: dict[str, Any]
    values: list[tuple[int, int, list[Section]]]  # (width, word count, planes)
    outside: list[tuple[str, str, int, int, int, list[Section], list[Section]]]
    # (tensor, mode, count, gap width, word width, position planes, value planes)
    training: tuple[Section, list[tuple[int, int, list[Section]]]] | None = None  # (tree JSON section, streams)
    shards: dict[str, Any] | None = None  # a sharded step's record of its parts (ShardsRecord's fields)
    part: tuple[dict[str, Any], Section] | None = None  # a part file: (PartRecord's fields, its ranges section)

    @property
    def training_bytes(self) -> int:
        """Stored bytes of the training state's sections."""
        if self.training is None:
            return 0
        tree, streams = self.training
        return len(tree.payload) + sum(len(plane.payload) for _, _, planes in streams for plane in planes)


def pack(content: StepContent) -> list[bytes]:
    """A v2 step file's bytes, as pieces for an atomic write."""
    sections: list[tuple[str, Section]] = []
    for width, _, planes in content.values:
        sections.extend(zip(_planes(f"values.w{width}", width), planes, strict=True))
    outside_records = []
    for number, (name, mode, count, gap_width, width, positions, values) in enumerate(content.outside):
        sections.extend(zip(_planes(f"outside.{number}.positions", gap_width), positions, strict=True))
        sections.extend(zip(_planes(f"outside.{number}.values", width), values, strict=True))
        outside_records.append({"tensor": name, "mode": mode, "count": count, "gap_width": gap_width, "width": width})
    training = None
    if content.training is not None:
        tree, streams = content.training
        sections.append(("training.tree", tree))
        for width, _, planes in streams:
            sections.extend(zip(_planes(f"training.w{width}", width), planes, strict=True))
        training = {"streams": [{"width": width, "count": count} for width, count, _ in streams]}
    record = {
        "store_id": content.store_id,
        "step": content.step,
        "created": content.created,
        "base_digest": content.base_digest,
        "mask_digest": content.mask_digest,
        "k": content.k,
        "values": [{"width": width, "count": count} for width, count, _ in content.values],
        "outside": outside_records,
        "digest": content.digest,
        "metadata": content.metadata,
        "training": training,
    }
    if content.shards is not None:
        record["shards"] = content.shards
    if content.part is not None:
        fields, ranges = content.part
        record["part"] = fields
        sections.append((PART_RANGES, ranges))
        return stfile.pack(PART_KIND, record, sections)
    return stfile.pack(KIND, record, sections)
