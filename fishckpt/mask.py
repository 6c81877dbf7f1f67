"""The fixed sparse mask: sorted flat indices per tensor, and its compact file."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from .errors import FormatError, MaskMismatchError, MissingFileError
from .format import digests, maskfile
from .statefiles import load_state_file, looks_like_state_file
from .storage.local import atomic_write

PathLike = str | Path


class Mask:
    """A fixed sparse mask: for each tensor name, the sorted flat indices that are trainable.

    Indices are positions in the row-major flattened tensor (``t.reshape(-1)``).
    A mask also knows the shape of each tensor it covers, including tensors with
    no trainable entries.

    Example:
        >>> mask = Mask.from_bool({"w": torch.tensor([[True, False], [False, True]])})
        >>> mask.k, mask.numel, mask["w"].tolist()
        (2, 4, [0, 3])
    """

    __slots__ = ("_digest", "_indices", "_k", "_numel", "_shapes")

    def __init__(self, indices: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]]) -> None:
        """Builds a mask from already sorted, unique int64 indices; prefer the ``from_*`` constructors."""
        if set(indices) != set(shapes):
            missing = sorted(set(indices) ^ set(shapes))
            raise MaskMismatchError(f"mask indices and shapes name different tensors: {missing}")
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._indices: dict[str, torch.Tensor] = {}
        for name, shape in shapes.items():
            shape_t = tuple(int(s) for s in shape)
            if any(s < 0 for s in shape_t):
                raise MaskMismatchError(f"mask tensor {name!r} has a negative dimension in shape {shape_t}")
            index = indices[name]
            if index.dtype != torch.int64 or index.dim() != 1:
                raise MaskMismatchError(f"mask tensor {name!r}: indices must be a 1-d int64 tensor")
            index = index.detach().to("cpu").contiguous()
            numel = math.prod(shape_t)
            if index.numel():
                if bool((index[1:] <= index[:-1]).any()):
                    raise MaskMismatchError(f"mask tensor {name!r}: indices must be sorted and unique")
                if int(index[0]) < 0 or int(index[-1]) >= numel:
                    raise MaskMismatchError(
                        f"mask tensor {name!r}: index out of range for shape {shape_t} "
                        f"({int(index[0])}..{int(index[-1])}, numel {numel})"
                    )
            self._shapes[name] = shape_t
            self._indices[name] = index
        self._digest: str | None = None
        self._k = sum(index.numel() for index in self._indices.values())
        self._numel = sum(math.prod(shape) for shape in self._shapes.values())

    # Construction ---------------------------------------------------------------------------

    @classmethod
    def from_bool(cls, mapping: Mapping[str, torch.Tensor]) -> Mask:
        """From bool (or 0/1 numeric) tensors shaped like the parameters; True/1 is trainable."""
        indices, shapes = {}, {}
        for name, tensor in mapping.items():
            flat = tensor.detach().reshape(-1)
            if flat.dtype != torch.bool:
                if flat.is_complex() or not bool(((flat == 0) | (flat == 1)).all()):
                    raise MaskMismatchError(
                        f"mask tensor {name!r} has values other than 0 and 1; pass bool or 0/1 tensors"
                    )
                flat = flat != 0
            indices[name] = torch.nonzero(flat.cpu()).reshape(-1)
            shapes[name] = tuple(tensor.shape)
        return cls(indices, shapes)

    @classmethod
    def from_indices(
        cls, mapping: Mapping[str, torch.Tensor | Sequence[int]], shapes: Mapping[str, Sequence[int]]
    ) -> Mask:
        """From flat indices per tensor (any order, no duplicates) and the tensors' shapes.

        Tensors in ``shapes`` but not in ``mapping`` get no trainable entries.
        """
        unknown = sorted(set(mapping) - set(shapes))
        if unknown:
            raise MaskMismatchError(f"indices given for tensors without a shape: {unknown}")
        indices = {}
        for name in shapes:
            raw = mapping.get(name, ())
            index = torch.as_tensor(raw, dtype=torch.int64).reshape(-1).sort().values
            if index.numel() > 1 and bool((index[1:] == index[:-1]).any()):
                raise MaskMismatchError(f"mask tensor {name!r}: duplicate indices")
            indices[name] = index
        return cls(indices, shapes)

    # Queries ----------------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        """Every tensor the mask covers, in order, including those with no entries."""
        return tuple(self._shapes)

    @property
    def k(self) -> int:
        """The number of trainable entries."""
        return self._k

    @property
    def numel(self) -> int:
        """The number of entries in all covered tensors."""
        return self._numel

    @property
    def density(self) -> float:
        """k / numel (0.0 for an empty mask)."""
        numel = self.numel
        return self.k / numel if numel else 0.0

    def check_fits(
        self,
        named: Mapping[str, torch.Tensor],
        *,
        owner: str = "the model",
        fix: str = "build the mask from this model's parameters (e.g. fisher_scores(model, ...))",
    ) -> None:
        """Raises MaskMismatchError unless every tensor the mask names is one of ``named``, in the same shape.

        ``named`` maps parameter names to parameters; ``owner`` names what they came from and
        ``fix`` says what to do, in the message.
        """
        for name in self.names:
            param = named.get(name)
            if param is None:
                raise MaskMismatchError(
                    f"the mask names {name!r}, which is not a trainable parameter of {owner}; {fix}"
                )
            if tuple(param.shape) != self.shape(name):
                raise MaskMismatchError(
                    f"mask tensor {name!r} has shape {self.shape(name)} but the parameter has {tuple(param.shape)}"
                )

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def counts(self) -> dict[str, int]:
        """Trainable entries per tensor."""
        return {name: index.numel() for name, index in self._indices.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        """The sorted int64 flat indices of tensor ``name``."""
        try:
            return self._indices[name]
        except KeyError:
            raise KeyError(f"the mask has no tensor {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._indices

    def __iter__(self) -> Iterator[str]:
        return iter(self._indices)

    def __len__(self) -> int:
        return len(self._indices)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask):
            return NotImplemented
        return self.digest == other.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        return f"Mask(k={self.k}, numel={self.numel}, density={self.density:.4%}, tensors={len(self)})"

    def to_bool(self) -> dict[str, torch.Tensor]:
        """Bool tensors shaped like the parameters, True where trainable."""
        out = {}
        for name, shape in self._shapes.items():
            flat = torch.zeros(math.prod(shape), dtype=torch.bool)
            flat[self._indices[name]] = True
            out[name] = flat.reshape(shape)
        return out

    @property
    def digest(self) -> str:
        """The mask's identity: xxh3-128 of its names, shapes and indices, independent of file encoding."""
        if self._digest is None:
            names = sorted(self._shapes)
            table = [[name, list(self._shapes[name]), self._indices[name].numel()] for name in names]
            self._digest = digests.mask_digest(table, (self._indices[name].numpy() for name in names))
        return self._digest

    # Files ------------------------------------------------------------------------------------

    def save(self, path: PathLike, *, overwrite: bool = True) -> int:
        """Writes the compact mask file (docs/format.md, "Mask file") atomically.

        Returns:
            The number of bytes written.
        """
        return atomic_write(Path(path), self.file_bytes(), overwrite=overwrite)

    def file_bytes(self) -> list[bytes]:
        """The mask file's bytes, as pieces."""
        return maskfile.encode(
            {name: index.numpy() for name, index in self._indices.items()}, self._shapes, self.digest
        )

    @classmethod
    def from_file_bytes(cls, data: bytes, *, where: str) -> Mask:
        """Reads fishckpt's own mask file from its bytes; ``where`` names it in errors.

        Raises:
            IntegrityError: The file is corrupted or truncated.
            FormatError: It breaks a rule of the format, or its content does not match its recorded digest.
        """
        indices, shapes, recorded = maskfile.decode(data, where=where)
        mask = cls({name: torch.from_numpy(index) for name, index in indices.items()}, shapes)
        if recorded != mask.digest:
            raise FormatError(f"{where}: mask content does not match its recorded digest")
        return mask

    @classmethod
    def load(cls, path: PathLike) -> Mask:
        """Reads a mask file: fishckpt's own, or safetensors / PyTorch files of bool or 0/1 tensors.

        PyTorch files are read with ``torch.load(weights_only=True)``; no pickle code runs.
        """
        path = Path(path)
        try:
            with open(path, "rb") as handle:
                head = handle.read(8 + 4096)
        except FileNotFoundError:
            raise MissingFileError(f"{path}: mask file not found") from None
        if maskfile.is_mask_file(head):
            return cls.from_file_bytes(path.read_bytes(), where=str(path))
        if not looks_like_state_file(head):
            raise FormatError(
                f"{path}: not a mask file; expected a fishckpt mask, or a safetensors or PyTorch "
                "file of bool or 0/1 tensors"
            )
        return cls.from_bool(load_state_file(path))
