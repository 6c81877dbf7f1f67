"""Valid checksum, bad content: each check behind a file's checksum, in format 2 and in format 1.

A flipped byte is caught by the checksum (test_store_corruption.py), so random damage never reaches
the checks behind it. Here each file breaks one rule and is then given valid checksums again
(tests/_forge.py, or the format's own writer fed a bad record), so each test fails if its check is
deleted. Checks already held this way in test_format.py (the container's magic, version, header
length and sections table; the v2 record's version, kind and table) are not repeated.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _forge
import numpy as np
import pytest
import xxhash
import zstandard
from conftest import assert_state_bits_equal
from golden_v1 import step_state as golden_v1_step
from golden_v2 import step_state as golden_v2_step

from fishckpt import CheckpointStore, FormatError, IntegrityError, Mask, VerifyError
from fishckpt.format import codec, container, manifest, maskfile, stfile
from fishckpt.format.codec import Section
from fishckpt.format.digests import DIGEST_BYTES
from fishckpt.format.dtypes import dtype_by_name

DATA = Path(__file__).parent / "data"
GOLDEN_V1 = DATA / "store_v1"
GOLDEN_V2 = DATA / "store_v2"
FRAME = zstandard.ZstdCompressor().compress(bytes(10))  # a zstd frame of 10 zero bytes

Record = dict[str, Any]


def _copy(golden: Path, tmp_path: Path) -> Path:
    copy = tmp_path / golden.name
    shutil.copytree(golden, copy)
    return copy


# Format 2 files: the header checksum itself ---------------------------------------------------------------


def _sealed_header(metadata_json: str) -> bytes:
    """A v2 file of one 1-byte section whose raw ``__metadata__`` JSON is given, sealed as a reader would check it.

    Every checksum marker is blanked before hashing, so only the rules about the marker itself can object.
    """
    marker = f'"{stfile.CHECKSUM_KEY}":"'
    tensor = '"s":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
    raw = ('{"__metadata__":{' + metadata_json + "}," + tensor + "}").encode()
    raw += b" " * (-len(raw) % 8)
    blanked = raw
    start = raw.find(marker.encode())
    while start >= 0:  # blank every checksum value, whatever its length
        value = start + len(marker)
        end = raw.index(b'"', value)
        blanked = blanked[:value] + b"0" * (end - value) + blanked[end:]
        start = raw.find(marker.encode(), end)
    checksum = xxhash.xxh3_128_hexdigest(blanked).encode()
    sealed = blanked.replace(f'{marker}{"0" * 32}"'.encode(), marker.encode() + checksum + b'"')
    return struct.pack("<Q", len(sealed)) + sealed + b"x"


def _metadata() -> str:
    """Metadata JSON of a one-section step file, without its checksum, and with a key that is not fishckpt's."""
    record = json.dumps(json.dumps({"tensors": {"s": {"codec": "raw", "raw_bytes": 1, "digest": "0" * 32}}}))
    return f'"format":"pt","{stfile.VERSION_KEY}":"2","{stfile.KIND_KEY}":"step","{stfile.RECORD_KEY}":{record}'


def test_the_sealed_header_helper_makes_files_the_reader_accepts() -> None:
    data = _sealed_header(_metadata() + f',"{stfile.CHECKSUM_KEY}":"{"0" * 32}"')
    file = stfile.read_whole(data, kind="step", where="f")
    assert file.names() == ["s"] and file.record["tensors"]["s"]["raw_bytes"] == 1


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (_metadata(), "f: damaged header (no checksum)"),  # a fishckpt key besides "format": still checked
        (_metadata() + f',"{stfile.CHECKSUM_KEY}":"{"0" * 31}"', "f: damaged header (no checksum)"),
        (
            _metadata() + f',"{stfile.CHECKSUM_KEY}":"{"0" * 32}","{stfile.CHECKSUM_KEY}":"{"0" * 32}"',
            "f: damaged header (no single checksum)",
        ),
    ],
    ids=["missing", "short", "twice"],
)
def test_v2_checksum_key_must_be_there_once_and_whole(metadata: str, message: str) -> None:
    with pytest.raises(IntegrityError, match=f"^{re.escape(message)}"):
        stfile.read_whole(_sealed_header(metadata), kind="step", where="f")


# Format 2 files: the record's section table and the sections --------------------------------------------------


def _v2_file() -> bytes:
    sections = [("a.p0", codec.compress(bytes(300))), ("a.p1", Section("raw", 3, b"xyz"))]
    return b"".join(stfile.pack("step", {"x": 1}, sections))


def _entry(value: object) -> Callable[[Record], None]:
    def change(record: Record) -> None:
        record["tensors"]["a.p0"] = value

    return change


def _entry_field(field: str, value: object) -> Callable[[Record], None]:
    def change(record: Record) -> None:
        entry = record["tensors"]["a.p0"]
        if value is None:
            del entry[field]
        else:
            entry[field] = value

    return change


def _record_key(key: str, value: object) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        if value is None:
            del header["__metadata__"][key]
        else:
            header["__metadata__"][key] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_record_key(stfile.RECORD_KEY, None), "f: malformed record"),
        (_forge.edit_record(lambda r: r.update(tensors=[])), "f: malformed record (no tensors table)"),
        (
            _forge.edit_record(lambda r: r["tensors"].update(extra=r["tensors"]["a.p1"])),
            "f: the record's tensors table does not match the file's tensors",
        ),
        (_forge.edit_record(_entry("raw")), "f: malformed entry for section 'a.p0'"),
        (_forge.edit_record(_entry_field("codec", "gzip")), "f: malformed entry for section 'a.p0'"),
        (_forge.edit_record(_entry_field("raw_bytes", True)), "f: malformed entry for section 'a.p0'"),
        (_forge.edit_record(_entry_field("raw_bytes", "300")), "f: malformed entry for section 'a.p0'"),
        (_forge.edit_record(_entry_field("raw_bytes", -1)), "f: malformed entry for section 'a.p0'"),
        (_forge.edit_record(_entry_field("digest", 7)), "f: malformed entry for section 'a.p0'"),
        (_forge.edit_record(_entry_field("digest", None)), "f: malformed entry for section 'a.p0'"),
        (lambda h: h["a.p1"].update(shape=[1, 3]), "f: section 'a.p1' must be a 1-d U8 tensor"),
    ],
    ids=["no-record", "table-list", "table-extra", "entry-str", "codec", "raw-bool", "raw-str", "raw-negative",
         "digest-int", "digest-missing", "two-d"],
)  # fmt: skip
def test_v2_record_table_checks_behind_a_valid_checksum(edit: Callable[[dict[str, Any]], None], message: str) -> None:
    with pytest.raises(FormatError, match=f"^{re.escape(message)}"):
        stfile.read_whole(_forge.reseal(_v2_file(), edit), kind="step", where="f")


def test_v2_sections_are_checked_as_they_are_decoded() -> None:
    sections = [
        ("frame", Section("zstd", 10, FRAME)),
        ("trailing", Section("zstd", 10, FRAME + b"\x00")),  # bytes after the frame
        ("cut", Section("zstd", 10, FRAME[:-1])),  # the frame's last byte missing
        ("short", Section("raw", 4, b"abc")),
        ("declared", Section("zstd", 9, FRAME)),
    ]
    file = stfile.read_whole(b"".join(stfile.pack("step", {}, sections)), kind="step", where="f")
    file.check_all()  # every digest holds: only decoding can object
    assert file.section("frame") == bytes(10)
    with pytest.raises(IntegrityError, match="^f: section 'trailing': does not decompress"):
        file.section("trailing")
    with pytest.raises(IntegrityError, match="^f: section 'cut': does not decompress"):
        file.section("cut")
    with pytest.raises(FormatError, match="^f: section 'short': raw section has 3 bytes, not 4"):
        file.section("short")
    with pytest.raises(FormatError, match="^f: section 'declared': zstd frame declares 10 bytes, the record says 9"):
        file.section("declared")


def test_v2_damage_messages_name_the_file_and_say_what_to_do() -> None:
    data = _v2_file()
    header_end = 8 + int.from_bytes(data[:8], "little")
    in_header = data.replace(b'\\"x\\":1', b'\\"x\\":2')  # the record {"x": 1}, still valid JSON
    assert in_header != data
    with pytest.raises(IntegrityError) as raised:
        stfile.read_whole(in_header, kind="step", where="f")
    assert str(raised.value) == (
        "f: step file is corrupted or truncated (header checksum mismatch); restore it from a copy, or delete it"
    )
    in_data = data[:-1] + bytes([data[-1] ^ 1])
    assert len(in_data) > header_end
    with pytest.raises(IntegrityError) as raised:
        stfile.read_whole(in_data, kind="step", where="f").check_all()
    assert str(raised.value) == (
        "f: step file is corrupted: section 'a.p1' does not match its digest; restore it from a copy, or delete it"
    )


def test_v2_section_cut_short_while_reading_is_an_integrity_error() -> None:
    data = _v2_file()

    # The file shrank between reading its header and reading a section (or a remote read came back short).
    def short_read(start: int, stop: int) -> bytes:
        return data[start : stop - 1]

    short = stfile.parse(data, file_size=len(data), read=short_read, kind="step", where="f")
    with pytest.raises(IntegrityError, match="^f: truncated while reading section 'a.p1'"):
        short.payload("a.p1")


# Format 1 containers ----------------------------------------------------------------------------------------


def _v1(header: bytes, body: bytes = b"") -> bytes:
    content = struct.pack("<8sII", b"FISHCKPT", 1, len(header)) + header + body
    return content + xxhash.xxh3_128_digest(content)


def test_v1_container_of_exactly_32_bytes_is_read_past_the_length_check() -> None:
    smallest = _v1(b"")  # prefix and trailer only: not truncated, but its (empty) header is no JSON
    assert len(smallest) == 32
    with pytest.raises(FormatError, match="^c: header is not valid JSON"):
        container.parse("c", smallest, container.CHECKPOINT_MAGIC, what="checkpoint")
    with pytest.raises(IntegrityError, match="^c: checkpoint file is truncated \\(31 bytes\\)"):
        container.parse("c", smallest[1:], container.CHECKPOINT_MAGIC, what="checkpoint")


@pytest.mark.parametrize(
    "entry",
    ['"raw"', '["raw", "1", 1]', '["raw", 1, -1]', '["raw", 1, 1, 1]', '["raw", 1.0, 1]'],
    ids=["not-a-list", "stored-str", "raw-negative", "four-fields", "stored-float"],
)
def test_v1_container_refuses_each_malformed_section_entry(entry: str) -> None:
    data = _v1(('{"kind":"checkpoint","sections":[' + entry + "]}").encode(), b"a")
    with pytest.raises(FormatError, match="^c: malformed section entry"):
        container.parse("c", data, container.CHECKPOINT_MAGIC, what="checkpoint")


def test_v1_container_says_how_many_bytes_its_sections_cover() -> None:
    header = json.dumps({"kind": "checkpoint", "sections": [["raw", 1, 1], ["raw", 2, 2]]}).encode()
    end = 16 + len(header)
    with pytest.raises(FormatError, match=f"^c: sections cover {end + 3} bytes but the file holds {end + 2}$"):
        container.parse("c", _v1(header, b"ab"), container.CHECKPOINT_MAGIC, what="checkpoint")


def test_v1_sections_are_checked_as_they_are_decoded() -> None:
    table = [["zstd", len(FRAME) + 1, 10], ["zstd", len(FRAME) - 1, 10], ["zstd", len(FRAME), 10]]
    header = json.dumps({"kind": "checkpoint", "sections": table}).encode()
    body = FRAME + b"\x00" + FRAME[:-1] + FRAME  # trailing bytes after a frame; a frame cut short; a good one
    parsed = container.parse("c", _v1(header, body), container.CHECKPOINT_MAGIC, what="c")
    with pytest.raises(IntegrityError, match="^c: section 0: does not decompress"):
        parsed.section(0)
    with pytest.raises(IntegrityError, match="^c: section 1: does not decompress"):
        parsed.section(1)
    assert parsed.section(2) == bytes(10)


# Manifests ----------------------------------------------------------------------------------------------------

MANIFEST_V2 = (GOLDEN_V2 / "manifest.safetensors").read_bytes()
MANIFEST_V1 = (GOLDEN_V1 / "fishckpt.json").read_bytes()


def _entries(change: Callable[[list[Record]], None]) -> Callable[[Record], None]:
    def edit(record: Record) -> None:
        change(record["entries"])

    return edit


def _set(index: int, **fields: object) -> Callable[[list[Record]], None]:
    def change(entries: list[Record]) -> None:
        for field, value in fields.items():
            if value is None:
                del entries[index][field]
            else:
                entries[index][field] = value

    return change


def _alias_first(entries: list[Record]) -> None:
    entries.insert(0, entries.pop())  # head.weight, an alias of layer.weight, now comes before it


def _alias_second_and_flags_grown(entries: list[Record]) -> None:
    """The alias moves up (it has no chunks, so the table is unchanged): the entries after it are still checked."""
    entries.insert(1, entries.pop())
    entries[-1]["shape"] = [300]  # flags: 300 one-byte elements need two 256-byte chunks, it has one


def _no_alias_and_last_grown(entries: list[Record]) -> None:
    """The table runs out at the very last entry."""
    entries.pop()
    entries[-1]["chunks"] += 1


def _chunks_plus(index: int, extra: int) -> Callable[[list[Record]], None]:
    def change(entries: list[Record]) -> None:
        entries[index]["chunks"] += extra

    return change


TABLE_SHORT = "malformed store manifest: ValueError\\('the chunk digest table is too short'\\)"
TABLE_LONG = "malformed store manifest: ValueError\\('the chunk digest table is longer than the entries need'\\)"


def test_golden_manifests_parse() -> None:
    """The unchanged files pass, so each refusal below is its one edit's doing."""
    for parsed in (manifest.parse(MANIFEST_V2, where="m"), manifest.parse_v1(MANIFEST_V1, where="m")):
        assert parsed.entries[0].name == "layer.weight" and parsed.entries[-1].alias_of == "layer.weight"
    assert manifest.parse(MANIFEST_V2, where="m").chunk_bytes == 256
    assert manifest.parse_v1(MANIFEST_V1, where="m").chunk_bytes == 64  # the smallest allowed


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (_entries(_set(0, chunks=None)), FormatError, "malformed store manifest: KeyError"),
        (_entries(_set(0, chunks=-1)), FormatError, TABLE_SHORT),
        (_entries(_chunks_plus(0, 1)), FormatError, TABLE_SHORT),
        (_entries(_chunks_plus(0, -1)), FormatError, TABLE_LONG),
        (_entries(_set(1, shape=[-64])), FormatError, "malformed store manifest: .*'layer.bias' has a negative dim"),
        (_entries(_set(1, name=5)), FormatError, "malformed store manifest: .*bad tensor name 5"),
        (_entries(_set(6, alias_of=7)), FormatError, "malformed store manifest: .*or alias 7"),
        (_entries(_set(1, dtype="float128")), FormatError, "unknown dtype 'float128'"),
        (lambda r: r["mask"].pop("k"), FormatError, "malformed store manifest: KeyError"),
        (lambda r: r.pop("store_id"), FormatError, "malformed store manifest: KeyError"),
        (lambda r: r["base"].pop("masked_digest"), FormatError, "malformed store manifest: KeyError"),
        (lambda r: r.update(chunk_bytes=1000), FormatError, "chunk_bytes 1000 is not a multiple of 16 of at least 64"),
        (lambda r: r.update(chunk_bytes=48), FormatError, "chunk_bytes 48 is not a multiple of 16 of at least 64"),
        (_entries(_set(1, name="layer.weight")), FormatError, "tensor 'layer.weight' is listed twice"),
        (_entries(_set(6, alias_of="nope")), FormatError, "tensor 'head.weight' is an alias of an unknown or later"),
        (_entries(_alias_first), FormatError, "tensor 'head.weight' is an alias of an unknown or later tensor"),
        (_entries(_set(1, alias_of="layer.weight")), FormatError, "tensor 'layer.bias' is an alias of an unknown or"),
        (_entries(_set(5, shape=[300])), FormatError, "tensor 'flags' has 1 chunk digests, expected 2"),
        (_entries(_alias_second_and_flags_grown), FormatError, "tensor 'flags' has 1 chunk digests, expected 2"),
        (_entries(_no_alias_and_last_grown), FormatError, TABLE_SHORT),
        (lambda r: r["base"].update(digest="0" * 32), IntegrityError, "store manifest is inconsistent \\(base digest"),
    ],
    ids=["no-chunks", "negative-chunks", "table-short", "table-long", "negative-dim", "name-type", "alias-type",
         "dtype", "no-k", "no-store-id", "no-masked-digest", "chunk-bytes-odd", "chunk-bytes-small", "twice",
         "alias-unknown", "alias-later", "alias-with-chunks", "chunk-count", "after-an-alias", "table-short-at-end",
         "base-digest"],
)  # fmt: skip
def test_v2_manifest_checks_behind_a_valid_checksum(
    change: Callable[[Record], None], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=f"^m: {message}"):
        manifest.parse(_forge.reseal(MANIFEST_V2, _forge.edit_record(change)), where="m")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [(stfile.KIND_KEY, "mask", "not a fishckpt manifest file \\(it is a 'mask' file\\)"),
     (stfile.VERSION_KEY, "3", "manifest file has format_version 3")],
    ids=["kind", "version"],
)  # fmt: skip
def test_v2_manifest_kind_and_version(key: str, value: str, message: str) -> None:
    with pytest.raises(FormatError, match=f"^m: {message}"):
        manifest.parse(_forge.reseal(MANIFEST_V2, _record_key(key, value)), where="m")


def test_v2_manifest_chunk_counts_at_their_boundaries_round_trip() -> None:
    """An empty tensor has one chunk; a tensor of exactly one chunk has one, one element more makes two."""
    int8, f64 = dtype_by_name("int8", where="t"), dtype_by_name("float64", where="t")
    digest = bytes(DIGEST_BYTES)
    entries = [
        manifest.TensorEntry("empty", f64, (0, 3), None, [digest]),
        manifest.TensorEntry("exact", int8, (64,), None, [digest]),
        manifest.TensorEntry("over", int8, (65,), None, [digest, digest]),
        manifest.TensorEntry("wide", f64, (2, 4), None, [digest]),  # 64 bytes: one chunk of 8 elements
        manifest.TensorEntry("wider", f64, (9,), None, [digest, digest]),
    ]
    written = manifest.Manifest(entries, 64, "1" * 32, 1.0, store_id="2" * 32, masked_digest="3" * 32, k=0, numel=0)
    read = manifest.parse(b"".join(written.pack()), where="m")
    assert [(e.name, e.shape, len(e.chunk_digests)) for e in read.entries] == [
        (e.name, e.shape, len(e.chunk_digests)) for e in entries
    ]
    assert read.base_digest == written.base_digest
    short = [*entries[:2], manifest.TensorEntry("over", int8, (65,), None, [digest]), *entries[3:]]
    bad = manifest.Manifest(short, 64, "1" * 32, 1.0, store_id="2" * 32, masked_digest="3" * 32, k=0, numel=0)
    with pytest.raises(FormatError, match="^m: tensor 'over' has 1 chunk digests, expected 2"):
        manifest.parse(b"".join(bad.pack()), where="m")


def _v1_tensor(index: int, **fields: object) -> Callable[[Record], None]:
    def change(body: Record) -> None:
        body["tensors"][index].update(fields)

    return change


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"{oops", IntegrityError, "store manifest is corrupted \\(not valid JSON"),
        (b"\xff{}", IntegrityError, "store manifest is corrupted \\(not valid JSON"),
        (b"[1]", IntegrityError, "store manifest is corrupted \\(checksum mismatch\\)"),
        (MANIFEST_V1.replace(b'"created"', b'"Created"'), IntegrityError, "store manifest is corrupted"),
        (_forge.reseal_manifest_v1(MANIFEST_V1, lambda b: b.update(kind="x")), FormatError, "not a fishckpt store"),
        (
            _forge.reseal_manifest_v1(MANIFEST_V1, lambda b: b.update(format_version=2)),
            FormatError,
            "store has format_version 2; this file name is format 1's; upgrade fishckpt$",
        ),
        (
            _forge.reseal_manifest_v1(MANIFEST_V1, _v1_tensor(1, dtype="float128")),
            FormatError,
            "unknown dtype 'float128'",
        ),
        (
            _forge.reseal_manifest_v1(MANIFEST_V1, _v1_tensor(0, chunks=["zz"] * 2)),
            FormatError,
            "malformed store manifest: ValueError",
        ),
        (
            _forge.reseal_manifest_v1(MANIFEST_V1, _v1_tensor(0, chunks=[1, 2])),
            FormatError,
            "malformed store manifest: TypeError",
        ),
        (
            _forge.reseal_manifest_v1(MANIFEST_V1, lambda b: b["tensors"][0].pop("dtype")),
            FormatError,
            "malformed store manifest: KeyError",
        ),
        (
            _forge.reseal_manifest_v1(MANIFEST_V1, lambda b: b.pop("created")),
            FormatError,
            "malformed store manifest: KeyError",
        ),
        (
            _forge.reseal_manifest_v1(MANIFEST_V1, _v1_tensor(1, name="layer.weight")),
            FormatError,
            "tensor 'layer.weight' is listed twice",
        ),
        (
            _forge.reseal_manifest_v1(MANIFEST_V1, lambda b: b["base"].update(digest="0" * 32)),
            IntegrityError,
            "store manifest is inconsistent \\(base digest mismatch\\)",
        ),
    ],
    ids=["json", "utf8", "list", "checksum", "kind", "version", "dtype", "chunk-hex", "chunk-type", "no-dtype",
         "no-created", "twice", "base-digest"],
)  # fmt: skip
def test_v1_manifest_checks_behind_a_valid_checksum(data: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=f"^m: {message}"):
        manifest.parse_v1(data, where="m")


# Mask files -----------------------------------------------------------------------------------------------------


def _mask_file(
    version: int, entries: object, positions: list[int], *, gap_width: object = None, digest: str = "0" * 32
) -> bytes:
    """A mask file of either version, valid down to its checksums, for any entries and flat positions."""
    width, sections = codec.encode_positions(np.array(positions, dtype=np.int64))
    record: Record = {"gap_width": width if gap_width is None else gap_width, "digest": digest}
    if gap_width == "missing":
        del record["gap_width"]
    if version == 2:
        record["entries"] = entries
        return b"".join(stfile.pack("mask", record, [(f"positions.p{i}", s) for i, s in enumerate(sections)]))
    return b"".join(container.pack(container.MASK_MAGIC, {"kind": "mask", "tensors": entries, **record}, sections))


VERSIONS = pytest.mark.parametrize("version", [2, 1], ids=["v2", "v1"])


@VERSIONS
def test_a_valid_mask_file_decodes_at_every_boundary(version: int) -> None:
    """A whole tensor, a first index of 0 after another tensor, the last index of a tensor: all in range."""
    expected = Mask.from_indices({"a": [0, 1, 2, 3], "b": [0, 5], "c": []}, {"a": (4,), "b": (2, 3), "c": (0,)})
    entries = [["a", [4], 4], ["b", [2, 3], 2], ["c", [0], 0]]
    data = _mask_file(version, entries, [0, 1, 2, 3, 4, 9], digest=expected.digest)
    assert Mask.from_file_bytes(data, where="m") == expected
    assert maskfile.is_mask_file(data)


@VERSIONS
@pytest.mark.parametrize(
    ("entries", "positions", "gap_width", "message"),
    [
        ([["w", [4]]], [0], None, "malformed mask header"),
        ([["w", [4], "x"]], [0], None, "malformed mask header"),
        ([["w", 4, 1]], [0], None, "malformed mask header"),
        ("w", [], None, "malformed mask header"),
        ([["w", [4], 1]], [0], "missing", "malformed mask header"),
        ([["w", [4], 1]], [0], 5, "unsupported gap width 5"),
        ([["w", [4], 1]], [0], 8, "unsupported gap width 8"),  # says 8, but holds 4 planes
        ([["w", [4], 5]], [0, 1, 2, 3, 4], None, "mask header declares more entries than its tensors hold"),
        ([["a", [4], -1], ["b", [4], 2]], [4], None, "mask header declares more entries than its tensors hold"),
        ([["w", [-2, -2], 0]], [], None, "a tensor has a negative dimension"),
        ([["w", [4], 1], ["w", [4], 1]], [0, 4], None, "tensor 'w' appears twice"),
        ([["w", [4], 2]], [0, 4], None, "indices of tensor 'w' are out of range for shape \\(4,\\)"),
        ([["a", [4], 2], ["b", [4], 1]], [0, 1, 2], None, "indices of tensor 'b' are out of range for shape \\(4,\\)"),
        ([["w", [8], 3]], [0, 1], None, "mask position planes hold \\[2\\] bytes, but the header declares 3 entries"),
        ([["w", [8], 1]], [0, 1], None, "mask position planes hold \\[2\\] bytes, but the header declares 1 entries"),
    ],
    ids=["short-entry", "count-str", "shape-int", "entries-str", "no-width", "width-5", "width-planes",
         "too-many", "negative-count", "negative-dim", "twice", "past-the-end", "before-the-start", "planes-short",
         "planes-long"],
)  # fmt: skip
def test_mask_file_checks_behind_a_valid_checksum(
    version: int, entries: object, positions: list[int], gap_width: object, message: str
) -> None:
    data = _mask_file(version, entries, positions, gap_width=gap_width)
    with pytest.raises(FormatError, match=f"^m: {message}"):
        maskfile.decode(data, where="m")


@VERSIONS
def test_a_mask_of_no_tensors_round_trips(version: int) -> None:
    empty = Mask.from_indices({}, {})
    data = _mask_file(version, [], [], digest=empty.digest)
    if version == 2:
        assert b"".join(empty.file_bytes()) == data
    else:
        assert b"".join(maskfile.encode_v1({}, {}, empty.digest)) == data
    assert Mask.from_file_bytes(data, where="m") == empty


def test_a_damaged_v1_mask_file_is_named() -> None:
    data = bytearray((GOLDEN_V1 / "mask.fishmask").read_bytes())
    data[len(data) // 2] ^= 1
    with pytest.raises(IntegrityError, match="^m: mask file is corrupted or truncated"):
        maskfile.decode(bytes(data), where="m")


@VERSIONS
def test_a_mask_file_whose_content_misses_its_recorded_digest_is_refused(version: int) -> None:
    mask = Mask.from_indices({"w": [1, 3]}, {"w": (4,)})
    other = Mask.from_indices({"w": [1, 2]}, {"w": (4,)})
    assert Mask.from_file_bytes(_mask_file(version, [["w", [4], 2]], [1, 3], digest=mask.digest), where="m") == mask
    with pytest.raises(FormatError, match="^m: mask content does not match its recorded digest"):
        Mask.from_file_bytes(_mask_file(version, [["w", [4], 2]], [1, 3], digest=other.digest), where="m")


@VERSIONS
def test_mask_positions_with_a_gap_of_two_to_the_32_use_width_8(version: int) -> None:
    mask = Mask.from_indices({"w": [0, 2**32 + 1, 2**32 + 2], "v": [2**33 - 1]}, {"w": (2**33,), "v": (2**33,)})
    if version == 2:
        data = b"".join(mask.file_bytes())
        assert _forge.record_of_bytes(data)["gap_width"] == 8
    else:
        indices = {name: mask[name].numpy() for name in mask}
        data = b"".join(maskfile.encode_v1(indices, {name: mask.shape(name) for name in mask}, mask.digest))
    loaded = Mask.from_file_bytes(data, where="m")
    assert loaded == mask
    assert loaded["w"].tolist() == [0, 2**32 + 1, 2**32 + 2] and loaded["v"].tolist() == [2**33 - 1]


# Step content: the digests recorded at save ------------------------------------------------------------------


def _v2_step_with(path: Path, *, sections: dict[str, Section] | None = None, change=None) -> None:
    path.write_bytes(_forge.repack(path.read_bytes(), kind="step", sections=sections, change=change))


def _zigzag_plane_edit(file: stfile.File, name: str) -> Section:
    plane = bytearray(file.section(name))
    plane[0] ^= 2  # the first element's delta changes by one
    return codec.compress(bytes(plane))


def test_v2_a_step_whose_content_misses_its_step_digest_is_refused_on_load_and_verify(tmp_path: Path) -> None:
    """Each file is intact to its digests; only the step digest (format.md, "Step digest") can tell."""
    store_path = _copy(GOLDEN_V2, tmp_path)
    step = CheckpointStore.open(store_path).step_path(2)
    original = step.read_bytes()
    file = stfile.read_whole(original, kind="step", where="s")
    record = file.record
    dense = next(i for i, o in enumerate(record["outside"]) if o["tensor"] == "counts")
    assert record["outside"][dense]["mode"] == "dense"
    sparse = next(i for i, o in enumerate(record["outside"]) if o["mode"] == "sparse")
    planes = {"masked-value": "values.w4.p0", "dense-record": f"outside.{dense}.values.p0"}
    planes["sparse-value"] = f"outside.{sparse}.values.p0"
    damages: dict[str, dict[str, Any]] = {
        label: {"sections": {name: _zigzag_plane_edit(file, name)}} for label, name in planes.items()
    }
    damages["recorded-digest"] = {"change": lambda r: r.update(digest="0" * 32)}
    for label, damage in damages.items():
        step.write_bytes(original)
        _v2_step_with(step, **damage)
        store = CheckpointStore.open(store_path)
        with pytest.raises(IntegrityError) as refused:
            store.load(2)
        assert str(refused.value) == (
            f"{step}: the step's content does not match the digest recorded at save; the step file is damaged; "
            "restore it from a copy or delete this step"
        )
        with pytest.raises(VerifyError) as failed:
            store.verify()
        assert [(f.file, f.tensor, f.problem) for f in failed.value.failures] == [
            (step, None, "content does not match its recorded digest")
        ], label
        assert failed.value.report.base_ok
        assert_state_bits_equal(store.load(1), golden_v2_step(1))  # the other step is untouched
    step.write_bytes(original)
    CheckpointStore.open(store_path).verify()


def _v1_step(store_path: Path) -> Path:
    return store_path / "steps" / "step-000000000002.fishckpt"


def _v1_section_edit(data: bytes, number: int) -> Section:
    parsed = container.parse("s", data, container.CHECKPOINT_MAGIC, what="checkpoint")
    plane = bytearray(parsed.section(number))
    plane[0] ^= 2
    return Section("raw", len(plane), bytes(plane))


def test_v1_each_tensor_digest_is_checked_on_load_and_verify(tmp_path: Path) -> None:
    """Format 1 keeps one digest per tensor: a damaged record fails the tensors it touches, and only those."""
    store_path = _copy(GOLDEN_V1, tmp_path)
    step = _v1_step(store_path)
    original = step.read_bytes()
    header = container.parse("s", original, container.CHECKPOINT_MAGIC, what="checkpoint").header
    # The first value plane of each outside-mask record (a sparse record's position planes come first).
    first = {
        name: first + (gaps if mode == "sparse" else 0)
        for name, mode, _count, gaps, first, _sections in header["outside_mask"]
    }
    halves_first = next(first for width, _count, first in header["values"] if width == 2)
    owners = ["layer.weight", "layer.bias", "halves", "counts", "flags", "scalar"]  # manifest order

    def digest_of(name: str, value: str | None) -> Callable[[Record], None]:
        def change(body: Record) -> None:
            if value is None:
                del body["digests"][name]
            else:
                body["digests"][name] = value

        return change

    damages: dict[str, tuple[dict[str, Any], list[str]]] = {
        "dense-record": ({"sections": {first["counts"]: _v1_section_edit(original, first["counts"])}}, ["counts"]),
        "sparse-values": (
            {"sections": {first["layer.weight"]: _v1_section_edit(original, first["layer.weight"])}},
            ["layer.weight"],
        ),
        "masked-value": ({"sections": {halves_first: _v1_section_edit(original, halves_first)}}, ["halves"]),
        "recorded-digest": ({"change": digest_of("layer.bias", "0" * 32)}, ["layer.bias"]),
        "missing-digest": ({"change": digest_of("scalar", None)}, ["scalar"]),
        "every-digest": ({"change": lambda body: body.update(digests={})}, owners),
    }
    for label, (damage, tensors) in damages.items():
        step.write_bytes(_forge.repack_v1(original, container.CHECKPOINT_MAGIC, **damage))
        store = CheckpointStore.open(store_path)
        with pytest.raises(IntegrityError) as refused:
            store.load(2)
        named = ", ".join(map(repr, tensors[:5]))  # at most five are named
        assert str(refused.value) == (
            f"{step}: the step's content does not match the digest recorded at save (tensor {named}); "
            "the step file is damaged; restore it from a copy or delete this step"
        ), label
        with pytest.raises(VerifyError) as failed:
            store.verify()
        assert [(f.file, f.tensor, f.problem) for f in failed.value.failures] == [
            (step, name, "does not match its recorded digest") for name in tensors
        ], label
        assert_state_bits_equal(store.load(1), golden_v1_step(1))
    step.write_bytes(original)
    store = CheckpointStore.open(store_path)
    store.verify()
    assert_state_bits_equal(store.load(2), golden_v1_step(2))


# A store whose mask was swapped ------------------------------------------------------------------------------


def _another_mask(mask: Mask) -> Mask:
    """The same tensors and k, one index moved: the most easily missed replacement."""
    indices = {name: mask[name].tolist() for name in mask}
    name = next(name for name in mask if indices[name] and indices[name][-1] + 1 < int(np.prod(mask.shape(name))))
    indices[name][-1] += 1
    return Mask.from_indices(indices, {name: mask.shape(name) for name in mask})


def test_a_store_whose_mask_file_was_replaced_by_another_valid_mask_is_refused(tmp_path: Path) -> None:
    for golden, mask_name in ((GOLDEN_V2, "mask.safetensors"), (GOLDEN_V1, "mask.fishmask")):
        store_path = _copy(golden, tmp_path)
        own = CheckpointStore.open(store_path).mask
        other = _another_mask(own)
        assert other != own and other.k == own.k
        if mask_name.endswith(".safetensors"):
            data = b"".join(other.file_bytes())
        else:
            indices = {name: other[name].numpy() for name in other}
            data = b"".join(maskfile.encode_v1(indices, {n: other.shape(n) for n in other}, other.digest))
        (store_path / mask_name).write_bytes(data)
        assert Mask.from_file_bytes(data, where="m") == other  # a valid mask file in every way
        with pytest.raises(IntegrityError, match=f"^{store_path / mask_name}: the mask file is not this store's mask"):
            CheckpointStore.open(store_path)


def test_a_store_mask_file_whose_recorded_digest_is_wrong_is_corrupted(tmp_path: Path) -> None:
    store_path = _copy(GOLDEN_V2, tmp_path)
    path = store_path / "mask.safetensors"
    path.write_bytes(_forge.repack(path.read_bytes(), kind="mask", change=lambda r: r.update(digest="0" * 32)))
    with pytest.raises(IntegrityError, match=f"^{path}: mask file is corrupted: .*does not match its recorded digest"):
        CheckpointStore.open(store_path)


# A step whose record is malformed behind its digests ------------------------------------------------------------


def test_v2_a_step_malformed_behind_its_digests_is_a_format_error_naming_it(tmp_path: Path) -> None:
    store_path = _copy(GOLDEN_V2, tmp_path)
    step = CheckpointStore.open(store_path).step_path(2)
    original = step.read_bytes()

    def unknown_tensor(record: Record) -> None:
        record["outside"][0]["tensor"] = "nope"

    short_plane = {"values.w4.p0": codec.compress(bytes(10))}  # the stream holds far more words
    file = stfile.read_whole(original, kind="step", where="golden")
    long_plane = {"values.w4.p0": codec.compress(file.section("values.w4.p0") + b"\x00")}  # one byte too many
    for damage, message in (
        ({"change": unknown_tensor}, "changes recorded for unknown tensor 'nope'"),
        ({"sections": short_plane}, "malformed step: ValueError"),
        ({"sections": long_plane}, r"malformed step: ValueError\('byte plane 0 holds \d+ bytes for \d+ words'\)"),
    ):
        step.write_bytes(_forge.repack(original, kind="step", **damage))
        with pytest.raises(FormatError, match=f"^{re.escape(str(step))}: {message}"):
            CheckpointStore.open(store_path).load(2)
