"""The exact check where the state lives: a per-chunk checksum made of torch integer ops, on any device.

On a GPU the xxh3 scan would copy the whole state to the host, an O(model) PCIe
transfer per save. Here each element's bits are mixed with its position (a
splitmix64 finaliser: xor-shifts and multiplications by odd constants, in int64
that wraps) and summed per hashing chunk on the device, reading device memory
once; only the per-chunk sums (8 bytes per 4 MiB) and the k masked values cross
PCIe. The masked entries are taken out of each chunk's sum and the base's put in,
so a chunk passes when its sum equals the base chunk's. A chunk that fails is
copied to the host and compared exactly, entry by entry, as the xxh3 path does.

What it promises (docs/exactness.md): any change of one element, one bit included,
changes its chunk's sum, since the mix is a bijection of the word for a given
position (the splitmix64 finaliser, with logical shifts); a change of many elements
(weight decay on every entry, a moved buffer) leaves the sum unchanged only if the
changes cancel modulo 2^64, which for changes not crafted against this function
happens with probability about 2^-64 per chunk.
It is not a cryptographic hash and, unlike xxh3 on the CPU, a 64-bit sum: xxh3
stays the check for CPU tensors. The same code runs on CPU tensors behind
``device_check=True``, so the whole test suite covers it without a GPU.
"""

from __future__ import annotations

import torch

from ..format.bits import element_words
from ..format.manifest import TensorEntry

_POSITION = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
_MULTIPLY_1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MULTIPLY_2 = -7723592293110705685  # 0x94D049BB133111EB
_SLICE_ELEMENTS = 1 << 23  # bounds the int64 temporaries to ~200 MiB a slice


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic): the bits shifted in are 0."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix(words: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The per-element hash: splitmix64's finaliser of the word xor its position times an odd constant.

    Each step (xor with a constant, xor with a logical right shift, multiplication by an odd
    constant modulo 2^64) is a bijection, so for one position two different words never mix alike.
    """
    z = words ^ (positions * _POSITION)
    z = (z ^ _shr(z, 30)) * _MULTIPLY_1
    z = (z ^ _shr(z, 27)) * _MULTIPLY_2
    return z ^ _shr(z, 31)


def _as_int64(words: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Element words as int64 (flat), and words per element (2 for 16-byte elements)."""
    per = words.shape[1] if words.dim() == 2 else 1
    return words.reshape(-1).to(torch.int64), per


def chunk_sums(entry: TensorEntry, tensor: torch.Tensor, per_chunk: int) -> torch.Tensor:
    """The checksum of every hashing chunk of a contiguous tensor, on its device (int64, one per chunk)."""
    words = element_words(tensor)
    per = words.shape[1] if words.dim() == 2 else 1
    numel = entry.numel
    chunks = max(1, -(-numel // per_chunk))
    sums = torch.zeros(chunks, dtype=torch.int64, device=tensor.device)
    slice_elements = max(per_chunk, (_SLICE_ELEMENTS // per_chunk) * per_chunk)
    flat = words.reshape(numel, per) if numel else words.reshape(0, per)
    for start in range(0, numel, slice_elements):
        stop = min(start + slice_elements, numel)
        part = flat[start:stop].to(torch.int64)
        positions = torch.arange(start * per, stop * per, device=tensor.device, dtype=torch.int64).reshape(-1, per)
        hashed = mix(part, positions).sum(dim=1)  # one value per element
        first = start // per_chunk
        whole = (stop - start) // per_chunk
        if whole:
            sums[first : first + whole] += hashed[: whole * per_chunk].reshape(whole, per_chunk).sum(dim=1)
        if whole * per_chunk < stop - start:
            sums[first + whole] += hashed[whole * per_chunk :].sum()
    return sums


def masked_sums(index: torch.Tensor, words: torch.Tensor, per_chunk: int, chunks: int) -> torch.Tensor:
    """Per chunk, the checksum contribution of the elements at ``index`` holding ``words`` (element words)."""
    per = words.shape[1] if words.dim() == 2 else 1
    flat = words.reshape(-1, per).to(torch.int64)
    positions = index.reshape(-1, 1) * per + torch.arange(per, device=index.device, dtype=torch.int64)
    hashed = mix(flat, positions).sum(dim=1)
    sums = torch.zeros(chunks, dtype=torch.int64, device=index.device)
    if index.numel():
        sums.index_add_(0, torch.div(index, per_chunk, rounding_mode="floor"), hashed)
    return sums


def differing_chunks(
    entry: TensorEntry,
    tensor: torch.Tensor,
    index: torch.Tensor,
    state_words: torch.Tensor,
    base_words: torch.Tensor,
    base_sums: torch.Tensor,
    per_chunk: int,
) -> list[int]:
    """The chunks of ``tensor`` that differ from the base outside the mask, by checksum, computed on its device.

    Args:
        entry: The tensor's manifest entry.
        tensor: The live tensor (contiguous, any device).
        index: Its mask indices, on its device.
        state_words: Its element words at ``index`` (on its device).
        base_words: The base's element words at ``index`` (on its device).
        base_sums: ``chunk_sums`` of the base tensor (any device).
        per_chunk: Elements per hashing chunk.
    """
    sums = chunk_sums(entry, tensor, per_chunk)
    chunks = sums.numel()
    reset = (
        sums - masked_sums(index, state_words, per_chunk, chunks) + masked_sums(index, base_words, per_chunk, chunks)
    )
    differs = reset.cpu() != base_sums.cpu()  # O(chunks) across PCIe
    return [int(chunk) for chunk in torch.nonzero(differs).reshape(-1).tolist()]
