"""One rank of the distributed tests: ``python _dist_worker.py SUITE RANK WORLD INIT_FILE OUT_DIR``.

SUITE is ``ddp`` (the masked all-reduce hook) or ``fsdp`` (SparseAdamW and mask_gradients on
DTensor parameters). Each scenario writes ``OUT_DIR/<scenario>.rank<R>.safetensors`` (tensors)
and ``.json`` (counts and messages); the tests compare them across ranks and with a
single-process run (tests/test_distributed.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _dist_cases import DDP_DIMS, FSDP_DIMS, LR, PER_RANK, make_mask, make_net, run_steps
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fishckpt import SparseAdamW, mask_gradients
from fishckpt.distributed import MaskedAllReduceState, register_masked_comm_hook

STEPS = 4


class ByteCounter:
    """Wraps torch.distributed.all_reduce and adds up the bytes of every tensor passed to it."""

    def __init__(self) -> None:
        self.total = 0
        self._all_reduce = dist.all_reduce

        def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.total += tensor.numel() * tensor.element_size()
            return self._all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting  # type: ignore[assignment]

    def per_step(self) -> tuple[list[int], Callable[[int], None]]:
        """A list that receives each step's bytes, and the on_step callback that fills it."""
        steps: list[int] = []
        start = [self.total]

        def on_step(step: int) -> None:
            steps.append(self.total - start[0])
            start[0] = self.total

        return steps, on_step


class Writer:
    def __init__(self, out: Path, rank: int) -> None:
        self.out, self.rank = out, rank

    def __call__(self, scenario: str, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
        stem = self.out / f"{scenario}.rank{self.rank}"
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, f"{stem}.safetensors")
        (stem.parent / f"{stem.name}.json").write_text(json.dumps(record))


def _named(prefix: str, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{name}": value for name, value in values.items()}


def _plan_kinds(state: MaskedAllReduceState) -> list[str]:
    return ["none" if p.index is None else "whole" if p.whole else "part" for p in state._plans.values()]


# DDP ---------------------------------------------------------------------------------------------------


def ddp_suite(rank: int, world: int, write: Writer) -> None:
    counter = ByteCounter()
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)

    def train(
        scenario: str,
        *,
        spare: bool = False,
        whole: bool = False,
        micro: int = 1,
        dtype: torch.dtype | None = None,
        **ddp_options: Any,
    ) -> None:
        net = make_net(DDP_DIMS, spare=spare)
        mask = make_mask(net, whole=whole)
        model = DistributedDataParallel(net, **ddp_options)
        state = register_masked_comm_hook(model, mask, dtype=dtype)
        optimizer = SparseAdamW(net, mask, lr=LR)
        grads: dict[str, torch.Tensor] = {}
        per_step, on_step = counter.per_step()

        def keep_grads(step: int) -> None:
            if step == STEPS - 1:
                grads.update({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})

        run_steps(
            model,
            optimizer,
            steps=STEPS,
            world=world,
            dims=DDP_DIMS,
            rows=rows,
            micro=micro,
            no_sync=model.no_sync,
            spare_on_odd_steps=spare,
            on_backward=keep_grads,
            on_step=on_step,
        )
        params = {n: p.detach() for n, p in net.named_parameters()}
        write(
            scenario,
            {**_named("param", params), **_named("grad", grads)},
            {"bytes_per_step": per_step, "k": state.k, "plans": _plan_kinds(state)},
        )

    train("train")
    train("small_buckets", bucket_cap_mb=1e-6)
    train("unused", spare=True, find_unused_parameters=True)
    train("accumulate", micro=3, gradient_as_bucket_view=True)
    train("whole", whole=True, bucket_cap_mb=1e-6)
    train("bf16", dtype=torch.bfloat16)
    train("fp16", dtype=torch.float16)
    compare_with_default_hooks(rank, world, write, counter)


def compare_with_default_hooks(rank: int, world: int, write: Writer, counter: ByteCounter) -> None:
    """One backward on the same data under the masked hook (partial and whole mask) and DDP's own reductions."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    tensors: dict[str, torch.Tensor] = {}
    record: dict[str, Any] = {}
    for kind in ("masked", "masked_whole", "python_default", "builtin"):
        net = make_net(DDP_DIMS)
        model = DistributedDataParallel(net)
        if kind.startswith("masked"):
            register_masked_comm_hook(model, make_mask(net, whole=kind == "masked_whole"))
        elif kind == "python_default":
            model.register_comm_hook(None, allreduce_hook)
        x, y = _batch0(world)
        before = counter.total
        nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        record[kind] = counter.total - before
        tensors.update(_named(kind, {n: p.grad for n, p in net.named_parameters() if p.grad is not None}))
    write("vs_default", tensors, record)


def _batch0(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    from _dist_cases import batch

    return batch(0, 0, world, DDP_DIMS)


# FSDP2 / DTensor ---------------------------------------------------------------------------------------


def fsdp_suite(rank: int, world: int, write: Writer) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)

    def sharded_net() -> nn.Module:
        net = make_net(FSDP_DIMS)
        for layer in (net.embed, net.hidden, net.head):
            fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        return net

    def finish(scenario: str, net: nn.Module, optimizer: torch.optim.Optimizer, grads: dict[str, torch.Tensor]) -> None:
        full = {n: p.full_tensor() for n, p in net.named_parameters()}  # type: ignore[operator]
        state_sizes = {}
        local_rows = {}
        for name, param in net.named_parameters():
            entry = optimizer.state.get(param, {})
            moment = entry.get("exp_avg")
            state_sizes[name] = int(moment.numel()) if isinstance(moment, torch.Tensor) else 0
            local_rows[name] = int(param.to_local().shape[0])  # type: ignore[operator]
        write(
            scenario,
            {**_named("param", full), **_named("local_grad", grads)},
            {
                "state_sizes": state_sizes,
                "local_rows": local_rows,
                "placements": {n: str(p.placements) for n, p in net.named_parameters()},  # type: ignore[attr-defined]
            },
        )

    def local_grads_keeper(net: nn.Module, grads: dict[str, torch.Tensor]) -> Callable[[int], None]:
        def keep(step: int) -> None:
            if step == STEPS - 1:
                grads.update({n: p.grad.to_local().clone() for n, p in net.named_parameters() if p.grad is not None})

        return keep

    # SparseAdamW on FSDP2's sharded parameters.
    net = sharded_net()
    mask = make_mask(make_net(FSDP_DIMS))
    optimizer: torch.optim.Optimizer = SparseAdamW(net, mask, lr=LR)
    grads: dict[str, torch.Tensor] = {}
    run_steps(
        net, optimizer, steps=STEPS, world=world, dims=FSDP_DIMS, rows=rows, on_backward=local_grads_keeper(net, grads)
    )
    finish("fsdp_adamw", net, optimizer, grads)

    # mask_gradients + plain SGD on FSDP2's sharded parameters.
    net = sharded_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR * 10)
    grads = {}
    with mask_gradients(net, mask):
        run_steps(
            net,
            optimizer,
            steps=STEPS,
            world=world,
            dims=FSDP_DIMS,
            rows=rows,
            on_backward=local_grads_keeper(net, grads),
        )
    finish("fsdp_mask_grads", net, optimizer, grads)

    # HSDP: a 2-d mesh (1 replica group x world shards), parameters placed (Replicate(), Shard(0)).
    hsdp_mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    net = make_net(FSDP_DIMS)
    for layer in (net.embed, net.hidden, net.head):
        fully_shard(layer, mesh=hsdp_mesh)
    fully_shard(net, mesh=hsdp_mesh)
    optimizer = SparseAdamW(net, mask, lr=LR)
    run_steps(net, optimizer, steps=STEPS, world=world, dims=FSDP_DIMS, rows=rows)
    finish("hsdp", net, optimizer, {})

    dtensor_by_hand(mesh, write)
    placements(mesh, write)


def dtensor_by_hand(mesh: Any, write: Writer) -> None:
    """DTensor parameters without FSDP: weights Shard(0), biases Replicate(), the same full batch on every rank."""
    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor

    def partition(name: str, module: nn.Module, device_mesh: Any) -> None:
        for param_name, param in list(module.named_parameters(recurse=False)):
            placement = Shard(0) if param_name == "weight" else Replicate()
            module.register_parameter(param_name, nn.Parameter(distribute_tensor(param.data, device_mesh, [placement])))

    def to_dtensor(module: nn.Module, inputs: tuple[Any, ...], device_mesh: Any) -> tuple[Any, ...]:
        return tuple(
            distribute_tensor(t, device_mesh, [Replicate()]) if isinstance(t, torch.Tensor) else t for t in inputs
        )

    def to_plain(module: nn.Module, output: Any, device_mesh: Any) -> torch.Tensor:
        return output.full_tensor()  # type: ignore[no-any-return]

    net = make_net(FSDP_DIMS)
    mask = make_mask(net, partial_head=True)  # head.weight's gradient comes placed Shard(1): mask it there
    distribute_module(net, mesh, partition, input_fn=to_dtensor, output_fn=to_plain)
    optimizer = SparseAdamW(net, mask, lr=LR)
    grads: dict[str, torch.Tensor] = {}
    grad_placements: dict[str, str] = {}

    def keep(step: int) -> None:
        if step == STEPS - 1:
            grads.update({n: p.grad.to_local().clone() for n, p in net.named_parameters() if p.grad is not None})
            grad_placements.update({n: str(p.grad.placements) for n, p in net.named_parameters() if p.grad is not None})

    with mask_gradients(net, mask):
        world = mesh.size()
        run_steps(net, optimizer, steps=STEPS, world=world, dims=FSDP_DIMS, rows=slice(None), on_backward=keep)
    full = {n: p.full_tensor() for n, p in net.named_parameters()}  # type: ignore[operator]
    write(
        "dtensor",
        {**_named("param", full), **_named("local_grad", grads)},
        {
            "grad_placements": grad_placements,
            "param_placements": {n: str(p.placements) for n, p in net.named_parameters()},  # type: ignore[attr-defined]
        },
    )


def placements(mesh: Any, write: Writer) -> None:
    """A DTensor sharded on dim 1 is refused by both, with a message naming the parameter."""
    from torch.distributed.tensor import Shard, distribute_tensor

    net = make_net(FSDP_DIMS)
    mask = make_mask(net)
    weight = net.embed.weight
    net.embed.weight = nn.Parameter(distribute_tensor(weight.data, mesh, [Shard(1)]))
    messages = {}
    for what, call in (
        ("SparseAdamW", lambda: SparseAdamW(net, mask)),
        ("mask_gradients", lambda: mask_gradients(net, mask)),
    ):
        try:
            call()
        except NotImplementedError as error:
            messages[what] = str(error)
        else:
            messages[what] = None
    write("placements", {}, messages)


def main() -> None:
    suite, rank, world, init_file, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], Path(sys.argv[5])
    torch.set_num_threads(1)
    store = dist.FileStore(init_file, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=90))
    try:
        {"ddp": ddp_suite, "fsdp": fsdp_suite}[suite](rank, world, Writer(out, rank))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
