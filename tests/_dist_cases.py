"""What the distributed tests train, shared by the spawned ranks (_dist_worker.py) and the single-process references.

The tests start ``world`` processes that run ``_dist_worker.py`` on gloo over a FileStore (no
ports to race for), wait for them under a deadline, and compare what they wrote with a
single-process run computed here from the same seeds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from fishckpt import Mask

WORKER = Path(__file__).with_name("_dist_worker.py")
PER_RANK = 6  # rows of each global batch every rank gets
LR = 1e-2
# Layer widths: DDP runs use a wider net (buckets of several sizes); FSDP runs a narrow one whose
# rows split unevenly over 2 and 3 ranks (5 rows -> 3+2 / 2+2+1; 2 rows -> 1+1+0: an empty shard).
DDP_DIMS = (12, 24, 24, 4)
FSDP_DIMS = (12, 5, 7, 2)


class Net(nn.Module):
    """Three linear layers, and a ``spare`` head used only when asked (for find_unused_parameters)."""

    def __init__(self, dims: tuple[int, int, int, int], *, spare: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(dims[0], dims[1])
        self.hidden = nn.Linear(dims[1], dims[2])
        self.head = nn.Linear(dims[2], dims[3])
        self.spare = nn.Linear(dims[2], dims[3]) if spare else None

    def forward(self, x: torch.Tensor, use_spare: bool = False) -> torch.Tensor:
        h = torch.tanh(self.hidden(torch.tanh(self.embed(x))))
        out = self.head(h)
        if use_spare:
            assert self.spare is not None
            out = out + self.spare(h)
        return out


def make_net(dims: tuple[int, int, int, int], *, spare: bool = False, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net(dims, spare=spare)


def make_mask(net: nn.Module, *, whole: bool = False, partial_head: bool = False) -> Mask:
    """Part of some tensors, none of ``embed.bias`` or ``spare.bias``, all of the head (or half its weight)."""
    shapes = {name: tuple(p.shape) for name, p in net.named_parameters()}
    if whole:
        return Mask.from_indices({name: range(p.numel()) for name, p in net.named_parameters()}, shapes)
    generator = torch.Generator().manual_seed(11)
    fractions = {"embed.weight": 0.15, "hidden.weight": 0.1, "hidden.bias": 0.5, "spare.weight": 0.2}
    if partial_head:
        fractions["head.weight"] = 0.5
    indices: dict[str, torch.Tensor | range] = {}
    for name, param in net.named_parameters():
        if name in fractions:
            count = max(1, int(param.numel() * fractions[name]))
            indices[name] = torch.randperm(param.numel(), generator=generator)[:count]
        elif name.startswith("head."):  # all of the head
            indices[name] = range(param.numel())
    return Mask.from_indices(indices, shapes)


def batch(step: int, micro: int, world: int, dims: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of one (micro-)step: ``world * PER_RANK`` rows, of which rank r takes the r-th ``PER_RANK``."""
    generator = torch.Generator().manual_seed(1000 * step + micro)
    rows = world * PER_RANK
    return torch.randn(rows, dims[0], generator=generator), torch.randint(0, dims[3], (rows,), generator=generator)


def run_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    world: int,
    dims: tuple[int, int, int, int],
    rows: slice,
    micro: int = 1,
    no_sync: Callable[[], AbstractContextManager[object]] | None = None,
    spare_on_odd_steps: bool = False,
    on_backward: Callable[[int], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> None:
    """The training loop every run shares: ``micro`` accumulated micro-batches per step, the mean loss of each.

    A rank passes its ``rows`` of each global batch and ``no_sync`` (DDP's) for all micro-batches
    but the last; the single-process reference passes every row and accumulates the same way.
    """
    for step in range(steps):
        for m in range(micro):
            x, y = batch(step, m, world, dims)
            context = no_sync() if no_sync is not None and m < micro - 1 else nullcontext()
            with context:
                out = model(x[rows], use_spare=spare_on_odd_steps and step % 2 == 1)
                nn.functional.cross_entropy(out, y[rows]).backward()
        if on_backward is not None:
            on_backward(step)
        optimizer.step()
        optimizer.zero_grad()
        if on_step is not None:
            on_step(step)


def reference(
    dims: tuple[int, int, int, int],
    world: int,
    make_optimizer: Callable[[nn.Module, Mask], torch.optim.Optimizer],
    *,
    steps: int,
    spare: bool = False,
    micro: int = 1,
    whole: bool = False,
    partial_head: bool = False,
    masked_grads: bool = False,
) -> tuple[Net, Mask, dict[str, torch.Tensor]]:
    """Single-process training on the combined batch; returns the net, its mask and the last step's gradients."""
    from fishckpt import mask_gradients

    net = make_net(dims, spare=spare)
    mask = make_mask(net, whole=whole, partial_head=partial_head)
    optimizer = make_optimizer(net, mask)
    grads: dict[str, torch.Tensor] = {}

    def keep_grads(step: int) -> None:
        if step == steps - 1:
            grads.update({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})

    context = mask_gradients(net, mask) if masked_grads else nullcontext()
    with context:
        run_steps(
            net,
            optimizer,
            steps=steps,
            world=world,
            dims=dims,
            rows=slice(None),
            micro=micro,
            spare_on_odd_steps=spare,
            on_backward=keep_grads,
        )
    return net, mask, grads


# Spawning the ranks ---------------------------------------------------------------------------------


def spawn(
    suite: str,
    world: int,
    out: Path,
    *,
    timeout: float = 240.0,
    worker: Path = WORKER,
    extra: tuple[str, ...] = (),
) -> None:
    """Runs ``worker SUITE RANK WORLD INIT OUT *extra`` on ``world`` processes; fails with a rank's output if any fails.

    Every rank is killed when the deadline passes, so a hung collective fails the test instead of CI.
    """
    out.mkdir(parents=True, exist_ok=True)
    init_file = out / "rendezvous"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = []
    logs = []
    for rank in range(world):
        log = open(out / f"rank{rank}.log", "w")  # noqa: SIM115  # closed below, after the process ends
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(worker), suite, str(rank), str(world), str(init_file), str(out), *extra],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    failed = [rank for rank, proc in enumerate(procs) if proc.returncode != 0]
    if failed:
        rank = failed[0]
        hung = time.monotonic() >= deadline
        text = (out / f"rank{rank}.log").read_text()[-4000:]
        raise AssertionError(
            f"{suite} on {world} ranks: rank {rank} {'was killed after ' + str(timeout) + ' s' if hung else 'failed'}"
            f" (exit {procs[rank].returncode}):\n{text}"
        )


def results(out: Path, scenario: str, world: int) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Each rank's tensors and JSON record of one scenario."""
    for rank in range(world):
        tensors = load_file(out / f"{scenario}.rank{rank}.safetensors")
        record = json.loads((out / f"{scenario}.rank{rank}.json").read_text())
        yield tensors, record


def section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) + 1 :]: value for key, value in tensors.items() if key.startswith(prefix + "/")}
