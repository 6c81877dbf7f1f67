"""fishckpt.format on its own: codec, sections, the safetensors layout, the v1 container and step records."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
import xxhash
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors import safe_open

from fishckpt import FormatError, IntegrityError
from fishckpt.format import codec, container, digests, safetensors_layout, stepfile, stfile
from fishckpt.format.bits import UINT_BY_WIDTH
from fishckpt.format.codec import Section

PROPERTY = settings(max_examples=80, deadline=None, derandomize=True)
WIDTHS = [1, 2, 4, 8]


def _words(width: int, max_size: int = 300) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(UINT_BY_WIDTH[width], st.integers(0, max_size))


# Codec ------------------------------------------------------------------------------------------


@PROPERTY
@given(st.sampled_from(WIDTHS).flatmap(lambda w: st.tuples(_words(w, 200), _words(w, 200))))
def test_delta_round_trips_any_bit_patterns(pair: tuple[np.ndarray, np.ndarray]) -> None:
    new, base = pair
    size = min(new.size, base.size)
    new, base = new[:size], base[:size]
    order = np.argsort(base, kind="stable")
    for permutation in (None, order):
        sections = codec.encode_delta(new, base, permutation)
        planes = [codec.decompress(s.codec, s.payload, s.raw_length, where="t") for s in sections]
        decoded = codec.decode_delta(planes, base, permutation)
        assert decoded.dtype == new.dtype
        assert np.array_equal(decoded, new)


@PROPERTY
@given(st.sampled_from(WIDTHS).flatmap(_words))
def test_words_round_trip_as_byte_planes(words: np.ndarray) -> None:
    sections = codec.encode_words(words)
    assert len(sections) == words.dtype.itemsize
    planes = [codec.decompress(s.codec, s.payload, s.raw_length, where="t") for s in sections]
    by_byte = words.view(np.uint8).reshape(-1, words.dtype.itemsize)
    assert planes == [by_byte[:, plane].tobytes() for plane in range(words.dtype.itemsize)]
    decoded = codec.decode_words(planes, words.size, words.dtype.itemsize)
    assert decoded.dtype == words.dtype and np.array_equal(decoded, words)


@PROPERTY
@given(st.sampled_from(WIDTHS).flatmap(_words))
def test_zigzag_is_a_bijection_onto_small_numbers(words: np.ndarray) -> None:
    assert np.array_equal(codec.unzigzag(codec.zigzag(words)), words)
    # Reference: a signed value v maps to 2v for v >= 0 and -2v - 1 below, computed in Python ints.
    bits = 8 * words.dtype.itemsize
    for word, coded in zip(words.tolist()[:50], codec.zigzag(words).tolist()[:50], strict=True):
        signed = word - (1 << bits) if word >> (bits - 1) else word
        assert coded == (2 * signed if signed >= 0 else -2 * signed - 1)


@PROPERTY
@given(st.lists(st.integers(0, 2**40), max_size=200, unique=True))
def test_positions_round_trip(values: list[int]) -> None:
    positions = np.array(sorted(values), dtype=np.int64)
    width, sections = codec.encode_positions(positions)
    assert width == (8 if positions.size and int(np.diff(positions, prepend=-1).max()) - 1 >= 2**32 else 4)
    planes = [codec.decompress(s.codec, s.payload, s.raw_length, where="t") for s in sections]
    assert np.array_equal(codec.decode_positions(planes, positions.size, width), positions)


def test_positions_with_a_gap_of_two_to_the_32_use_width_8() -> None:
    positions = np.array([0, 2**32 + 1, 2**32 + 2], dtype=np.int64)  # gap 2**32 between the first two
    width, sections = codec.encode_positions(positions)
    assert width == 8
    assert len(sections) == 8
    planes = [codec.decompress(s.codec, s.payload, s.raw_length, where="t") for s in sections]
    assert codec.decode_positions(planes, 3, 8).tolist() == positions.tolist()
    just_below = np.array([0, 2**32], dtype=np.int64)  # gap 2**32 - 1 still fits in 4 bytes
    assert codec.encode_positions(just_below)[0] == 4


def test_exponent_order_is_the_stable_sort_by_top_byte() -> None:
    generator = np.random.default_rng(0)
    # Few distinct top bytes, so there are many ties, which an unstable sort would reorder.
    words = (generator.integers(0, 4, 5000).astype(np.uint32) << 24) | generator.integers(0, 2**24, 5000).astype(
        np.uint32
    )
    words[::7] |= np.uint32(0x80000000)  # the sign bit is ignored
    top = [(int(w) >> 24) & 0x7F for w in words]
    reference = sorted(range(len(top)), key=top.__getitem__)  # Python's sort is stable
    assert codec.exponent_order(words).tolist() == reference


def test_compress_keeps_incompressible_data_raw() -> None:
    noise = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert codec.compress(noise).codec == "raw"
    assert codec.compress(bytes(4096)).codec == "zstd"


def test_compress_is_zstd_level_1_kept_only_when_smaller() -> None:
    """format.md: each section is zstd level 1, or raw when zstd does not make it smaller (a tie stays raw)."""
    tie = bytes(17) + bytes.fromhex("f3ad7f")
    assert len(zstandard.ZstdCompressor(level=1).compress(tie)) == len(tie)
    assert codec.compress(tie) == Section("raw", 20, tie)
    noise = np.random.default_rng(0).integers(0, 4, 20_000, dtype=np.uint8)
    data = (np.arange(20_000) % 251).astype(np.uint8).tobytes() + noise.tobytes()
    level_1 = zstandard.ZstdCompressor(level=1).compress(data)
    assert level_1 != zstandard.ZstdCompressor(level=2).compress(data)  # so the level is seen
    assert codec.compress(data) == Section("zstd", 40_000, level_1)


def test_decompress_is_bounded_by_the_declared_length() -> None:
    payload = zstandard.ZstdCompressor().compress(bytes(1000))
    assert codec.decompress("zstd", payload, 1000, where="t") == bytes(1000)
    with pytest.raises(FormatError, match="t: zstd frame declares 1000 bytes, the record says 999"):
        codec.decompress("zstd", payload, 999, where="t")
    with pytest.raises(IntegrityError, match="t: does not decompress"):
        codec.decompress("zstd", payload + b"\x00", 1000, where="t")  # bytes after the frame
    damaged = bytearray(payload)
    damaged[-2] ^= 0xFF
    with pytest.raises(IntegrityError, match="t: "):
        codec.decompress("zstd", bytes(damaged), 1000, where="t")
    with pytest.raises(FormatError, match="t: raw section has 3 bytes, not 4"):
        codec.decompress("raw", b"abc", 4, where="t")
    with pytest.raises(FormatError, match="t: unknown codec 'lz4'"):
        codec.decompress("lz4", b"abc", 3, where="t")


# The safetensors layout ---------------------------------------------------------------------------


def _layout_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    names = safetensors_layout.aligned_order(tensors)
    names_st = {torch.float32: "F32", torch.int64: "I64", torch.uint8: "U8", torch.float16: "F16"}
    layout = [
        (n, names_st[tensors[n].dtype], list(tensors[n].shape), tensors[n].numel() * tensors[n].element_size())
        for n in names
    ]
    data = b"".join(tensors[n].contiguous().view(torch.uint8).numpy().tobytes() for n in names)
    return safetensors_layout.header(layout, metadata) + data


def test_header_writes_files_safetensors_reads(tmp_path) -> None:
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.arange(3), "e": torch.zeros(0)}
    tensors["c"] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    data = _layout_file(tensors, {"k": "v"})
    path = tmp_path / "f.safetensors"
    path.write_bytes(data)
    with safe_open(path, "pt") as opened:
        assert opened.metadata() == {"k": "v"}
        assert sorted(opened.keys()) == ["a", "b", "c", "e"]
        for name, tensor in tensors.items():
            assert torch.equal(opened.get_tensor(name), tensor)
    parsed = safetensors_layout.parse(data, file_size=len(data), where="f")
    assert parsed.metadata == {"k": "v"}
    assert [t.name for t in parsed.tensors] == ["b", "a", "e", "c"]  # file order: 8-byte, then 4, then 1
    assert parsed.data_start % 8 == 0
    stored = parsed.by_name()["a"]
    assert data[stored.start : stored.stop] == tensors["a"].numpy().tobytes()


def _with_header(table: object, *, data: bytes = b"", raw: bytes | None = None) -> bytes:
    body = raw if raw is not None else json.dumps(table).encode()
    return struct.pack("<Q", len(body)) + body + data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01\x02", "truncated"),
        (struct.pack("<Q", 10**9) + b"{}", "declares 1000000000 header bytes"),
        (_with_header(None, raw=b"{not json"), "not valid JSON"),
        (_with_header(None, raw=b"\xff\xfe{}"), "not valid JSON"),
        (_with_header([1, 2]), "not a JSON object"),
        (_with_header({"__metadata__": {"a": 1}}), "__metadata__ must map strings to strings"),
        (_with_header({"t": {"dtype": "F32", "shape": [1]}}, data=b"1234"), "at tensor 't'"),
        (_with_header({"t": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}, data=b"1234"), "unknown dtype"),
        (_with_header({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, data=b"1234"), "non-negative"),
        (_with_header({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, data=b"1234"), "but 4 bytes"),
        (
            _with_header(
                {
                    "t": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                    "u": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
                },
                data=b"123456",
            ),
            "overlap or hole",
        ),
        (_with_header({"t": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, data=b"12345"), "file has"),
        (_with_header({"t": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, data=b"123"), "file has"),
    ],
    ids=[
        "short",
        "huge-length",
        "bad-json",
        "not-utf8",
        "not-object",
        "bad-metadata",
        "no-offsets",
        "unknown-dtype",
        "negative-shape",
        "size-mismatch",
        "overlap",
        "trailing-bytes",
        "truncated-data",
    ],
)
def test_parse_refuses_every_damaged_header(data: bytes, message: str) -> None:
    with pytest.raises(IntegrityError, match=f"^damaged.bin: .*{message}"):
        safetensors_layout.parse(data, file_size=len(data), where="damaged.bin")


# The v1 container ---------------------------------------------------------------------------------


def _sections() -> list[Section]:
    return [codec.compress(bytes(100)), codec.compress(b"xyz"), Section("raw", 0, b"")]


def test_container_round_trip() -> None:
    data = b"".join(container.pack(container.CHECKPOINT_MAGIC, {"kind": "checkpoint", "x": [1, 2]}, _sections()))
    parsed = container.parse("c", data, container.CHECKPOINT_MAGIC, what="checkpoint")
    assert parsed.header["x"] == [1, 2]
    assert [parsed.section(i) for i in range(3)] == [bytes(100), b"xyz", b""]
    assert parsed.stored_bytes == len(data)


def _v1(magic: bytes, version: int, header: bytes, body: bytes = b"", *, length: int | None = None) -> bytes:
    """A container with a valid trailer over whatever content is given: only the checks behind it can object."""
    prefix = struct.pack("<8sII", magic, version, len(header) if length is None else length)
    content = prefix + header + body
    return content + xxhash.xxh3_128_digest(content)


def _header(sections: list[list[object]], **extra: object) -> bytes:
    return json.dumps({"kind": "checkpoint", "sections": sections, **extra}).encode()


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (_v1(b"FISHMASK", 1, _header([])), FormatError, "not a fishckpt checkpoint file"),
        (_v1(b"FISHCKPT", 2, _header([])), FormatError, "format_version 2"),
        (_v1(b"FISHCKPT", 1, _header([]), length=999), FormatError, "runs past the end"),
        (_v1(b"FISHCKPT", 1, b"{oops"), FormatError, "not valid JSON"),
        (_v1(b"FISHCKPT", 1, b"[1]"), FormatError, "no sections table"),
        (_v1(b"FISHCKPT", 1, b'{"sections": 3}'), FormatError, "no sections table"),
        (_v1(b"FISHCKPT", 1, _header([["raw", 1]]), b"a"), FormatError, "malformed section entry"),
        (_v1(b"FISHCKPT", 1, _header([["raw", -1, 1]]), b"a"), FormatError, "malformed section entry"),
        (_v1(b"FISHCKPT", 1, _header([["raw", 2, 2]]), b"a"), FormatError, "sections cover"),
        (_v1(b"FISHCKPT", 1, _header([["raw", 1, 1]]), b"ab"), FormatError, "sections cover"),
    ],
    ids=["magic", "version", "header-length", "json", "not-object", "sections-not-list", "entry-short",
         "entry-negative", "short-body", "trailing-body"],
)  # fmt: skip
def test_container_checks_behind_a_valid_checksum(data: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        container.parse("c.fishckpt", data, container.CHECKPOINT_MAGIC, what="checkpoint")


def test_container_section_checks_behind_a_valid_checksum() -> None:
    frame = zstandard.ZstdCompressor().compress(bytes(10))
    header = _header([["zstd", len(frame), 10], ["raw", 2, 3], ["gzip", 1, 1], ["zstd", len(frame), 9]])
    parsed = container.parse("c", _v1(b"FISHCKPT", 1, header, frame + b"ab" + b"z" + frame), b"FISHCKPT", what="c")
    assert parsed.section(0) == bytes(10)
    with pytest.raises(FormatError, match="section 1: raw section has 2 bytes, not 3"):
        parsed.section(1)
    with pytest.raises(FormatError, match="section 2: unknown codec 'gzip'"):
        parsed.section(2)
    with pytest.raises(FormatError, match="section 3: zstd frame declares 10 bytes, the record says 9"):
        parsed.section(3)
    with pytest.raises(FormatError, match="section 4 does not exist"):
        parsed.section(4)
    with pytest.raises(FormatError, match="section -1 does not exist"):
        parsed.section(-1)


def test_container_detects_every_flipped_byte_and_truncation() -> None:
    data = b"".join(container.pack(container.MASK_MAGIC, {"kind": "mask"}, _sections()))
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 0x10
        with pytest.raises(IntegrityError, match="checksum mismatch"):
            container.parse("m", bytes(damaged), container.MASK_MAGIC, what="mask")
    for size in (0, 10, len(data) - 1):
        with pytest.raises(IntegrityError):
            container.parse("m", data[:size], container.MASK_MAGIC, what="mask")


# Format v2 files ---------------------------------------------------------------------------------


def _v2_file(kind: str = "step", record: dict[str, object] | None = None) -> bytes:
    sections = [
        ("a.p0", codec.compress(bytes(300))),
        ("a.p1", codec.compress(b"xyz")),
        ("empty", Section("raw", 0, b"")),
    ]
    return b"".join(stfile.pack(kind, record or {"x": [1, 2]}, sections))


def test_v2_file_is_a_safetensors_file_users_can_open(tmp_path) -> None:
    data = _v2_file()
    path = tmp_path / "f.safetensors"
    path.write_bytes(data)
    with safe_open(path, "pt") as opened:
        metadata = opened.metadata()
        assert metadata["fishckpt.format_version"] == "2"
        assert metadata["fishckpt.kind"] == "step"
        assert sorted(opened.keys()) == ["a.p0", "a.p1", "empty"]
        assert opened.get_tensor("a.p1").dtype == torch.uint8
    record = json.loads(metadata["fishckpt.record"])
    assert record["x"] == [1, 2]
    assert record["tensors"]["a.p1"] == {"codec": "raw", "raw_bytes": 3, "digest": xxhash.xxh3_128_hexdigest(b"xyz")}
    file = stfile.read_whole(data, kind="step", where="f")
    assert [file.section(name) for name in ("a.p0", "a.p1", "empty")] == [bytes(300), b"xyz", b""]


def test_v2_file_detects_every_flipped_byte_truncation_and_appended_bytes() -> None:
    data = _v2_file()
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 0x01
        with pytest.raises(IntegrityError, match="^f: "):
            stfile.read_whole(bytes(damaged), kind="step", where="f").check_all()
    for damaged in (data[:-1], data[: len(data) // 2], data[:7], data + b"\x00"):
        with pytest.raises(IntegrityError, match="^f: "):
            stfile.read_whole(damaged, kind="step", where="f").check_all()


def test_v2_file_detects_a_renamed_tensor() -> None:
    data = _v2_file().replace(b'"a.p1":{"dtype"', b'"a.q1":{"dtype"')
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        stfile.read_whole(data, kind="step", where="f")


def _resealed(data: bytes, edit: object) -> bytes:
    """A v2 file whose header was edited by ``edit`` and then given a valid checksum again."""
    layout = safetensors_layout.parse(data, file_size=len(data), where="x")
    header = json.loads(layout.header_bytes)
    edit(header)  # type: ignore[operator]
    header["__metadata__"][stfile.CHECKSUM_KEY] = "0" * 32
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    raw = raw.replace(
        f'"{stfile.CHECKSUM_KEY}":"{"0" * 32}"'.encode(),
        f'"{stfile.CHECKSUM_KEY}":"{xxhash.xxh3_128_hexdigest(raw)}"'.encode(),
    )
    return struct.pack("<Q", len(raw)) + raw + data[layout.data_start :]


def _set_record(change: dict[str, object]):
    def edit(header: dict) -> None:
        record = json.loads(header["__metadata__"][stfile.RECORD_KEY])
        for key, value in change.items():
            if value is None:
                record.pop(key)
            else:
                record[key] = value
        header["__metadata__"][stfile.RECORD_KEY] = json.dumps(record)

    return edit


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda h: h["__metadata__"].update({stfile.VERSION_KEY: "3"}), FormatError, "format_version 3"),
        (lambda h: h["__metadata__"].update({stfile.KIND_KEY: "mask"}), FormatError, "not a fishckpt step file"),
        (lambda h: h["__metadata__"].update({stfile.RECORD_KEY: "{oops"}), FormatError, "malformed record"),
        (lambda h: h["__metadata__"].update({stfile.RECORD_KEY: "[1]"}), FormatError, "no tensors table"),
        (_set_record({"tensors": {}}), FormatError, "does not match the file's tensors"),
        (
            _set_record(
                {"tensors": {"a.p0": {"codec": "lz4", "raw_bytes": 1, "digest": "0"}, "a.p1": {}, "empty": {}}}
            ),
            FormatError,
            "malformed entry",
        ),
        (lambda h: h["a.p1"].update({"dtype": "I8"}), FormatError, "must be a 1-d U8 tensor"),
    ],
    ids=["version", "kind", "record-json", "record-list", "table-names", "table-entry", "dtype"],
)
def test_v2_checks_behind_a_valid_checksum(edit: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        stfile.read_whole(_resealed(_v2_file(), edit), kind="step", where="f")


def test_v2_section_checks_behind_a_valid_checksum() -> None:
    data = _v2_file()

    def wrong(field: str, value: object):
        def edit(header: dict) -> None:
            record = json.loads(header["__metadata__"][stfile.RECORD_KEY])
            record["tensors"]["a.p0"][field] = value
            header["__metadata__"][stfile.RECORD_KEY] = json.dumps(record)

        return edit

    with pytest.raises(IntegrityError, match="step file is corrupted: section 'a.p0' does not match its digest"):
        stfile.read_whole(_resealed(data, wrong("digest", "0" * 32)), kind="step", where="f").section("a.p0")
    with pytest.raises(FormatError, match="zstd frame declares 300 bytes, the record says 299"):
        stfile.read_whole(_resealed(data, wrong("raw_bytes", 299)), kind="step", where="f").section("a.p0")
    with pytest.raises(FormatError, match="no section 'nope'"):
        stfile.read_whole(data, kind="step", where="f").section("nope")


def test_v2_pack_refuses_two_sections_of_one_name() -> None:
    twice = [("a", Section("raw", 0, b"")), ("a", Section("raw", 1, b"x"))]
    with pytest.raises(ValueError, match="^section names must be unique$"):
        stfile.pack("step", {}, twice)


def test_a_plain_safetensors_file_is_not_taken_for_a_fishckpt_file() -> None:
    plain = safetensors_layout.header([("w", "U8", [2], 2)], {"format": "pt"}) + b"ab"
    with pytest.raises(FormatError, match="not a fishckpt step file"):
        stfile.read_whole(plain, kind="step", where="f")


# Step records -------------------------------------------------------------------------------------


def _content(**change: object) -> stepfile.StepContent:
    content = stepfile.StepContent(
        store_id="5" * 32,
        step=7,
        created=1.5,
        base_digest="b" * 32,
        mask_digest="c" * 32,
        k=3,
        digest="d" * 32,
        metadata={"loss": 0.5},
        values=[(4, 3, [codec.compress(bytes([i]) * 3) for i in range(4)])],
        outside=[("w", "sparse", 2, 4, 4, [codec.compress(b"gg")] * 4, [codec.compress(b"vv")] * 4)],
        training=(
            codec.compress(b'{"tree":{"x":{"$tensor":0}},"tensors":[["float32",[3]]]}'),
            [(4, 3, [codec.compress(b"ttt")] * 4)],
        ),
    )
    for key, value in change.items():
        setattr(content, key, value)
    return content


def test_step_record_round_trips() -> None:
    content = _content()
    data = b"".join(stepfile.pack(content))
    record, file = stepfile.parse(data, where="s")
    assert (record.version, record.step, record.store_id, record.digest, record.k) == (2, 7, "5" * 32, "d" * 32, 3)
    assert (record.base_digest, record.mask_digest, record.metadata) == ("b" * 32, "c" * 32, {"loss": 0.5})
    assert [file.section(key) for key in record.values[0].sections] == [bytes([i]) * 3 for i in range(4)]
    outside = record.outside[0]
    assert (outside.name, outside.mode, outside.count, outside.gap_width) == ("w", "sparse", 2, 4)
    assert [file.section(key) for key in outside.position_sections] == [b"gg"] * 4
    assert record.training is not None and record.training.tree == {"x": {"$tensor": 0}}
    assert record.training.tensors[0].dtype == "float32" and record.training.tensors[0].shape == (3,)
    assert record.stored_bytes == len(data)
    assert record.training_bytes == content.training_bytes > 0


@pytest.mark.parametrize(
    "change",
    [{"step": "7"}, {"values": [{"width": 4}]}, {"outside": [{"tensor": "w", "mode": "sparse"}]}, {"k": True},
     {"metadata": [1]}, {"digest": None}, {"store_id": None}],
    ids=["step", "values", "outside", "k-bool", "metadata", "digest", "store-id"],
)  # fmt: skip
def test_step_record_refuses_malformed_records(change: dict[str, object]) -> None:
    data = b"".join(stepfile.pack(_content(training=None)))
    with pytest.raises(FormatError, match="^s: malformed step record"):
        stepfile.parse(_resealed(data, _set_record(change)), where="s")


@pytest.mark.parametrize(
    ("change", "why"),
    [({"step": "7"}, "TypeError(\"expected an integer, got '7'\")"),
     ({"store_id": 5}, "TypeError('expected a string, got 5')"),
     ({"metadata": [1]}, "TypeError('metadata must be an object')")],
    ids=["int", "str", "metadata"],
)  # fmt: skip
def test_step_record_errors_say_which_value_is_wrong(change: dict[str, object], why: str) -> None:
    data = b"".join(stepfile.pack(_content(training=None)))
    with pytest.raises(FormatError) as raised:
        stepfile.parse(_resealed(data, _set_record(change)), where="s")
    assert str(raised.value) == f"s: malformed step record: {why}"


def test_step_records_without_training_state_or_read_without_sections() -> None:
    record, _ = stepfile.parse(b"".join(stepfile.pack(_content(training=None))), where="s")
    assert record.training is None and record.training_bytes == 0
    data = b"".join(stepfile.pack(_content()))
    header_only, _ = stepfile.parse(data, where="s", sections=False)  # what `info` reads: no training tree
    assert header_only.training is not None and header_only.training.tree is None
    assert header_only.training.tensors == [] and header_only.training_bytes > 0


def test_v1_step_headers_are_still_read() -> None:
    header = {
        "kind": "checkpoint",
        "step": 7,
        "created": 1.0,
        "base_digest": "b",
        "mask_digest": "m",
        "k": 3,
        "values": [[4, 3, 0]],
        "outside_mask": [["w", "sparse", 2, 4, 4, 8]],
        "digests": {"w": "d"},
        "metadata": {},
    }
    sections = [Section("raw", 1, bytes([i])) for i in range(12)]
    record, file = stepfile.parse(b"".join(container.pack(container.CHECKPOINT_MAGIC, header, sections)), where="s")
    assert record.version == 1 and record.tensor_digests == {"w": "d"}
    assert [file.section(key) for key in record.values[0].sections] == [bytes([i]) for i in range(4)]
    assert list(record.outside[0].position_sections) == [4, 5, 6, 7]
    assert list(record.outside[0].value_sections) == [8, 9, 10, 11]
    for bad in ({"kind": "mask"}, {"values": [[4, 3]]}, {"digests": []}):
        with pytest.raises(FormatError, match="^s: "):
            stepfile.parse(b"".join(container.pack(container.CHECKPOINT_MAGIC, {**header, **bad}, sections)), where="s")


def test_v1_training_records_are_still_read() -> None:
    """fishckpt 0.1 kept each training tensor's words as its own byte planes, named by section number."""
    header = {
        "kind": "checkpoint",
        "step": 7,
        "created": 1.0,
        "base_digest": "b",
        "mask_digest": "m",
        "k": 1,
        "values": [[1, 1, 4]],
        "outside_mask": [],
        "digests": {},
        "metadata": {"note": "x"},
        # The first tensor's planes open the file (section 0 counts); the second names one section past the end.
        "training": {"tree": {"m": {"$tensor": 0}}, "tensors": [["float32", [1], 0, 4], ["int8", [1], 5, 1]]},
    }
    sections = [Section("zstd", 100, bytes(1 + i)) for i in range(5)]  # 1, 2, ... 5 stored bytes (never decoded)
    data = b"".join(container.pack(container.CHECKPOINT_MAGIC, header, sections))
    record, file = stepfile.parse(data, where="s")
    assert (record.version, record.step, record.k, record.stored_bytes) == (1, 7, 1, len(data))
    assert record.training is not None and record.training.tree == {"m": {"$tensor": 0}}
    assert [(t.dtype, t.shape, t.sections) for t in record.training.tensors] == [
        ("float32", (1,), (0, 1, 2, 3)),
        ("int8", (1,), (5,)),
    ]
    assert record.training.streams == []
    assert record.training_bytes == 1 + 2 + 3 + 4  # the missing section counts nothing, and fails when read
    assert record.values[0].sections == (4,) and record.metadata == {"note": "x"}
    with pytest.raises(FormatError, match="^s: section 5 does not exist"):
        file.section(record.training.tensors[1].sections[0])
    no_training = {key: value for key, value in header.items() if key != "training"}
    record, _ = stepfile.parse(b"".join(container.pack(container.CHECKPOINT_MAGIC, no_training, sections)), where="s")
    assert record.training is None and record.training_bytes == 0


def test_a_damaged_v1_step_file_is_named() -> None:
    header = {"kind": "checkpoint", "step": 1, "created": 1.0, "base_digest": "b", "mask_digest": "m", "k": 0,
              "values": [], "outside_mask": [], "digests": {}, "metadata": {}}  # fmt: skip
    data = bytearray(b"".join(container.pack(container.CHECKPOINT_MAGIC, header, [])))
    with pytest.raises(FormatError, match="^s: not a checkpoint file \\(kind 'mask'\\)$"):
        stepfile.parse(b"".join(container.pack(container.CHECKPOINT_MAGIC, {**header, "kind": "mask"}, [])), where="s")
    with pytest.raises(FormatError) as raised:
        stepfile.parse(b"".join(container.pack(container.CHECKPOINT_MAGIC, {**header, "digests": []}, [])), where="s")
    assert str(raised.value) == "s: malformed checkpoint header: TypeError('metadata and digests must be objects')"
    data[20] ^= 1
    with pytest.raises(IntegrityError, match="^s: checkpoint file is corrupted or truncated"):
        stepfile.parse(bytes(data), where="s")


def test_chunk_ranges_and_sizes() -> None:
    """An empty tensor has one empty chunk; the last chunk is cut short; an element never spans two chunks."""
    assert list(digests.chunk_ranges(0, 4)) == [(0, 0)]
    assert list(digests.chunk_ranges(1, 4)) == [(0, 1)]
    assert list(digests.chunk_ranges(9, 4)) == [(0, 4), (4, 8), (8, 9)]
    assert digests.chunk_elements(4, 64) == 16 and digests.chunk_elements(16, 8) == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            _with_header({}, raw=b"{}" + b" " * 90)[:20],
            "damaged safetensors header: it declares 92 header bytes in a file of 20",
        ),
        (
            _with_header({"t": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4], "extra": 1}}, data=b"1234"),
            "damaged safetensors header at tensor 't': unexpected keys",
        ),
        (
            _with_header({"t": {"dtype": "U8", "shape": [4], "data_offsets": [0.0, 4.0]}}, data=b"1234"),
            "damaged safetensors header at tensor 't': shape and offsets must be non-negative integers",
        ),
        (
            _with_header(
                {
                    "t": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                    "u": {"dtype": "F32", "shape": [1], "data_offsets": [4, 12]},
                },
                data=bytes(12),
            ),
            "damaged safetensors header: tensor 'u' has shape [1] of F32 but 8 bytes",
        ),
        (
            _with_header(
                {
                    "t": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                    "u": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
                },
                data=bytes(6),
            ),
            "damaged safetensors header: tensor 'u' starts at data byte 2, expected 4 (overlap or hole)",
        ),
    ],
    ids=["length-past-the-end", "extra-key", "float-offsets", "size-in-bytes", "overlap-offsets"],
)
def test_parse_messages_give_the_numbers(data: bytes, message: str) -> None:
    with pytest.raises(IntegrityError) as raised:
        safetensors_layout.parse(data, file_size=len(data), where="damaged.bin")
    assert str(raised.value) == f"damaged.bin: {message}"


def test_header_length_limit_and_a_header_read_short() -> None:
    limit = safetensors_layout.MAX_HEADER_BYTES
    assert safetensors_layout.header_length(struct.pack("<Q", limit), file_size=8 + limit, where="f") == limit
    with pytest.raises(IntegrityError, match=f"^f: damaged safetensors header: it declares {limit + 1} header bytes"):
        safetensors_layout.header_length(struct.pack("<Q", limit + 1), file_size=9 + limit, where="f")
    data = _with_header({"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, data=b"x")
    with pytest.raises(IntegrityError, match="^f: truncated safetensors header$"):
        safetensors_layout.parse(data[:12], file_size=len(data), where="f")  # fewer bytes given than the header's
