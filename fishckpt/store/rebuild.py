"""Rebuilding a step's tensors from the base and a decoded step, and proving them against the recorded digests."""

from __future__ import annotations

import torch

from ..errors import IntegrityError
from ..format.bits import byte_view, differs, element_words
from ..format.manifest import TensorEntry
from .layout import StoreLayout
from .stepcodec import Decoded, tensor_digest


def rebuild(layout: StoreLayout, entry: TensorEntry, out: torch.Tensor, decoded: Decoded, *, verify: bool) -> None:
    """Writes step ``decoded`` of one tensor into the contiguous CPU tensor ``out``."""
    source, target = layout.base_bytes(entry), byte_view(out)
    # One whole copy, then hash the copy: chunked copies into fresh pages ran 4x slower at times,
    # and a C copy-hash loop was slower than torch's whole-tensor copy (measured; docs/benchmarks.md).
    target.copy_(source)
    if verify:
        failed = layout.check_base_chunks(entry, target)
        if failed is not None:
            raise layout.base_chunk_error(entry, failed)
    apply(layout, entry, out, decoded)
    if verify:
        check_rebuilt(layout, entry, out, decoded)


def apply(layout: StoreLayout, entry: TensorEntry, out: torch.Tensor, decoded: Decoded) -> None:
    """Scatters a step's masked values and outside-mask changes into ``out`` (already the base)."""
    elements = element_words(out)
    positions, words = decoded.extras.get(entry.name, (None, None))
    if words is not None and positions is None:
        # A dense record is the whole tensor outside the mask (masked entries hold base values),
        # so it goes first and the masked values over it.
        elements.copy_(words.to(out.device))
    index = layout.plans()[entry.name].index
    if index.numel():
        values = decoded.masked[entry.name]
        if out.device.type != "cpu":
            index, values = layout.device_index(entry.name, out.device), values.to(out.device)
        elements.index_copy_(0, index, values)
    if words is not None and positions is not None:
        elements.index_copy_(0, positions.to(out.device), words.to(out.device))


def rebuilt_digest(layout: StoreLayout, entry: TensorEntry, out: torch.Tensor, decoded: Decoded) -> str:
    """The tensor digest of ``out``, read back at every position the step set."""
    elements = element_words(out)
    index = layout.plans()[entry.name].index
    masked_back = elements.index_select(0, index.to(out.device)).cpu()
    positions, words = None, None
    if entry.name in decoded.extras:
        positions, _ = decoded.extras[entry.name]
        if positions is None:  # dense: recover the canonical set of changed positions
            base_elements = element_words(layout.base()[entry.name])
            changed = differs(elements.cpu(), base_elements)
            changed[index] = False
            positions = torch.nonzero(changed).reshape(-1)
        words = elements.index_select(0, positions.to(out.device)).cpu()
    return tensor_digest(entry, masked_back, positions, words)


def check_rebuilt(layout: StoreLayout, entry: TensorEntry, out: torch.Tensor, decoded: Decoded) -> None:
    """Raises IntegrityError naming the step file unless ``out`` has the digest recorded at save."""
    if rebuilt_digest(layout, entry, out, decoded) != decoded.record.digests.get(entry.name):
        raise IntegrityError(
            f"{decoded.where}: tensor {entry.name!r} does not match the digest recorded at save; "
            "the checkpoint file is damaged; restore it from a copy or delete this step"
        )


def digest_matches(layout: StoreLayout, entry: TensorEntry, decoded: Decoded) -> bool:
    """Whether the step's content for ``entry`` has its recorded digest, computed in O(k) where it can be."""
    positions, words = decoded.extras.get(entry.name, (None, None))
    if positions is None and words is not None:  # dense record: rebuild to find the changed positions
        out = layout.base()[entry.name].clone()
        apply(layout, entry, out, decoded)
        return rebuilt_digest(layout, entry, out, decoded) == decoded.record.digests.get(entry.name)
    digest = tensor_digest(entry, decoded.masked[entry.name], positions, words)
    return digest == decoded.record.digests.get(entry.name)
