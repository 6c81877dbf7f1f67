"""Training across processes: the masked all-reduce hook under DDP, and SparseAdamW / mask_gradients on DTensors.

Each suite runs once per world size (2 and 3 ranks on gloo, spawned and killed at a deadline by
_dist_cases.spawn); the tests below read what the ranks wrote and compare it across ranks,
with DDP's own reduction, and with single-process training on the combined batch.
"""

from __future__ import annotations

import ast
import math
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _dist_cases import (
    DDP_DIMS,
    FSDP_DIMS,
    LR,
    make_mask,
    make_net,
    reference,
    results,
    section,
    spawn,
)
from _dist_worker import STEPS
from conftest import assert_bits_equal, bits

from fishckpt import Mask, SparseAdamW
from fishckpt.errors import InvalidArgumentError, MaskMismatchError

WORLDS = [2, 3]


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"{w}ranks")
def ddp_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    world = int(request.param)
    out = tmp_path_factory.mktemp(f"ddp{world}")
    spawn("ddp", world, out)
    return world, out


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"{w}ranks")
def fsdp_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    world = int(request.param)
    out = tmp_path_factory.mktemp(f"fsdp{world}")
    spawn("fsdp", world, out)
    return world, out


def _outside(mask: Mask, name: str, numel: int) -> torch.Tensor:
    outside = torch.ones(numel, dtype=torch.bool)
    outside[mask[name]] = False
    return outside


def _sparse_adamw(net: torch.nn.Module, mask: Mask) -> torch.optim.Optimizer:
    return SparseAdamW(net, mask, lr=LR)


# The options of each DDP scenario (_dist_worker.ddp_suite), as the single-process reference needs them.
DDP_SCENARIOS = {
    "train": {},
    "small_buckets": {},
    "unused": {"spare": True},
    "accumulate": {"micro": 3},
    "whole": {"whole": True},
}
COMPRESSED = {"bf16": torch.bfloat16, "fp16": torch.float16}


# DDP: the masked all-reduce hook --------------------------------------------------------------------


@pytest.mark.parametrize("scenario", [*DDP_SCENARIOS, *COMPRESSED])
def test_ddp_ranks_stay_bitwise_identical(ddp_run: tuple[int, Path], scenario: str) -> None:
    world, out = ddp_run
    ranks = [section(tensors, "param") for tensors, _ in results(out, scenario, world)]
    initial = dict(make_net(DDP_DIMS, spare=scenario == "unused").named_parameters())
    assert any(not torch.equal(ranks[0][n], initial[n].detach()) for n in ranks[0]), "training changed nothing"
    for other in ranks[1:]:
        for name in ranks[0]:
            assert_bits_equal(other[name], ranks[0][name], key=name)


@pytest.mark.parametrize("scenario", list(DDP_SCENARIOS))
def test_ddp_matches_single_process_on_the_combined_batch(ddp_run: tuple[int, Path], scenario: str) -> None:
    world, out = ddp_run
    options = DDP_SCENARIOS[scenario]
    expected, mask, expected_grads = reference(DDP_DIMS, world, _sparse_adamw, steps=STEPS, **options)
    initial = dict(make_net(DDP_DIMS, spare=bool(options.get("spare"))).named_parameters())
    tensors, _ = next(results(out, scenario, world))
    params, grads = section(tensors, "param"), section(tensors, "grad")
    assert sorted(grads) == sorted(expected_grads), "a parameter's gradient is set in one run and not the other"
    for name, param in expected.named_parameters():
        index = mask[name]
        torch.testing.assert_close(params[name], param.detach(), rtol=1e-5, atol=1e-6)
        if index.numel():
            assert not torch.equal(params[name].reshape(-1)[index], initial[name].detach().reshape(-1)[index])
        outside = _outside(mask, name, param.numel())
        assert torch.equal(bits(params[name]).reshape(-1)[outside], bits(initial[name]).reshape(-1)[outside])
    for name, grad in grads.items():
        index = mask[name]
        mine, theirs = grad.reshape(-1)[index], expected_grads[name].reshape(-1)[index]
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scenario", [*DDP_SCENARIOS, *COMPRESSED])
def test_ddp_gradients_outside_the_mask_are_zero(ddp_run: tuple[int, Path], scenario: str) -> None:
    """After the hook every gradient entry outside the mask is +0.0 (the local gradients are dense)."""
    world, out = ddp_run
    mask = make_mask(make_net(DDP_DIMS, spare=True), whole=scenario == "whole")
    for tensors, _ in results(out, scenario, world):
        grads = section(tensors, "grad")
        assert grads, "no gradients were recorded"
        for name, grad in grads.items():
            outside = _outside(mask, name, grad.numel())
            assert not bool(bits(grad).reshape(-1)[outside].any()), f"{name}: nonzero gradient outside the mask"


@pytest.mark.parametrize("scenario", [*DDP_SCENARIOS, *COMPRESSED])
def test_ddp_sends_k_values_per_step(ddp_run: tuple[int, Path], scenario: str) -> None:
    """The bytes passed to torch.distributed.all_reduce in each step, summed over buckets: k x itemsize."""
    world, out = ddp_run
    net = make_net(DDP_DIMS, spare=scenario == "unused")
    mask = make_mask(net, whole=scenario == "whole")
    itemsize = 2 if scenario in COMPRESSED else 4
    total = sum(p.numel() for p in net.parameters())
    assert (mask.k < total) == (scenario != "whole")
    for _, record in results(out, scenario, world):
        assert record["k"] == mask.k
        assert record["bytes_per_step"] == [mask.k * itemsize] * STEPS


def test_ddp_counts_what_the_default_hook_sends(ddp_run: tuple[int, Path]) -> None:
    """One backward: torch's allreduce_hook sends all N values, the masked hook k, a whole mask N."""
    world, out = ddp_run
    net = make_net(DDP_DIMS)
    numel = sum(p.numel() for p in net.parameters())
    for _, record in results(out, "vs_default", world):
        assert record["python_default"] == numel * 4
        assert record["masked"] == make_mask(net).k * 4
        assert record["masked_whole"] == numel * 4


def test_ddp_masked_entries_get_what_ddp_would_give_them(ddp_run: tuple[int, Path]) -> None:
    """Same arithmetic as torch's allreduce_hook (divide, then sum): bit-identical on 2 ranks.

    On 3 ranks gloo's ring sums a value's three terms in an order that depends on where it
    sits in the buffer, so only the whole mask (the same buffer) is bit-identical there.
    """
    world, out = ddp_run
    mask = make_mask(make_net(DDP_DIMS))
    for tensors, _ in results(out, "vs_default", world):
        masked, whole = section(tensors, "masked"), section(tensors, "masked_whole")
        default, builtin = section(tensors, "python_default"), section(tensors, "builtin")
        for name, grad in default.items():
            index = mask[name]
            torch.testing.assert_close(builtin[name], grad, rtol=1e-6, atol=1e-8)
            assert_bits_equal(whole[name], grad, key=name)
            if world == 2:
                assert_bits_equal(masked[name].reshape(-1)[index], grad.reshape(-1)[index], key=name)
            else:
                mine, theirs = masked[name].reshape(-1)[index], grad.reshape(-1)[index]
                torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-8)


def test_ddp_bucket_layouts_take_every_path(ddp_run: tuple[int, Path]) -> None:
    """With tiny buckets (one parameter each) there are buckets without entries, wholly masked and partly masked."""
    world, out = ddp_run
    for _, record in results(out, "small_buckets", world):
        assert sorted(set(record["plans"])) == ["none", "part", "whole"]
        assert len(record["plans"]) == len(list(make_net(DDP_DIMS).parameters()))
    for _, record in results(out, "train", world):
        assert record["plans"] == ["part"]  # the default 25 MB bucket holds the whole model


@pytest.mark.parametrize("scenario", list(COMPRESSED))
def test_ddp_compressed_values_are_close_not_exact(ddp_run: tuple[int, Path], scenario: str) -> None:
    world, out = ddp_run
    dtype = COMPRESSED[scenario]
    expected, mask, expected_grads = reference(DDP_DIMS, world, _sparse_adamw, steps=STEPS)
    tensors, _ = next(results(out, scenario, world))
    grads, params = section(tensors, "grad"), section(tensors, "param")
    # Each rank's value and the sum are rounded to the dtype: a few units of its epsilon.
    epsilon = torch.finfo(dtype).eps
    inexact = 0
    for name, grad in grads.items():
        index = mask[name]
        if not index.numel():
            continue
        mine, theirs = grad.reshape(-1)[index], expected_grads[name].reshape(-1)[index]
        torch.testing.assert_close(mine, theirs, rtol=4 * epsilon, atol=4 * epsilon * float(theirs.abs().max()))
        inexact += int((mine != theirs).sum())
    assert inexact > 0, "compression changed no value: was it applied?"
    for name, param in expected.named_parameters():
        # Adam's steps are at most lr each; a rounded gradient moves a value by a fraction of that.
        torch.testing.assert_close(params[name], param.detach(), rtol=0, atol=STEPS * LR)


def test_hook_state_refuses_a_mask_that_does_not_fit() -> None:
    from fishckpt.distributed import MaskedAllReduceState

    net = make_net(DDP_DIMS)
    wrong = Mask.from_indices({"embed.weight": [0]}, {"embed.weight": (3, 3)})
    with pytest.raises(MaskMismatchError, match=r"'embed\.weight' has shape \(3, 3\)"):
        MaskedAllReduceState(net, wrong)
    unknown = Mask.from_indices({"decoder.weight": [0]}, {"decoder.weight": (2,)})
    with pytest.raises(
        MaskMismatchError,
        match=r"'decoder\.weight', which is not a trainable parameter of the DDP module; .*ddp_model\.module",
    ):
        MaskedAllReduceState(net, unknown)
    with pytest.raises(InvalidArgumentError, match=r"float16, torch\.bfloat16 or None"):
        MaskedAllReduceState(net, make_mask(net), dtype=torch.float64)


# FSDP2 / DTensor: SparseAdamW and mask_gradients on sharded parameters -------------------------------


def _shard_rows(rows: int, world: int, rank: int) -> range:
    """The rows rank ``rank`` holds: torch.chunk's split, the rule FSDP2 documents (computed independently here)."""
    chunks = torch.arange(rows).chunk(world)
    if rank >= len(chunks) or not chunks[rank].numel():
        return range(0)
    return range(int(chunks[rank][0]), int(chunks[rank][-1]) + 1)


@pytest.mark.parametrize("scenario", ["fsdp_adamw", "hsdp"])
def test_fsdp_sparse_adamw_matches_single_process(fsdp_run: tuple[int, Path], scenario: str) -> None:
    """FSDP2 on a 1-d mesh (Shard(0)), and HSDP on a 2-d one ((Replicate(), Shard(0)))."""
    world, out = fsdp_run
    expected, mask, _ = reference(FSDP_DIMS, world, _sparse_adamw, steps=STEPS)
    initial = dict(make_net(FSDP_DIMS).named_parameters())
    placements = {"fsdp_adamw": "(Shard(dim=0),)", "hsdp": "(Replicate(), Shard(dim=0))"}[scenario]
    records = [record for _, record in results(out, scenario, world)]
    assert all(placement == placements for record in records for placement in record["placements"].values())
    ranks = [section(tensors, "param") for tensors, _ in results(out, scenario, world)]
    for name, param in expected.named_parameters():
        for other in ranks[1:]:
            assert_bits_equal(other[name], ranks[0][name], key=name)
        torch.testing.assert_close(ranks[0][name], param.detach(), rtol=1e-5, atol=1e-6)
        index = mask[name]
        if index.numel():
            assert not torch.equal(ranks[0][name].reshape(-1)[index], initial[name].detach().reshape(-1)[index])
        outside = _outside(mask, name, param.numel())
        assert torch.equal(bits(ranks[0][name]).reshape(-1)[outside], bits(initial[name]).reshape(-1)[outside])


def test_fsdp_each_rank_keeps_state_for_its_shard_only(fsdp_run: tuple[int, Path]) -> None:
    world, out = fsdp_run
    net = make_net(FSDP_DIMS)
    mask = make_mask(net)
    records = [record for _, record in results(out, "fsdp_adamw", world)]
    assert any(0 in record["local_rows"].values() for record in records) == (world == 3)  # an empty shard on 3
    for name, param in net.named_parameters():
        row = math.prod(param.shape[1:])
        per_rank = []
        for rank, record in enumerate(records):
            assert record["placements"][name] == "(Shard(dim=0),)"
            rows = _shard_rows(param.shape[0], world, rank)
            assert record["local_rows"][name] == len(rows)
            index = mask[name]
            in_shard = int(((index >= rows.start * row) & (index < rows.stop * row)).sum())
            per_rank.append(record["state_sizes"][name])
            assert record["state_sizes"][name] == in_shard, f"rank {rank}, {name}"
        assert sum(per_rank) == mask[name].numel()


def _local_block(full: torch.Tensor, placement: str, world: int, rank: int) -> torch.Tensor:
    """This rank's block of ``full`` under a 1-d placement, by torch.chunk (independent of fishckpt's arithmetic)."""
    if placement == "(Replicate(),)":
        return full
    dim = int(placement.removeprefix("(Shard(dim=").removesuffix("),)"))
    chunks = full.chunk(world, dim=dim)
    if rank < len(chunks):
        return chunks[rank]
    empty_shape = list(full.shape)
    empty_shape[dim] = 0
    return full.new_zeros(empty_shape)


def _check_local_grad(
    local: torch.Tensor, expected: torch.Tensor, mask: Mask, name: str, placement: str, world: int, rank: int
) -> None:
    """A rank's gradient block: the reference gradient's block at the mask's entries, +0.0 elsewhere."""
    where = f"rank {rank}, {name} ({placement})"
    outside = _local_block(_outside(mask, name, expected.numel()).view(expected.shape), placement, world, rank)
    block = _local_block(expected, placement, world, rank)
    assert local.shape == block.shape, f"{where}: local shape {tuple(local.shape)}, expected {tuple(block.shape)}"
    torch.testing.assert_close(local[~outside], block[~outside], rtol=1e-5, atol=1e-7)
    assert not bool(bits(local).reshape(-1)[outside.reshape(-1)].any()), f"{where}: nonzero gradient outside the mask"


def test_fsdp_mask_gradients_with_a_plain_optimizer(fsdp_run: tuple[int, Path]) -> None:
    world, out = fsdp_run

    def sgd(net: torch.nn.Module, mask: Mask) -> torch.optim.Optimizer:
        return torch.optim.SGD(net.parameters(), lr=LR * 10)

    expected, mask, expected_grads = reference(FSDP_DIMS, world, sgd, steps=STEPS, masked_grads=True)
    initial = dict(make_net(FSDP_DIMS).named_parameters())
    for rank, (tensors, _) in enumerate(results(out, "fsdp_mask_grads", world)):
        params, local_grads = section(tensors, "param"), section(tensors, "local_grad")
        for name, param in expected.named_parameters():
            torch.testing.assert_close(params[name], param.detach(), rtol=1e-5, atol=1e-6)
            outside = _outside(mask, name, param.numel())
            assert torch.equal(bits(params[name]).reshape(-1)[outside], bits(initial[name]).reshape(-1)[outside])
            _check_local_grad(local_grads[name], expected_grads[name], mask, name, "(Shard(dim=0),)", world, rank)


def test_dtensor_parameters_by_hand_match_single_process(fsdp_run: tuple[int, Path]) -> None:
    """DTensor parameters without FSDP: weights Shard(0), biases Replicate(), gradients as DTensor makes them."""
    world, out = fsdp_run
    expected, mask, expected_grads = reference(FSDP_DIMS, world, _sparse_adamw, steps=STEPS, partial_head=True)
    for rank, (tensors, record) in enumerate(results(out, "dtensor", world)):
        assert record["param_placements"]["embed.weight"] == "(Shard(dim=0),)"
        assert record["param_placements"]["embed.bias"] == "(Replicate(),)"
        params, local_grads = section(tensors, "param"), section(tensors, "local_grad")
        for name, param in expected.named_parameters():
            torch.testing.assert_close(params[name], param.detach(), rtol=1e-5, atol=1e-6)
            # mask_gradients zeroed the local gradient outside the mask, whatever its placement.
            placement = record["grad_placements"][name]
            _check_local_grad(local_grads[name], expected_grads[name], mask, name, placement, world, rank)
        # DTensor chose gradient placements unlike the parameters' (SparseAdamW redistributes them),
        # among them one sharded on dim 1, which mask_gradients masked where it lies.
        assert record["grad_placements"]["embed.bias"] != record["param_placements"]["embed.bias"]
        assert record["grad_placements"]["head.weight"] == "(Shard(dim=1),)"
        assert 0 < mask["head.weight"].numel() < expected.head.weight.numel()


def test_localize_finds_the_mask_entries_of_any_block() -> None:
    """The shard index arithmetic, single-process, against slicing a tensor of positions."""
    from fishckpt.sharding import localize as _localize

    generator = torch.Generator().manual_seed(3)

    def draw(low: int, high: int) -> int:  # in [low, high)
        return int(torch.randint(low, high, (1,), generator=generator))

    for trial in range(200):
        shape = tuple(draw(1, 6) for _ in range(draw(1, 4)))
        positions = torch.arange(math.prod(shape)).reshape(shape)
        bounds = []
        for size in shape:
            low = draw(0, size + 1)
            bounds.append((low, draw(low, size + 1)))
        if trial % 3 == 0:  # dim-0 blocks, the FSDP2 case
            bounds = [bounds[0]] + [(0, size) for size in shape[1:]]
        count = draw(0, positions.numel() + 1)
        index = torch.randperm(positions.numel(), generator=generator)[:count].sort().values
        block = positions[tuple(slice(low, high) for low, high in bounds)].reshape(-1)
        expected = torch.nonzero(torch.isin(block, index)).reshape(-1)
        assert torch.equal(_localize(index, shape, bounds), expected), (shape, bounds)


def test_other_placements_raise_not_implemented(fsdp_run: tuple[int, Path]) -> None:
    world, out = fsdp_run
    for _, record in results(out, "placements", world):
        for what in ("SparseAdamW", "mask_gradients"):
            message = record[what]
            assert message is not None, f"{what} accepted a DTensor sharded on dim 1"
            assert "'embed.weight'" in message and "Shard(dim=1)" in message and "Shard(0)" in message


# Single-process paths stay free of torch.distributed -------------------------------------------------

SINGLE_PROCESS = textwrap.dedent(
    """
    import importlib.abc, sys
    from pathlib import Path
    import torch

    PACKAGE = str(Path(sys.argv[1]).resolve())

    class Guard(importlib.abc.MetaPathFinder):
        # Refuses to load any torch.distributed module (or fishckpt.distributed) for code in fishckpt/.
        def find_spec(self, name, path, target=None):
            if name.startswith(("torch.distributed", "fishckpt.distributed")):
                frame = sys._getframe(1)
                while frame is not None and frame.f_code.co_filename.startswith("<frozen"):
                    frame = frame.f_back  # importlib's own frames: find the importing code
                if frame is not None and frame.f_code.co_filename.startswith(PACKAGE):
                    raise ImportError(f"{frame.f_code.co_filename} imported {name}")
            return None

    loaded = lambda: {m for m in sys.modules if m.startswith(("torch.distributed", "fishckpt.distributed"))}
    with_torch = loaded()
    sys.meta_path.insert(0, Guard())
    import fishckpt
    print("IMPORT ADDED", sorted(loaded() - with_torch))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    mask = fishckpt.random_mask(model, keep_ratio=0.5, seed=0)
    optimizer = fishckpt.SparseAdamW(model, mask, lr=1e-2)
    with fishckpt.mask_gradients(model, mask, optimizer=optimizer):
        model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    print("TRAINED")
    try:  # the guard itself works: code in fishckpt/ that loads a torch.distributed module fails
        exec(compile("import torch.distributed.pipelining", PACKAGE + "/probe.py", "exec"))
    except ImportError as error:
        print("GUARD", error)
    """
)


def test_single_process_training_does_not_import_torch_distributed() -> None:
    """``import fishckpt`` adds no torch.distributed module to those ``import torch`` loads; training loads none itself.

    torch itself loads parts of torch.distributed: ``import torch`` about 30 modules, and the
    first optimizer step over a hundred more (through torch._dynamo). So the check is on who
    asks: no torch.distributed module is ever loaded by an import in fishckpt's own code.
    """
    result = subprocess.run(
        [sys.executable, "-c", SINGLE_PROCESS, str(LIBRARY)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "IMPORT ADDED []"
    assert lines[1] == "TRAINED"
    assert lines[2].startswith("GUARD ") and "probe.py imported torch.distributed.pipelining" in lines[2]


LIBRARY = Path(__file__).resolve().parent.parent / "fishckpt"


def _imports_outside_functions(tree: ast.AST) -> Iterator[str]:
    """Modules imported when a file is imported: anywhere but inside a function body."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or ""
        yield from _imports_outside_functions(node)


def test_no_import_of_torch_distributed_at_import_time_outside_the_distributed_package() -> None:
    """Outside fishckpt/distributed/, torch.distributed is only ever imported inside a function (lazily)."""
    offenders = []
    for path in sorted(LIBRARY.rglob("*.py")):
        if "distributed" in path.relative_to(LIBRARY).parts:
            continue
        names = _imports_outside_functions(ast.parse(path.read_text()))
        offenders += [f"{path.name}: {name}" for name in names if name.startswith("torch.distributed")]
    assert not offenders
    # The check sees imports nested in classes and ifs, and skips function bodies.
    sample = "import os\nif x:\n    import torch.distributed.tensor\ndef f():\n    import torch.distributed.fsdp\n"
    assert list(_imports_outside_functions(ast.parse(sample))) == ["os", "torch.distributed.tensor"]
