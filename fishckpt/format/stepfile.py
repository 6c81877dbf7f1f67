"""A step file's record as typed dataclasses, and its container (docs/format.md, "Checkpoint file")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import FormatError
from . import container
from .codec import Section


@dataclass(frozen=True)
class ValueStream:
    """The masked values of every tensor whose words are ``width`` bytes: ``width`` byte planes from ``first``."""

    width: int
    count: int  # words in the stream
    first: int  # index of its first section


@dataclass(frozen=True)
class OutsideRecord:
    """A tensor's entries that differ from the base outside the mask.

    ``sparse``: ``gap_width`` planes of positions, then the value planes.
    ``dense``: the whole tensor's delta planes (``gap_width`` is 0).
    """

    name: str
    mode: str  # "sparse" or "dense"
    count: int  # entries changed outside the mask
    gap_width: int
    first: int
    sections: int


@dataclass(frozen=True)
class TrainingTensor:
    """One tensor of the training state: its dtype name and shape, coded in ``count`` sections from ``first``."""

    dtype: str
    shape: tuple[int, ...]
    first: int
    count: int


@dataclass(frozen=True)
class TrainingRecord:
    """Optimizer, scheduler and RNG state: a JSON tree whose tensors are listed in ``tensors``."""

    tree: Any
    tensors: list[TrainingTensor]


@dataclass
class StepRecord:
    """Everything a step file's header says."""

    step: int
    created: float
    base_digest: str
    mask_digest: str
    k: int
    values: list[ValueStream]
    outside: list[OutsideRecord]
    digests: dict[str, str]
    metadata: dict[str, Any]
    training: TrainingRecord | None = None
    section_lengths: list[int] = field(default_factory=list)  # stored bytes per section, as read

    @property
    def training_bytes(self) -> int:
        """Stored bytes of the training state's sections."""
        if self.training is None:
            return 0
        return sum(self.section_lengths[t.first + i] for t in self.training.tensors for i in range(t.count))

    def to_header(self) -> dict[str, Any]:
        header: dict[str, Any] = {
            "kind": "checkpoint",
            "step": self.step,
            "created": self.created,
            "base_digest": self.base_digest,
            "mask_digest": self.mask_digest,
            "k": self.k,
            "values": [[v.width, v.count, v.first] for v in self.values],
            "outside_mask": [[r.name, r.mode, r.count, r.gap_width, r.first, r.sections] for r in self.outside],
            "digests": self.digests,
            "metadata": self.metadata,
        }
        if self.training is not None:
            header["training"] = {
                "tree": self.training.tree,
                "tensors": [[t.dtype, list(t.shape), t.first, t.count] for t in self.training.tensors],
            }
        return header

    @classmethod
    def from_header(cls, header: dict[str, Any], *, where: str) -> StepRecord:
        """Reads a checked container's header; anything malformed is a FormatError naming ``where``."""
        if header.get("kind") != "checkpoint":
            raise FormatError(f"{where}: not a checkpoint file (kind {header.get('kind')!r})")
        try:
            training = None
            if header.get("training") is not None:
                body = header["training"]
                training = TrainingRecord(
                    tree=body["tree"],
                    tensors=[
                        TrainingTensor(_str(d), tuple(_int(s) for s in shape), _int(first), _int(count))
                        for d, shape, first, count in body["tensors"]
                    ],
                )
            metadata = header.get("metadata") or {}
            digests = header["digests"]
            if not isinstance(metadata, dict) or not isinstance(digests, dict):
                raise TypeError("metadata and digests must be objects")
            return cls(
                step=_int(header["step"]),
                created=float(header["created"]),
                base_digest=_str(header["base_digest"]),
                mask_digest=_str(header["mask_digest"]),
                k=_int(header["k"]),
                values=[ValueStream(_int(w), _int(c), _int(f)) for w, c, f in header["values"]],
                outside=[
                    OutsideRecord(_str(n), _str(m), _int(c), _int(g), _int(f), _int(s))
                    for n, m, c, g, f, s in header["outside_mask"]
                ],
                digests={str(name): str(value) for name, value in digests.items()},
                metadata=metadata,
                training=training,
                section_lengths=[int(entry[1]) for entry in header["sections"]],
            )
        except (KeyError, TypeError, ValueError) as error:
            raise FormatError(f"{where}: malformed checkpoint header: {error!r}") from error


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def pack(record: StepRecord, sections: list[Section]) -> list[bytes]:
    """A step file's bytes, as pieces for an atomic write."""
    return container.pack(container.CHECKPOINT_MAGIC, record.to_header(), sections)


def parse(data: bytes, *, where: str) -> tuple[StepRecord, container.Container]:
    """Checks a step file's bytes and reads its record; sections are decoded on demand from the container."""
    parsed = container.parse(where, data, container.CHECKPOINT_MAGIC, what="checkpoint")
    return StepRecord.from_header(parsed.header, where=where), parsed
