"""Sharded saves: every rank writes the masked values of its own shard, and rank 0 commits the step last.

The protocol of ``CheckpointStore.save`` on a state of DTensors (docs/format.md, "Sharded steps"):

1. Each rank captures its shard (store/shards.py) on the calling thread.
2. At commit, rank 0 draws a token for this save and sends it to every rank; each rank writes its
   part file, ``steps/step-N.<token>.part-<rank>-of-<world>.safetensors``, which no reader looks at
   until a step file lists it.
3. Every rank reports its part (or its error) to rank 0. Rank 0 checks that the parts cover every
   tensor exactly once and, under the store's lock, publishes the step file listing each part's
   checksum and digest: the step appears whole, at once, or not at all.
4. Rank 0 tells every rank the outcome, and each raises the same error if there was one.

A rank killed at any point leaves at most part files that no step lists; they are deleted by the
next sharded save into the store. The ranks talk over a gloo group of their own, with JSON
(never pickle), so a save committed on a background thread never mixes its messages with the
training's own collectives.

This module imports torch.distributed inside its functions only: it runs only when a state holds
DTensors, which torch.distributed made.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import json
import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import FishckptError, IntegrityError, StateMismatchError
from ..format import digests, stepfile, stfile
from ..format.bits import byte_view, plain
from ..format.dtypes import DType
from ..format.manifest import Manifest, TensorEntry
from ..format.names import BASE_NAME, MANIFEST_V2, STEPS_DIR, mask_name, part_file_name, part_step_of
from ..mask import Mask
from ..sharding import Piece, piece_of
from ..storage import LocalStorage
from . import basefile, shards, stepcodec
from .layout import StoreLayout
from .table import build_table

_GROUPS: dict[int, Any] = {}


@dataclass
class Ranks:
    """This process's place among the ranks, and the group the store's own messages go through."""

    rank: int
    world: int
    group: Any


def ranks() -> Ranks:
    """The calling process's rank and world size, with the store's gloo group (made on first use, on every rank).

    Raises:
        StateMismatchError: The state holds DTensors but torch.distributed is not initialized.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise StateMismatchError(
            "the state holds DTensors but torch.distributed is not initialized; call save on every rank of the "
            "process group that sharded it, or save a full (non-DTensor) state dict"
        )
    world_group = dist.group.WORLD
    key = id(world_group)
    group = _GROUPS.get(key)
    if group is None:
        # A collective: every rank reaches it in its first sharded save or load, in the same order.
        group = _GROUPS[key] = dist.new_group(backend="gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), group)


# Messages between ranks, as JSON -------------------------------------------------------------------


def _encode(message: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(message, allow_nan=False).encode()), dtype=torch.uint8)


def gather_json(message: Any, where: Ranks) -> list[Any] | None:
    """Every rank's JSON ``message``, in rank order, on rank 0 (None elsewhere)."""
    import torch.distributed as dist

    data = _encode(message)
    longest = torch.tensor([data.numel()], dtype=torch.int64)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=where.group)
    padded = torch.zeros(int(longest) + 8, dtype=torch.uint8)  # 8 bytes of length, then the message
    padded[:8] = torch.tensor([data.numel()], dtype=torch.int64).view(torch.uint8)
    padded[8 : 8 + data.numel()] = data
    # gather, not all_gather: only rank 0 holds every message, so a message of O(k) bytes per
    # rank (create's masked values) costs O(k) in all on rank 0 and nothing on the others.
    found = [torch.zeros_like(padded) for _ in range(where.world)] if where.rank == 0 else None
    dist.gather(padded, found, dst=0, group=where.group)
    if found is None:
        return None
    out = []
    for item in found:
        size = int(item[:8].view(torch.int64))
        out.append(json.loads(bytes(item[8 : 8 + size].numpy())))
    return out


def broadcast_json(message: Any, where: Ranks) -> Any:
    """Rank 0's JSON ``message``, on every rank."""
    import torch.distributed as dist

    data = _encode(message) if where.rank == 0 else torch.zeros(0, dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    dist.broadcast(size, src=0, group=where.group)
    buffer = data if where.rank == 0 else torch.zeros(int(size), dtype=torch.uint8)
    dist.broadcast(buffer, src=0, group=where.group)
    return json.loads(bytes(buffer.numpy()))


def describe(error: BaseException, rank: int) -> dict[str, Any]:
    """An error as a message for the other ranks, naming the rank it happened on (once)."""
    message = str(error) if getattr(error, "_fishckpt_from_rank", False) else f"rank {rank}: {error}"
    return {"ok": False, "type": type(error).__name__, "message": message}


def rebuild_error(found: dict[str, Any]) -> BaseException:
    """The error another rank reported, as the same type where it is one of ours or a builtin."""
    ours = {cls.__name__: cls for cls in _subclasses(FishckptError)}
    kind = ours.get(found["type"]) or getattr(builtins, found["type"], None)
    message = found["message"]
    error: BaseException = FishckptError(f"{found['type']}: {message}")
    if isinstance(kind, type) and issubclass(kind, Exception):
        with contextlib.suppress(TypeError):  # a type that takes other arguments: keep the generic error
            error = kind(message)
    error._fishckpt_from_rank = True  # type: ignore[attr-defined]  # passed on again, it keeps its rank
    return error


def _subclasses(cls: type[Exception]) -> list[type[Exception]]:
    found = [cls]
    children: list[type[Exception]] = cls.__subclasses__()
    for child in children:
        found.extend(_subclasses(child))
    return found


# Writing --------------------------------------------------------------------------------------------


def pieces_of(layout: StoreLayout, tensors: list[torch.Tensor], rank: int) -> list[Piece]:
    """Each table row's piece on this rank (fishckpt/sharding.py)."""
    entries = layout.table.entries
    return [piece_of(entry.name, tensor, rank=rank) for entry, tensor in zip(entries, tensors, strict=True)]


def write_part(
    storage: Any,
    shard: shards.Shard,
    step: int,
    values: np.ndarray,
    changes: dict[str, stepcodec.Change],
    training: tuple[Any, list[torch.Tensor]] | None,
    where: Ranks,
    token: str,
    mask_digest: str,
) -> dict[str, Any]:
    """Codes and writes this rank's part file; returns its report for rank 0."""
    layout = shard.layout
    encoded = stepcodec.encode(layout, step, values, changes, {}, training, store_id=layout.manifest.store_id or "")
    content = encoded.content
    content.mask_digest = mask_digest  # the store's; the part's digest binds its ranges through the local one
    content.part = ({"rank": where.rank, "world": where.world, "token": token}, shards.ranges_section(shard))
    pieces = stepfile.pack(content)
    name = part_file_name(step, token, where.rank, where.world)
    written = storage.publish(f"{STEPS_DIR}/{name}", pieces, overwrite=True)
    checksum = stfile.read_whole(pieces[0] + b"".join(pieces[1:]), kind=stepfile.PART_KIND, where=name).checksum
    table = layout.table
    return {
        "ok": True,
        "file": name,
        "checksum": checksum,
        "digest": content.digest,
        "bytes": written,
        "training_bytes": content.training_bytes,
        # Changes outside the mask are reported per tensor; their positions stay in the part file.
        "changed": {name: count for name, count in encoded.changed.items()},
        "storage": encoded.storage,
        "ranges": base64.b64encode(np.ascontiguousarray(shard.ranges, dtype="<i8").tobytes()).decode(),
        "rows": len(table.entries),
    }


def parts_ranges(reports: list[dict[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for report in reports:
        pairs = np.frombuffer(base64.b64decode(report["ranges"]), dtype="<i8").reshape(-1, 2).astype(np.int64)
        out.append((pairs[:, 0].copy(), pairs[:, 1].copy()))
    return out


def step_content_fields(reports: list[dict[str, Any]], world: int) -> dict[str, Any]:
    """The ``shards`` record of a sharded step file, from the parts' reports."""
    outside: dict[str, int] = {}
    for report in reports:
        for name, count in report["changed"].items():
            outside[name] = outside.get(name, 0) + int(count)
    return {
        "world": world,
        "parts": [
            {
                "file": report["file"],
                "checksum": report["checksum"],
                "digest": report["digest"],
                "bytes": report["bytes"],
                "training_bytes": report["training_bytes"],
            }
            for report in reports
        ],
        "outside": outside,
    }


@dataclass(frozen=True)
class Committed:
    """What a sharded save wrote, as every rank learns it from rank 0."""

    bytes: int  # the step file and every part
    changed: dict[str, int]  # entries changed outside the mask, per tensor
    storage: dict[str, str]  # how each changed tensor's outside entries are stored
    training_bytes: int


def commit(
    storage: Any,
    layout: StoreLayout,
    pending: Any,
    publish: Callable[[stepfile.StepContent, set[str]], int],
    *,
    where: str,
) -> Committed:
    """Steps 2-4 of the protocol above, on this rank; ``publish`` is the store's, called on rank 0 only.

    ``pending`` is the store's ``PendingSave`` of a sharded capture. Any rank's failure, at
    capture, at its write or at publication, is raised on every rank with its original type, and
    every rank then deletes the part it wrote.
    """
    ranks, shard, step = pending.ranks, pending.shard, pending.step
    token = broadcast_json(secrets.token_hex(8), ranks)
    written = None
    try:
        if pending.error is not None:
            raise rebuild_error(pending.error)
        report = write_part(
            storage,
            shard,
            step,
            pending.values,
            pending.changes,
            pending.training,
            ranks,
            token,
            layout.manifest.mask_digest,
        )
        written = report["file"]
    except Exception as error:  # reported to rank 0, then raised on every rank
        report = describe(error, ranks.rank)
    reports = gather_json(report, ranks)
    outcome: dict[str, Any] = {}
    if reports is not None:
        try:
            outcome = _publish(layout, pending, reports, ranks.world, publish, where=where)
        except Exception as error:
            outcome = describe(error, ranks.rank)
    outcome = broadcast_json(outcome, ranks)
    if not outcome["ok"]:
        if written is not None:
            with contextlib.suppress(OSError):
                storage.delete(f"{STEPS_DIR}/{written}")
        raise rebuild_error(outcome)
    return Committed(
        bytes=int(outcome["bytes"]),
        changed={name: int(count) for name, count in outcome["changed"].items()},
        storage=dict(outcome["storage"]),
        training_bytes=int(outcome["training_bytes"]),
    )


def _publish(
    layout: StoreLayout,
    pending: Any,
    reports: list[dict[str, Any]],
    world: int,
    publish: Callable[[stepfile.StepContent, set[str]], int],
    *,
    where: str,
) -> dict[str, Any]:
    """Rank 0: checks every rank's part, then has the store publish the step file that lists them."""
    failed = [report for report in reports if not report["ok"]]
    if failed:
        raise rebuild_error(failed[0])
    table = layout.table
    shards.check_coverage(table.numels, table.names, parts_ranges(reports), where=where)
    fields = step_content_fields(reports, world)
    content = stepfile.StepContent(
        store_id=layout.manifest.store_id or "",
        step=pending.step,
        created=time.time(),
        base_digest=layout.manifest.base_digest,
        mask_digest=layout.manifest.mask_digest,
        k=layout.mask.k,
        digest=digests.sharded_step_digest([report["digest"] for report in reports]),
        metadata=pending.metadata,
        values=[],
        outside=[],
        shards=fields,
    )
    written = publish(content, {report["file"] for report in reports})
    changed_storage: dict[str, str] = {}
    for report in reports:
        changed_storage.update(report["storage"])
    return {
        "ok": True,
        "bytes": written + sum(int(report["bytes"]) for report in reports),
        "changed": fields["outside"],
        "storage": changed_storage,
        "training_bytes": sum(int(report["training_bytes"]) for report in reports),
    }


def remove_orphan_parts(storage: Any, part_files: Callable[[int], list[str]], *, keep: set[str]) -> None:
    """Deletes part files that no step file lists (``part_files(step)`` says which it lists): what
    ranks killed mid-save leave behind. O(steps): a store object runs it once."""
    by_step: dict[int, list[str]] = {}
    for name in storage.list(STEPS_DIR):
        step = part_step_of(name)
        if step is not None and name not in keep:
            by_step.setdefault(step, []).append(name)
    for step, names in by_step.items():
        listed = set(part_files(step))
        for name in names:
            if name not in listed:
                with contextlib.suppress(FileNotFoundError):
                    storage.delete(f"{STEPS_DIR}/{name}")


# Reading --------------------------------------------------------------------------------------------


def decode(
    layout: StoreLayout,
    storage: Any,
    record: stepfile.StepRecord,
    file: stepfile.StepFile,
    shard_for: Callable[[np.ndarray, np.ndarray], shards.Shard],
    *,
    where: str,
) -> stepcodec.Decoded:
    """Reads every part of a sharded step, proves each, and puts the whole step together (O(k))."""
    found = record.shards
    assert found is not None
    if len(found.parts) != found.world:
        raise IntegrityError(f"{where}: the step lists {len(found.parts)} parts for {found.world} ranks")
    if digests.sharded_step_digest([part.digest for part in found.parts]) != record.digest:
        raise IntegrityError(f"{where}: the step's digest does not match its parts' digests; the step file is damaged")
    values = layout.table.new_values()
    changes: dict[str, list[stepcodec.Change]] = {}
    decoded_parts: list[stepcodec.Decoded] = []
    ranges = []
    for rank, part in enumerate(found.parts):
        key = f"{STEPS_DIR}/{part.file}"
        part_where = storage.where(key)
        if part_step_of(part.file) != record.step:
            raise IntegrityError(f"{where}: part {part.file!r} is not a part of step {record.step}")
        try:
            data = storage.read(key)
        except FileNotFoundError:
            raise IntegrityError(
                f"{part_where}: a part of step {record.step} is missing; the step cannot be restored: delete it"
            ) from None
        part_record, part_file = stepfile.parse(data, where=part_where, kind=stepfile.PART_KIND)
        checksum = getattr(part_file, "checksum", None)
        if checksum != part.checksum or part_record.digest != part.digest:
            raise IntegrityError(
                f"{part_where}: this part file is not the one step {record.step} recorded (it was replaced or "
                "damaged); the step cannot be restored: delete it"
            )
        info = part_record.part
        if (
            info is None
            or info.rank != rank
            or info.world != found.world
            or part_record.step != record.step
            or part_record.store_id != record.store_id
            or part_record.base_digest != record.base_digest
            or part_record.mask_digest != record.mask_digest
        ):
            raise IntegrityError(f"{part_where}: the part does not belong to step {record.step} of this store")
        starts, stops = shards.read_ranges(layout, part_file, where=part_where)
        shard = shard_for(starts, stops)
        local = stepcodec.decode(shard.layout, part_record, part_file, where=part_where)
        shard.place(local.values, values)
        shards.place_changes(shard, local, changes)
        ranges.append((starts, stops))
        local.values = local.values[:0]  # kept for its training state only
        decoded_parts.append(local)
    shards.check_coverage(layout.table.numels, layout.table.names, ranges, where=where)
    return stepcodec.Decoded(where, record, file, values, shards.merge_changes(layout, changes), decoded_parts)


# Creating a store from a sharded base ---------------------------------------------------------------


def create(
    storage: Any,
    entries: list[TensorEntry],
    tensors: list[tuple[str, torch.Tensor, DType]],
    mask: Mask,
    *,
    replace: bool,
    owned: Any,
    chunk_bytes: int,
    lock_timeout: float,
) -> None:
    """Builds a store whose base is a sharded state: each rank writes its own ranges of the one base file.

    Rank 0 lays out the base file (header and size) in the new store's hidden folder; every rank
    writes its pieces at their offsets and hashes the chunks that start in them; rank 0 gathers
    the chunk digests and the base's values at the mask (O(k)), and publishes the mask and the
    manifest last. No rank ever holds more than its own shard. The ranks must share the store's
    file system (one machine, or a shared mount), since they write into one file.
    """
    if not isinstance(storage, LocalStorage):
        raise NotImplementedError(
            f"{storage.url}: a store at a URL cannot be created from a sharded state (object storage has no "
            "file that several processes write into); create it from the full state on one process (e.g. the "
            "pretrained weights, before fully_shard), or at a local or shared path"
        )
    where = ranks()
    head, offsets = basefile.base_header([(name, row, tuple(tensor.shape)) for name, tensor, row in tensors])
    size = len(head) + sum(math.prod(tensor.shape) * row.itemsize for _, tensor, row in tensors)
    pieces = [piece_of(name, tensor, rank=where.rank) for name, tensor, _ in tensors]
    layout_rows = [(name, row, piece, offsets[name]) for (name, _, row), piece in zip(tensors, pieces, strict=True)]
    if where.rank != 0:
        path = _expect(broadcast_json(None, where))["path"]
        _write_and_hash(path, layout_rows, entries, mask, chunk_bytes, where)
        _expect(broadcast_json(None, where))
        return
    awaiting = False  # whether the other ranks wait for the final outcome
    try:
        with storage.new_root(replace=replace, marker=MANIFEST_V2, owned=owned, timeout=lock_timeout) as staging:
            assert isinstance(staging, LocalStorage)
            path = str(staging.path(BASE_NAME))
            try:
                with open(path, "wb") as handle:
                    handle.write(head)
                    handle.truncate(size)
                started: dict[str, Any] = {"ok": True, "path": str(path)}
            except Exception as error:
                started = describe(error, 0)
            _expect(broadcast_json(started, where))
            manifest = _write_and_hash(path, layout_rows, entries, mask, chunk_bytes, where)
            awaiting = True
            assert manifest is not None
            staging.publish(mask_name(2), mask.file_bytes(), overwrite=False)
            staging.make_folder(STEPS_DIR)
            staging.publish(MANIFEST_V2, manifest.pack(), overwrite=False)  # last: the commit marker
        broadcast_json({"ok": True}, where)
    except Exception as error:
        if awaiting:
            broadcast_json(describe(error, 0), where)
        raise


def _expect(message: dict[str, Any]) -> dict[str, Any]:
    if not message["ok"]:
        raise rebuild_error(message)
    return message


def _write_and_hash(
    path: str,
    rows: list[tuple[str, DType, Piece, int]],
    entries: list[TensorEntry],
    mask: Mask,
    chunk_bytes: int,
    where: Ranks,
) -> Manifest | None:
    """Every rank: writes its pieces, then hashes the chunks that start in them; rank 0 returns the manifest."""
    try:
        descriptor = os.open(path, os.O_WRONLY)
        try:
            for _, row, piece, offset in rows:
                if piece.writes and piece.stop > piece.start:
                    view = byte_view(plain(piece.local).contiguous().cpu()).numpy().data
                    position = offset + piece.start * row.itemsize
                    for begin in range(0, len(view), 1 << 30):  # pwrite takes at most ~2 GiB at once
                        os.pwrite(descriptor, view[begin : begin + (1 << 30)], position + begin)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        report: dict[str, Any] = {"ok": True}
    except Exception as error:
        report = describe(error, where.rank)
    reports = gather_json(report, where)
    outcome: dict[str, Any] = {"ok": True}
    if reports is not None:
        failed = [found for found in reports if not found["ok"]]
        outcome = failed[0] if failed else outcome
    _expect(broadcast_json(outcome, where))
    # Every piece is on disk: hash the chunks that start in this rank's pieces (a chunk may run on
    # into the next rank's rows, which are written too), and take the base's values at the mask.
    numels = {entry.name: entry.numel for entry in entries}
    try:
        chunks, values, starts, stops = [], [], [], []
        with open(path, "rb") as handle:
            for name, row, piece, offset in rows:
                start, stop = (piece.start, piece.stop) if piece.writes else (0, 0)
                per_chunk = digests.chunk_elements(row.itemsize, chunk_bytes)
                first, last = -(-start // per_chunk), -(-stop // per_chunk)
                found = []
                for number in range(first, last):
                    low, high = number * per_chunk, min((number + 1) * per_chunk, numels[name])
                    handle.seek(offset + low * row.itemsize)
                    found.append(digests.of_bytes(handle.read((high - low) * row.itemsize)).hex())
                chunks.append("".join(found))
                starts.append(start)
                stops.append(stop)
                if name in mask and stop > start:
                    index = mask[name]
                    inside = index[(index >= start) & (index < stop)] - start
                    local = plain(piece.local).contiguous().cpu()
                    values.append(byte_view(local.reshape(-1).index_select(0, inside)).numpy().tobytes())
        report = {
            "ok": True,
            "chunks": chunks,
            "starts": starts,
            "stops": stops,
            "values": base64.b64encode(b"".join(values)).decode(),
        }
    except Exception as error:
        report = describe(error, where.rank)
    reports = gather_json(report, where)
    if reports is None:
        return None
    failed = [found for found in reports if not found["ok"]]
    if failed:
        raise rebuild_error(failed[0])
    return _manifest(rows, entries, mask, chunk_bytes, reports, where=path)


def _manifest(
    rows: list[tuple[str, DType, Piece, int]],
    entries: list[TensorEntry],
    mask: Mask,
    chunk_bytes: int,
    reports: list[dict[str, Any]],
    *,
    where: str,
) -> Manifest:
    """Rank 0: the new store's manifest, from every rank's chunk digests and masked values."""
    by_name = {entry.name: entry for entry in entries}
    numels = np.array([by_name[name].numel for name, _, _, _ in rows], dtype=np.int64)
    names = [name for name, _, _, _ in rows]
    ranges = [(np.array(r["starts"], dtype=np.int64), np.array(r["stops"], dtype=np.int64)) for r in reports]
    shards.check_coverage(numels, names, ranges, where=where)
    for number, (name, row, _, _) in enumerate(rows):
        per_chunk = digests.chunk_elements(row.itemsize, chunk_bytes)
        found: dict[int, bytes] = {}
        for report, (starts, _) in zip(reports, ranges, strict=True):
            text = report["chunks"][number]
            first = -(-int(starts[number]) // per_chunk)
            for offset in range(0, len(text), 32):
                found[first + offset // 32] = bytes.fromhex(text[offset : offset + 32])
        count = -(-int(numels[number]) // per_chunk)
        if int(numels[number]) == 0:
            by_name[name].chunk_digests = [digests.of_bytes(b"")]
        else:
            by_name[name].chunk_digests = [found[chunk] for chunk in range(count)]
    manifest = Manifest(entries, chunk_bytes, mask.digest, time.time(), version=2, store_id=secrets.token_hex(16))
    table = build_table(manifest, mask)
    values = table.new_values()
    order = [table.row_of[name] for name in names]  # rows here are in the state's order, the table's by width
    for report, (starts, stops) in zip(reports, ranges, strict=True):
        local = np.frombuffer(base64.b64decode(report["values"]), dtype=np.uint8)
        in_table = np.zeros((len(table.entries), 2), dtype=np.int64)
        in_table[order, 0], in_table[order, 1] = starts, stops
        spans = shards.value_spans(table, in_table[:, 0], in_table[:, 1])
        offset = 0
        for lo, hi in spans[order]:  # the rank sent its values row by row in the state's order
            values[lo:hi] = local[offset : offset + hi - lo]
            offset += hi - lo
        if offset != local.size:
            raise IntegrityError(f"{where}: a rank sent {local.size} bytes of masked values, not {offset}")
    manifest.masked_digest = digests.masked_digest(values)
    manifest.k, manifest.numel = mask.k, mask.numel
    return manifest
