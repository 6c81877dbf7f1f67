"""Sparse checkpoints of sharded (FSDP2) training: bytes per rank, and save time on 2 ranks against 1 (issue 12).

The same model (an MLP of ``--layers`` x Linear(hidden, hidden), a random 0.5% mask, the masked
entries moved) is saved by one process (a plain state, ``store.save``) and by 2 processes on
gloo, each holding its FSDP2 shard (``store.save(model.state_dict(), step)`` on every rank: each
writes its part, rank 0 the step file). ``torch.distributed.checkpoint.save`` of the same sharded
state is timed beside it, as the dense peer. Each configuration saves ``--rounds`` steps; the
best is reported. Saves of one world size run in their own processes, so the worlds cannot be
interleaved round by round: compare within a run, and expect the spread of a shared machine.

Usage: python bench/bench_sharded.py [--hidden 2048] [--layers 6] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import table

import fishckpt

KEEP = 0.005


def _model(hidden: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(hidden, hidden) for _ in range(layers)])


def _mask(model: nn.Module) -> fishckpt.Mask:
    generator = torch.Generator().manual_seed(1)
    return fishckpt.Mask.from_bool(
        {name: torch.rand(p.shape, generator=generator) < KEEP for name, p in model.named_parameters()}
    )


def _move(model: nn.Module, mask: fishckpt.Mask, step: int) -> None:
    """Moves every masked entry (this rank's part of it for a sharded model), as a training step would."""
    from fishckpt.sharding import local_view

    with torch.no_grad():
        for name, param in model.named_parameters():
            local, index = local_view(name, param, mask[name])
            flat = local.view(-1)
            flat[index] += 1e-4 * step


def _saves(
    save: Callable[[int], Any], rounds: int, barrier: Callable[[], None] = lambda: None
) -> list[float]:
    times = []
    for step in range(1, rounds + 1):
        barrier()
        started = time.perf_counter()
        save(step)
        barrier()
        times.append(time.perf_counter() - started)
    return times


def worker(rank: int, world: int, init: str, out: Path, hidden: int, layers: int, rounds: int) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group(
        "gloo", store=dist.FileStore(init, world), rank=rank, world_size=world, timeout=timedelta(seconds=300)
    )
    model = _model(hidden, layers)
    mask = _mask(model)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    store_path = out / "sharded-store"
    store = fishckpt.CheckpointStore.create(store_path, model.state_dict(), mask)
    results: dict[str, Any] = {}
    for check in (True, False):
        label = "exact" if check else "fast"

        def save(step: int, check: bool = check, label: str = label) -> None:
            _move(model, mask, step)
            store.save(model.state_dict(), step + (0 if check else 1000), check_outside_mask=check)

        results[label] = _saves(save, rounds, dist.barrier)
    parts = sorted(
        path.stat().st_size for path in (store_path / "steps").iterdir() if f"part-{rank:05d}-of-" in path.name
    )
    results["part_bytes"] = parts

    def dcp_save(step: int) -> None:
        target = out / f"dcp-{step}"
        dcp.save(model.state_dict(), checkpoint_id=str(target))
        dist.barrier()
        if rank == 0:
            shutil.rmtree(target, ignore_errors=True)

    results["dcp"] = _saves(dcp_save, rounds, dist.barrier)
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _one_process(hidden: int, layers: int, rounds: int, work: Path) -> dict[str, Any]:
    torch.set_num_threads(1)  # as each rank has: the comparison is per process, not per core count
    model = _model(hidden, layers)
    mask = _mask(model)
    store = fishckpt.CheckpointStore.create(work / "single-store", model, mask)
    results: dict[str, Any] = {"k": mask.k, "numel": mask.numel}
    for check in (True, False):

        def save(step: int, check: bool = check) -> None:
            _move(model, mask, step)
            store.save(model, step + (0 if check else 1000), check_outside_mask=check)

        results["exact" if check else "fast"] = _saves(save, rounds)
    steps = work / "single-store" / "steps"
    results["step_bytes"] = sorted(path.stat().st_size for path in steps.iterdir())
    return results


def run(report: Callable[[str], None], *, hidden: int = 2048, layers: int = 6, rounds: int = 5) -> dict[str, float]:
    warnings.simplefilter("ignore", fishckpt.OutsideMaskWarning)
    with tempfile.TemporaryDirectory(dir=".") as scratch:
        work = Path(scratch)
        single = _one_process(hidden, layers, rounds, work)
        world = 2
        procs = [
            subprocess.Popen(
                [
                    *(sys.executable, __file__, "--worker", str(rank), str(world), str(work / "init"), str(work)),
                    *("--hidden", str(hidden), "--layers", str(layers), "--rounds", str(rounds)),
                ],
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            for rank in range(world)
        ]
        for proc in procs:
            if proc.wait(timeout=1200) != 0:
                raise RuntimeError("a rank of the sharded benchmark failed")
        ranks = [json.loads((work / f"rank{rank}.json").read_text()) for rank in range(world)]
    numel = single["numel"]
    size = numel * 4
    report(
        f"An MLP of {layers} x Linear({hidden}, {hidden}): {numel / 1e6:.1f}M fp32 parameters "
        f"({size / 2**20:.0f} MiB), random mask k = {single['k']:,} ({KEEP:.1%}); best of {rounds} saves, "
        "one torch thread per process:\n"
    )
    best = {
        "1 process, exact check": min(single["exact"]),
        "1 process, fast path": min(single["fast"]),
        f"{world} ranks (FSDP2), exact check": min(min(r["exact"]) for r in ranks[:1]),
        f"{world} ranks (FSDP2), fast path": min(min(r["fast"]) for r in ranks[:1]),
        f"{world} ranks (FSDP2), DCP save (dense shards)": min(min(r["dcp"]) for r in ranks[:1]),
    }
    rows = [[name, f"{seconds * 1e3:,.1f}"] for name, seconds in best.items()]
    report(table(["save (wall time on rank 0, barrier to barrier)", "best ms"], rows))
    step_bytes = min(single["step_bytes"])
    part_bytes = [min(r["part_bytes"]) for r in ranks]
    report("\nBytes written per save:\n")
    report(
        table(
            ["writer", "bytes", "per masked value", "share of the 1-process step"],
            [["1 process: the step file", f"{step_bytes:,}", f"{step_bytes / single['k']:.3f}", "1.000"]]
            + [
                [f"rank {rank} of {world}: its part", f"{b:,}", "", f"{b / step_bytes:.3f}"]
                for rank, b in enumerate(part_bytes)
            ],
        )
    )
    ratios = {
        "exact, 2 ranks / 1 process": best[f"{world} ranks (FSDP2), exact check"] / best["1 process, exact check"],
        "fast, 2 ranks / 1 process": best[f"{world} ranks (FSDP2), fast path"] / best["1 process, fast path"],
        "DCP / fishckpt exact, 2 ranks": best[f"{world} ranks (FSDP2), DCP save (dense shards)"]
        / best[f"{world} ranks (FSDP2), exact check"],
    }
    report("\n" + table(["ratio (same run)", "measured"], [[k, f"{v:.2f}x"] for k, v in ratios.items()]))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=4, metavar=("RANK", "WORLD", "INIT", "OUT"))
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.worker:
        rank, world, init, out = args.worker
        worker(int(rank), int(world), init, Path(out), args.hidden, args.layers, args.rounds)
        return
    run(print, hidden=args.hidden, layers=args.layers, rounds=args.rounds)


if __name__ == "__main__":
    main()
