"""The batch layer (store/batch.py): the C table functions and the torch fallbacks, against an independent oracle."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import xxhash
from _states import DTYPES, random_tensor
from conftest import bits
from hypothesis import given, settings
from hypothesis import strategies as st

from fishckpt import Mask
from fishckpt.format.bits import element_words
from fishckpt.format.dtypes import dtype_row
from fishckpt.format.manifest import Manifest, TensorEntry
from fishckpt.store import batch
from fishckpt.store import native as _scan
from fishckpt.store.scan import RowPlan
from fishckpt.store.table import MaskTable, build_table

needs_native = pytest.mark.skipif(not _scan.available(), reason="the C extension was not built")
BOTH = [pytest.param(True, marks=needs_native), False]


def _chunk_digests(tensor: torch.Tensor, chunk_bytes: int) -> list[bytes]:
    """Oracle: the xxhash package's XXH3-128 of each chunk of the tensor's bytes."""
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    step = max(1, chunk_bytes // tensor.element_size()) * tensor.element_size()
    return [xxhash.xxh3_128_digest(data[i : i + step]) for i in range(0, max(len(data), 1), step)]


class Case:
    """Base tensors, a mask, a state changed inside the mask and at chosen outside positions, and the table."""

    def __init__(self, specs: list[tuple[torch.dtype, tuple[int, ...], float, int]], chunk_bytes: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.chunk_bytes = chunk_bytes
        self.base: dict[str, torch.Tensor] = {}
        self.state: dict[str, torch.Tensor] = {}
        indices, shapes, entries = {}, {}, []
        self.expected: set[tuple[str, int]] = set()  # (tensor, chunk) changed outside the mask
        for number, (dtype, shape, density, outside) in enumerate(specs):
            name = f"t{number}"
            base = random_tensor(dtype, shape, generator)
            numel = base.numel()
            index = torch.nonzero(torch.rand(numel, generator=generator) < density).reshape(-1)
            state = base.clone()
            words = element_words(state)
            words[index] = element_words(random_tensor(dtype, (index.numel(),), generator))
            unmasked = torch.ones(numel, dtype=torch.bool)
            unmasked[index] = False
            candidates = torch.nonzero(unmasked).reshape(-1)
            moved = candidates[torch.randperm(candidates.numel(), generator=generator)[:outside]]
            per_chunk = max(1, chunk_bytes // base.element_size())
            for position in moved.tolist():  # flip one bit of the first byte: always a real change
                state.reshape(-1)[position : position + 1].view(torch.uint8)[0] ^= 1
                self.expected.add((name, position // per_chunk))
            self.base[name], self.state[name] = base, state
            indices[name], shapes[name] = index, shape
            digests = _chunk_digests(base, chunk_bytes)
            entries.append(TensorEntry(name, dtype_row(dtype, key=name), shape, None, digests))
        self.mask = Mask.from_indices(indices, shapes)
        self.table: MaskTable = build_table(Manifest(entries, chunk_bytes, self.mask.digest, 0.0), self.mask)

    def rows(self, which: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [which[entry.name] for entry in self.table.entries]

    def reference_values(self, which: dict[str, torch.Tensor]) -> np.ndarray:
        """Oracle: every tensor's masked elements' bytes in table order, by plain indexing."""
        parts = [
            element_words(which[e.name])[self.mask[e.name]].contiguous().view(torch.uint8).reshape(-1).numpy()
            for e in self.table.entries
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.uint8)

    def scan(self, native: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, set[tuple[str, int]]]:
        base_values = self.table.new_values()
        batch.gather(self.table, self.rows(self.base), base_values)
        values = self.table.new_values()
        scratch = torch.empty(self.chunk_bytes + 16, dtype=torch.uint8)

        def plan(row: int) -> RowPlan:
            entry = self.table.entries[row]
            words = element_words(self.base[entry.name])[self.table.row_index(row)]
            return RowPlan.build(entry, self.table.row_index(row), words, int(self.table.chunk_elements[row]))

        with monkeypatch.context() as patch:
            if not native:
                patch.setattr(_scan, "module", None)
            differing = batch.scan_all(
                self.table,
                self.rows(self.state),
                values,
                base_values,
                row_plan=plan,
                scratch=lambda: scratch,
                scratch_lock=threading.Lock(),
            )
        return values, {(self.table.entries[row].name, chunk) for row, chunk in differing}


@pytest.mark.parametrize("native", BOTH, ids=["native", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scan_finds_exactly_the_changed_chunks(dtype: torch.dtype, native: bool, monkeypatch) -> None:
    # 1000 elements in chunks of 96 elements' bytes (a last, short chunk), a chunk-less empty tensor, a scalar.
    itemsize = torch.empty((), dtype=dtype).element_size()
    specs = [(dtype, (1000,), 0.05, 0), (dtype, (40, 25), 0.3, 3), (dtype, (1000,), 0.0, 2), (dtype, (7,), 1.0, 0)]
    specs += [(dtype, (0, 3), 0.5, 0), (dtype, (), 1.0, 0)]
    case = Case(specs, 96 * itemsize, seed=3)
    values, differing = case.scan(native, monkeypatch)
    assert differing == case.expected
    assert np.array_equal(values, case.reference_values(case.state))


@pytest.mark.parametrize("native", BOTH, ids=["native", "torch"])
def test_scan_blocks_cross_chunk_and_block_edges(native: bool, monkeypatch) -> None:
    # 4 KiB blocks inside 10,000-element chunks: masked entries on every edge, the state untouched elsewhere.
    case = Case([(torch.float32, (40_000,), 0.0, 0)], 40_000, seed=0)
    edges = [0, 1023, 1024, 1025, 9_999, 10_000, 10_001, 19_999, 39_999]
    case.mask = Mask.from_indices({"t0": edges}, {"t0": (40_000,)})
    entry = case.table.entries[0]
    case.table = build_table(Manifest([entry], 40_000, case.mask.digest, 0.0), case.mask)
    case.state["t0"] = case.base["t0"].clone()
    case.state["t0"][edges] = -1.0
    values, differing = case.scan(native, monkeypatch)
    assert differing == set()
    assert values.view(np.float32).tolist() == [-1.0] * len(edges)
    case.state["t0"][10_002] = 0.5  # outside the mask, in chunk 1
    assert case.scan(native, monkeypatch)[1] == {("t0", 1)}


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(st.sampled_from(DTYPES), st.integers(0, 300), st.floats(0, 1), st.integers(0, 4)),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from([16, 64, 272, 4096]),
    st.integers(0, 2**31 - 1),
)
def test_native_scan_matches_the_oracle_and_the_torch_loop(specs, chunk_bytes, seed) -> None:
    if not _scan.available():
        pytest.skip("the C extension was not built")
    case = Case([(dtype, (numel,), density, outside) for dtype, numel, density, outside in specs], chunk_bytes, seed)
    with pytest.MonkeyPatch.context() as patch:
        native_values, native_differing = case.scan(True, patch)
        torch_values, torch_differing = case.scan(False, patch)
    assert native_differing == torch_differing == case.expected
    assert np.array_equal(native_values, torch_values)
    assert np.array_equal(native_values, case.reference_values(case.state))


def _gather_then_scatter(case: Case, native: bool, monkeypatch) -> None:
    """Gathers the state's masked values, checks them against the oracle, and scatters them into the base."""
    with monkeypatch.context() as patch:
        if not native:
            patch.setattr(_scan, "module", None)
        values = case.table.new_values()
        batch.gather(case.table, case.rows(case.state), values)
        assert np.array_equal(values, case.reference_values(case.state))
        targets = {name: tensor.clone() for name, tensor in case.base.items()}
        assert batch.scatter(case.table, case.rows(targets), values) is None
        checked = {name: tensor.clone() for name, tensor in case.base.items()}
        assert batch.scatter(case.table, case.rows(checked), values, read_back=True) is None
    for name in case.base:
        assert torch.equal(bits(targets[name]), bits(case.state[name])), name
        assert torch.equal(bits(checked[name]), bits(case.state[name])), name


@pytest.mark.parametrize("native", BOTH, ids=["native", "torch"])
def test_gather_and_scatter_are_inverse_and_touch_only_masked_entries(native: bool, monkeypatch) -> None:
    case = Case([(d, (33, 7), 0.2, 0) for d in (torch.float32, torch.complex128, torch.bool, torch.bfloat16)], 64, 1)
    _gather_then_scatter(case, native, monkeypatch)


@pytest.mark.parametrize("native", BOTH, ids=["native", "torch"])
def test_gather_and_scatter_on_two_threads_every_element_size(native: bool, monkeypatch) -> None:
    # Over 64k masked elements, so the table is split between two threads; one row per element
    # size the C loop specialises (1, 2, 4, 8) and one it does not (16), each longer than its prefetch distance.
    dtypes = (torch.int8, torch.float16, torch.float32, torch.float64, torch.complex128)
    case = Case([(dtype, (211, 173), 0.4, 0) for dtype in dtypes], 4096, 7)
    assert case.table.index.size >= batch._TWO_THREADS_FROM_ELEMENTS
    assert len(batch._halves(np.diff(case.table.index_starts), batch._TWO_THREADS_FROM_ELEMENTS)) == 2
    _gather_then_scatter(case, native, monkeypatch)


@pytest.mark.parametrize("native", BOTH, ids=["native", "torch"])
def test_copy_check_copies_and_names_the_first_bad_chunk(native: bool, monkeypatch) -> None:
    case = Case([(torch.float64, (500,), 0.0, 0), (torch.int16, (3, 300), 0.0, 0), (torch.uint8, (0,), 0.0, 0)], 128, 2)
    sources = case.rows(case.base)
    with monkeypatch.context() as patch:
        if not native:
            patch.setattr(_scan, "module", None)
        targets = [torch.empty_like(t) for t in sources]
        assert batch.copy_check(case.table, targets, sources) == []
        for source, target in zip(sources, targets, strict=True):
            assert torch.equal(bits(target), bits(source))
        damaged = [t.clone() for t in sources]
        wide, narrow = case.table.row_of["t0"], case.table.row_of["t1"]
        damaged[wide].view(-1).view(torch.uint8)[300] ^= 1  # chunk 2 of 128-byte chunks
        damaged[narrow].reshape(-1).view(torch.uint8)[1799] ^= 1  # the int16 tensor's last chunk, 14
        assert batch.copy_check(case.table, [None] * 3, damaged) == sorted([(wide, 2), (narrow, 14)])
        fresh = [torch.empty_like(t) for t in damaged]
        assert batch.copy_check(case.table, fresh, damaged, verify=False) == []
        assert torch.equal(bits(fresh[wide]), bits(damaged[wide]))


def test_rows_send_only_contiguous_cpu_tensors_to_c() -> None:
    strided = torch.zeros(4, 4).t()
    conj = torch.zeros(3, dtype=torch.complex64).conj()
    rows = batch.Rows([torch.zeros(3), strided, conj, torch.zeros(2)])
    expected = [] if _scan.available() else [0, 3]
    assert rows.fallback == sorted([1, 2, *expected])
    assert (rows.addresses[[1, 2]] == 0).all()


@needs_native
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"index": np.array([5, 5, 9], dtype=np.int64)}, "row 0 has an index out of order or out of range"),
        ({"index": np.array([5, 3, 9], dtype=np.int64)}, "row 0 has an index out of order or out of range"),
        ({"index": np.array([1, 2, 100], dtype=np.int64)}, "row 0 has an index out of order or out of range"),
        ({"index": np.array([-1, 2, 3], dtype=np.int64)}, "row 0 has an index out of order or out of range"),
        ({"itemsizes": np.array([0], dtype=np.int64)}, "row 0 has an invalid size, count or index range"),
        ({"itemsizes": np.array([17], dtype=np.int64)}, "row 0 has an invalid size, count or index range"),
        ({"index_starts": np.array([0, 4], dtype=np.int64)}, "row 0 has an invalid size, count or index range"),
        ({"index_starts": np.array([2, 1], dtype=np.int64)}, "row 0 has an invalid size, count or index range"),
        ({"numels": np.array([1, 2], dtype=np.int64)}, "table arrays disagree in length"),
        ({"last": 2}, "rows \\[0, 2\\) outside the table's 1"),
    ],
    ids=["repeat", "descending", "past-end", "negative", "itemsize-0", "itemsize-17", "starts-past", "starts-back",
         "lengths", "rows"],
)  # fmt: skip
def test_native_tables_refuse_inconsistent_arguments(change: dict[str, object], message: str) -> None:
    data = np.zeros(100, dtype=np.float32)
    out = np.zeros(3, dtype=np.float32)
    args = {
        "first": 0,
        "last": 1,
        "data": np.array([data.ctypes.data], dtype=np.uint64),
        "numels": np.array([100], dtype=np.int64),
        "itemsizes": np.array([4], dtype=np.int64),
        "index_starts": np.array([0, 3], dtype=np.int64),
        "index": np.array([1, 2, 3], dtype=np.int64),
        "values": np.array([out.ctypes.data], dtype=np.uint64),
    }
    args.update(change)
    assert _scan.module is not None
    for function in (_scan.module.gather_table, _scan.module.scatter_table, _scan.module.scatter_checked_table):
        with pytest.raises(ValueError, match=message):
            function(*args.values())
    assert data.tolist() == [0.0] * 100  # nothing was written before the check failed


@needs_native
@pytest.mark.parametrize("count", [3, 5000], ids=["one-block", "past-a-block"])
def test_native_read_back_names_the_row_whose_memory_does_not_hold_its_values(count: int) -> None:
    # Row 1's tensor starts one element before its own values buffer, so each write moves the
    # values still to be written: the memory ends up not holding them, as when it changes underneath.
    healthy, healthy_values = np.zeros(10, dtype=np.float32), np.arange(1, 4, dtype=np.float32)
    shared = np.zeros(count + 1, dtype=np.float32)
    shared[1:] = np.arange(1, count + 1, dtype=np.float32)
    last = count - 1 if count < 4096 else 4096 + 7  # in the second block of a long row
    table = (
        np.array([healthy.ctypes.data, shared.ctypes.data], dtype=np.uint64),
        np.array([10, count + 1], dtype=np.int64),
        np.array([4, 4], dtype=np.int64),
        np.array([0, 3, 3 + last + 1], dtype=np.int64),
        np.concatenate([np.array([2, 5, 9]), np.arange(last + 1)]).astype(np.int64),
        np.array([healthy_values.ctypes.data, shared.ctypes.data + 4], dtype=np.uint64),
    )
    assert _scan.module is not None
    assert _scan.module.scatter_checked_table(0, 2, *table) == 1
    assert healthy[[2, 5, 9]].tolist() == [1.0, 2.0, 3.0]
    assert _scan.module.scatter_checked_table(0, 1, *table) == -1
    healthy[:] = 0
    _scan.module.scatter_table(0, 2, *table)  # the same writes, unchecked
    assert healthy[[2, 5, 9]].tolist() == [1.0, 2.0, 3.0]


def test_torch_read_back_names_the_row_whose_write_did_not_land(monkeypatch) -> None:
    case = Case([(torch.float32, (40,), 0.3, 0), (torch.int16, (7, 9), 0.3, 0)], 64, 3)
    values = case.table.new_values()
    batch.gather(case.table, case.rows(case.state), values)
    real = batch.element_words
    calls: list[int] = []

    def loses_the_second_rows_writes(tensor: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return real(tensor).clone() if len(calls) == 3 else real(tensor)  # 1, 2: row 0's write and read-back

    monkeypatch.setattr(_scan, "module", None)
    monkeypatch.setattr(batch, "element_words", loses_the_second_rows_writes)
    targets = {name: tensor.clone() for name, tensor in case.base.items()}
    assert batch.scatter(case.table, case.rows(targets), values, read_back=True) == 1
    assert batch.scatter(case.table, case.rows(targets), values, read_back=True) is None


@pytest.mark.parametrize("native", BOTH, ids=["native", "torch"])
@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("separate", None),
        ("same-tensor", (0, 1)),
        ("slices-that-meet", (0, 1)),
        ("slices-side-by-side", None),
        ("int8-inside-a-float", (1, 2)),
        ("interleaved-columns", None),
        ("column-and-its-own-rows", (0, 1)),
        ("float-in-a-column-gap", None),
    ],
)
def test_overlapping_finds_rows_that_share_memory(native: bool, layout: str, expected, monkeypatch) -> None:
    case = Case([(torch.float32, (8,), 0.5, 0), (torch.float32, (8,), 0.5, 0), (torch.int8, (4,), 0.5, 0)], 64, 4)
    buffer = torch.zeros(64)
    tensors = {
        "separate": [torch.zeros(8), torch.zeros(8), torch.zeros(4, dtype=torch.int8)],
        "same-tensor": [buffer[:8], buffer[:8], torch.zeros(4, dtype=torch.int8)],
        "slices-that-meet": [buffer[:8], buffer[7:15], torch.zeros(4, dtype=torch.int8)],
        "slices-side-by-side": [buffer[:8], buffer[8:16], buffer[16:17].view(torch.int8)],
        "int8-inside-a-float": [buffer[:8], buffer[8:16], buffer[15:16].view(torch.int8)],
        "interleaved-columns": [
            buffer[:16].view(8, 2)[:, 0],
            buffer[:16].view(8, 2)[:, 1],
            torch.zeros(4, dtype=torch.int8),
        ],
        "column-and-its-own-rows": [buffer[:16].view(8, 2)[:, 0], buffer[:8], torch.zeros(4, dtype=torch.int8)],
        "float-in-a-column-gap": [buffer[:16].view(8, 2)[:, 0], torch.zeros(8), buffer[3:4].view(torch.int8)],
    }[layout]
    with monkeypatch.context() as patch:
        if not native:
            patch.setattr(_scan, "module", None)
        rows = [tensors[int(entry.name[1:])] for entry in case.table.entries]
        found = batch.overlapping(case.table, batch.Rows(rows))
    names = [tuple(sorted(case.table.entries[row].name for row in pair)) for pair in found]
    assert names == ([] if expected is None else [tuple(f"t{number}" for number in expected)])


def test_store_works_where_the_extension_is_missing(tmp_path) -> None:
    # As installed without a compiler: importing fishckpt.store._native fails, and saves still find every change.
    script = f"""
import sys, warnings
sys.modules["fishckpt.store._native"] = None  # makes `from . import _native` raise ImportError
import torch
from fishckpt import CheckpointStore, Mask, OutsideMaskWarning, native_scan_available
assert not native_scan_available()
base = {{"w": torch.arange(4096, dtype=torch.float32), "b": torch.zeros(3)}}
mask = Mask.from_indices({{"w": [5, 4000]}}, {{"w": (4096,)}})
store = CheckpointStore.create({str(tmp_path / "store")!r}, base, mask)
state = {{"w": base["w"].clone(), "b": base["b"].clone()}}
state["w"][[5, 4000, 17]] = -1.0
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    info = store.save(state, 1)
assert info.changed_outside_mask == {{"w": 1}}, info
loaded = store.load(1)
assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])
store.load_into(state, 1)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
