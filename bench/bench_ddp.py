"""Distributed benchmark (issue 12): the masked all-reduce hook against DDP's default, 2 ranks on gloo.

Run ``nice -n 19 python bench/bench_ddp.py`` (or ``make bench``). It starts 2 processes on this
machine (gloo over loopback, one torch thread each), trains nothing, and times forward + backward
of a ~100M-parameter MLP per step: DDP's all-reduce runs inside backward, so that is where the
hooks differ. The optimizer is left out (the same SparseAdamW runs after either hook). Configurations
are interleaved round by round; each rank counts the bytes passed to ``torch.distributed.all_reduce``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

WIDTH = 4096
LAYERS = 6  # 6 x (4096 x 4096 + 4096) = 100.7M parameters
BATCH = 16  # rows per rank
WORLD = 2
LINKS_GBIT = (1, 10, 100)


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(LAYERS):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _mask(model: nn.Module, ratio: float) -> Any:
    """A random mask with round(numel * ratio) entries in every tensor (the same on every rank: seeded)."""
    from fishckpt import Mask

    generator = torch.Generator().manual_seed(int(ratio * 1e6))
    indices = {}
    for name, param in model.named_parameters():
        count = round(param.numel() * ratio)
        indices[name] = torch.randperm(param.numel(), generator=generator)[:count]
    return Mask.from_indices(indices, {name: tuple(p.shape) for name, p in model.named_parameters()})


# The ranks ---------------------------------------------------------------------------------------------

NO_COMM = "DDP, hook that sends nothing"


def _no_communication(state, bucket):  # type: ignore[no-untyped-def]  # DDP rejects string annotations
    """DDP's bucketing and copies without any transfer: the compute a real link adds its wire time to."""
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(bucket.buffer())
    return done



def _worker(rank: int, init_file: str, out: str, ratios: list[float], rounds: int, steps: int, width: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from fishckpt.distributed import register_masked_comm_hook

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", store=dist.FileStore(init_file, WORLD), rank=rank, world_size=WORLD, timeout=timedelta(seconds=600)
    )
    sent = [0]
    all_reduce = dist.all_reduce

    def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sent[0] += tensor.numel() * tensor.element_size()
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting  # type: ignore[assignment]

    model = _model(width)
    masks = {ratio: _mask(model, ratio) for ratio in ratios}
    generator = torch.Generator().manual_seed(100 + rank)
    inputs = torch.randn(BATCH, width, generator=generator)

    def _ddp(ratio: float | None, dtype: torch.dtype | None = None) -> nn.Module:
        # One DDP at a time wraps the model: the previous one is deleted (its reducer with it) first.
        ddp = DistributedDataParallel(model)
        if ratio is not None:
            register_masked_comm_hook(ddp, masks[ratio], dtype=dtype)
        return ddp

    def _ddp_without_communication() -> nn.Module:
        ddp = DistributedDataParallel(model)
        ddp.register_comm_hook(None, _no_communication)
        return ddp

    configs: dict[str, Callable[[], nn.Module]] = {
        "local (no DDP)": lambda: model,
        NO_COMM: _ddp_without_communication,
        "DDP default": lambda: _ddp(None),
    }
    for ratio in ratios:
        configs[f"masked {ratio:.1%}"] = lambda ratio=ratio: _ddp(ratio)  # type: ignore[misc]
    configs[f"masked {ratios[0]:.1%}, bf16"] = lambda: _ddp(ratios[0], torch.bfloat16)

    def step(net: nn.Module) -> None:
        net(inputs).square().mean().backward()
        model.zero_grad(set_to_none=False)

    times: dict[str, list[float]] = {name: [] for name in configs}
    bytes_per_step: dict[str, int] = {}
    for _ in range(rounds):
        for name, build in configs.items():
            net = build()
            step(net)  # DDP rebuilds its buckets after the first iteration;
            step(net)  # the second runs on the final layout
            dist.barrier()
            before = sent[0]
            for _ in range(steps):
                start = time.perf_counter()
                step(net)
                times[name].append(time.perf_counter() - start)
            bytes_per_step[name] = (sent[0] - before) // steps
            del net
            gc.collect()
            dist.barrier()
    if rank == 0:
        numel = sum(p.numel() for p in model.parameters())
        record = {
            "numel": numel,
            "k": {f"{ratio:.1%}": masks[ratio].k for ratio in ratios},
            "times": times,
            "counted_bytes": bytes_per_step,
        }
        Path(out).write_text(json.dumps(record))
    dist.destroy_process_group()


# The report --------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def run(
    report: Callable[[str], None],
    *,
    ratios: tuple[float, ...] = (0.005, 0.02),
    rounds: int = 5,
    steps: int = 3,
    width: int = WIDTH,
) -> None:
    """Spawns the 2 ranks, waits (at most 30 minutes) and reports markdown tables through ``report``."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        init = Path(folder) / "rendezvous"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, __file__, "--worker", "--init", str(init), "--out", str(out)]
        command += ["--rounds", str(rounds), "--steps", str(steps), "--width", str(width)]
        command += ["--ratios", *map(str, ratios)]
        procs = [subprocess.Popen([*command, "--rank", str(rank)], env=env) for rank in range(WORLD)]
        try:
            for proc in procs:
                proc.wait(timeout=1800)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        if any(proc.returncode for proc in procs):
            raise SystemExit(f"a rank failed: exit codes {[proc.returncode for proc in procs]}")
        record = json.loads(out.read_text())
    _report(report, record, rounds=rounds, steps=steps, width=width)


def _report(report: Callable[[str], None], record: dict[str, Any], *, rounds: int, steps: int, width: int) -> None:
    numel = int(record["numel"])
    best = {name: min(values) for name, values in record["times"].items()}
    median = {name: sorted(values)[len(values) // 2] for name, values in record["times"].items()}
    default_bytes = numel * 4
    report(
        f"\nModel: {LAYERS} x Linear({width}, {width}), N = {numel:,} fp32 parameters; {WORLD} ranks on gloo "
        f"(loopback), 1 thread each, batch {BATCH} per rank. Forward + backward per step (DDP's all-reduce "
        f"runs in backward), {rounds} interleaved rounds of {steps} steps per configuration."
    )
    rows = []
    for name in record["times"]:
        if name.startswith("local") or name == NO_COMM:
            sent_bytes = 0
        elif name == "DDP default":
            sent_bytes = default_bytes  # every gradient; the suite counts this with torch's allreduce_hook
        else:
            sent_bytes = int(record["counted_bytes"][name])
        rows.append(
            [
                name,
                f"{sent_bytes:,}",
                f"{sent_bytes / default_bytes:.4f}",
                f"{best[name] * 1e3:.0f}",
                f"{median[name] * 1e3:.0f}",
                f"{best['DDP default'] / best[name]:.2f}x",
            ]
        )
    report("\n#### Bytes passed to all_reduce per step, and step time on loopback\n")
    report(
        _table(["configuration", "bytes / step", "vs default", "best ms", "median ms", "speed-up (best)"], rows)
    )
    for ratio, k in record["k"].items():
        counted = int(record["counted_bytes"][f"masked {ratio}"])
        report(f"\nmasked {ratio}: k = {k:,}; counted {counted:,} bytes = k x 4 exactly: {counted == k * 4}")

    # Projection: a ring all-reduce sends 2(W-1)/W of the payload from each rank (W = 2: all of it).
    factor = 2 * (WORLD - 1) / WORLD
    report(
        "\n#### Projected step time on a real link, from the measured bytes\n\n"
        f"Wire time = {factor:g} x bytes x 8 / link speed (a ring all-reduce over {WORLD} ranks sends "
        f"2(W-1)/W = {factor:g} of the payload from each rank). C = the masked configuration's measured "
        "step on loopback: forward, backward, DDP's bucket copies, the ranks waiting for each other, and "
        "the hook's own work and its loopback all-reduce of k values. The default is given the same C, "
        "so the hook's cost counts against the masked hook only: the projection understates its gain. "
        "Masked step = C + its wire time. DDP overlaps the all-reduce with backward, so the default's "
        "step lies between max(C, wire) and C + wire; the gain range follows from those two bounds."
    )
    rows = []
    for name in record["times"]:
        if not name.startswith("masked"):
            continue
        counted = int(record["counted_bytes"][name])
        compute = best[name]
        for link in LINKS_GBIT:
            wire_default = factor * default_bytes * 8 / (link * 1e9)
            wire_masked = factor * counted * 8 / (link * 1e9)
            masked_step = compute + wire_masked
            low, high = max(compute, wire_default), compute + wire_default
            rows.append(
                [
                    name,
                    f"{link} Gbit/s",
                    f"{factor:g} x {default_bytes:,} x 8 / {link}e9 = {wire_default * 1e3:.1f}",
                    f"{low * 1e3:.0f} to {high * 1e3:.0f}",
                    f"{factor:g} x {counted:,} x 8 / {link}e9 = {wire_masked * 1e3:.2f}",
                    f"{compute * 1e3:.0f} + {wire_masked * 1e3:.2f} = {masked_step * 1e3:.0f}",
                    f"{low / masked_step:.2f}x to {high / masked_step:.2f}x",
                ]
            )
    report(
        "\n"
        + _table(
            [
                "configuration",
                "link",
                "default wire ms",
                "default step ms",
                "masked wire ms",
                "masked step ms (C + wire)",
                "projected gain",
            ],
            rows,
        )
    )
    report("\nThe masked hook's own tensor work per step, timed alone on one thread (N values in 25 MB buckets):")
    for ratio, k in record["k"].items():
        seconds = _hook_work_seconds(numel, int(k))
        report(f"masked {ratio}: gather + divide + zero + scatter = {seconds * 1e3:.0f} ms")


def _hook_work_seconds(numel: int, k: int, *, repeats: int = 3) -> float:
    """Best time of the hook's tensor work over N values with k masked, in 25 MB buckets as DDP makes them."""
    torch.set_num_threads(1)
    bucket = 25 * 2**20 // 4
    generator = torch.Generator().manual_seed(0)
    buffers = [torch.randn(min(bucket, numel - start), generator=generator) for start in range(0, numel, bucket)]
    indices = [
        torch.randperm(b.numel(), generator=generator)[: round(k * b.numel() / numel)].sort().values for b in buffers
    ]
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for buffer, index in zip(buffers, indices, strict=True):
            packed = buffer.index_select(0, index).div_(WORLD)
            buffer.zero_()
            buffer.index_copy_(0, index, packed)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.005, 0.02])
    parser.add_argument("--width", type=int, default=WIDTH, help="layer width (4096: ~100M parameters)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.rank, args.init, args.out, args.ratios, args.rounds, args.steps, args.width)
        return
    started = time.perf_counter()
    run(print, ratios=tuple(args.ratios), rounds=args.rounds, steps=args.steps, width=args.width)
    print(f"\n(took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
