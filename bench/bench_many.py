"""Per-tensor overhead: 20,000 small tensors against one tensor of the same total size (issue 9, item 14).

Both states hold the same values (the one tensor is the small ones end to end), the same 5% mask
and the same moves, so every difference between the two columns is the cost of having many
tensors. safetensors and torch.save of the dense state are timed in the same rounds.

Usage: python bench/bench_many.py [--tensors 20000] [--size 16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fsync_file, interleaved, table

from fishckpt import CheckpointStore, Mask, OutsideMaskWarning


def _states(tensors: int, size: int) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Mask], dict[str, dict]]:
    generator = torch.Generator().manual_seed(0)
    flat = torch.randn(tensors * size, generator=generator) * 0.02
    chosen = torch.rand(flat.numel(), generator=generator) < 0.05
    moved_flat = flat.clone()
    moved_flat[chosen] += 1e-4 * torch.randn(int(chosen.sum()), generator=generator)
    many = {f"experts.{i}.w": flat[i * size : (i + 1) * size].clone() for i in range(tensors)}
    many_moved = {f"experts.{i}.w": moved_flat[i * size : (i + 1) * size].clone() for i in range(tensors)}
    masks = {
        "one": Mask.from_bool({"w": chosen}),
        "many": Mask.from_bool({f"experts.{i}.w": chosen[i * size : (i + 1) * size] for i in range(tensors)}),
    }
    return {"one": {"w": flat}, "many": many}, masks, {"one": {"w": moved_flat}, "many": many_moved}


def run(report: Callable[[str], None], *, tensors: int = 20_000, size: int = 16, rounds: int = 5) -> dict[str, float]:
    warnings.simplefilter("ignore", OutsideMaskWarning)
    bases, masks, moved = _states(tensors, size)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=".") as scratch:
        work = Path(scratch)
        stores = {kind: CheckpointStore.create(work / kind, bases[kind], masks[kind]) for kind in bases}
        for kind, store in stores.items():
            store.save(moved[kind], 1)
            store.load(1)  # warm: the first save and load build the store object's tables
        counter = [1]

        def save(kind: str, check: bool) -> Callable[[int], object]:
            def once(_: int) -> object:
                counter[0] += 1
                return stores[kind].save(moved[kind], counter[0], check_outside_mask=check)

            return once

        def dense_save(kind: str, how: str) -> Callable[[int], object]:
            path = work / f"dense-{kind}.{how}"

            def once(_: int) -> object:
                if how == "safetensors":
                    save_file(moved[kind], path)
                else:
                    torch.save(moved[kind], path)
                fsync_file(path)
                return None

            return once

        runs: dict[str, Callable[[int], object]] = {}
        for kind in ("one", "many"):
            runs[f"fishckpt save, exact check ({kind})"] = save(kind, True)
            runs[f"fishckpt save, fast path ({kind})"] = save(kind, False)
            runs[f"fishckpt load, verified ({kind})"] = lambda _, kind=kind: stores[kind].load(1)
            runs[f"fishckpt load, unverified ({kind})"] = lambda _, kind=kind: stores[kind].load(1, verify=False)
            runs[f"safetensors save_file + fsync ({kind})"] = dense_save(kind, "safetensors")
            runs[f"torch.save + fsync ({kind})"] = dense_save(kind, "pt")
            # What any load returning independent tensors pays before reading a byte.
            specs = [(tuple(tensor.shape), tensor.dtype) for tensor in bases[kind].values()]
            runs[f"torch.empty of each tensor ({kind})"] = lambda _, specs=specs: [
                torch.empty(*shape, dtype=dtype) for shape, dtype in specs
            ]
        timed = interleaved(rounds, runs)
        for kind in ("one", "many"):
            runs_load: dict[str, Callable[[int], object]] = {
                f"safetensors load_file ({kind})": lambda _, kind=kind: load_file(work / f"dense-{kind}.safetensors"),
                f"torch.load ({kind})": lambda _, kind=kind: torch.load(work / f"dense-{kind}.pt", weights_only=True),
            }
            timed.update(interleaved(rounds, runs_load))
        sizes = {kind: stores[kind].info(1).bytes for kind in stores}
    rows = []
    names = sorted({name.rsplit(" (", 1)[0] for name in timed}, key=lambda n: list(timed).index(f"{n} (one)"))
    for name in names:
        one, many = timed[f"{name} (one)"][0], timed[f"{name} (many)"][0]
        per_tensor = (many - one) / tensors * 1e6
        figures[name] = per_tensor
        rows.append([name, f"{one * 1e3:,.1f}", f"{many * 1e3:,.1f}", f"{per_tensor:,.2f}"])
    report(
        f"{tensors:,} tensors of {size} fp32 values against one tensor of {tensors * size:,}, a 5% mask "
        f"(k = {masks['one'].k:,}), best of {rounds} interleaved rounds:\n"
    )
    report(table(["operation", "1 tensor, ms", f"{tensors:,} tensors, ms", "extra per tensor, µs"], rows))
    k = masks["one"].k
    report(
        f"\nStep file: {sizes['one']:,} bytes ({sizes['one'] / k:.3f} per masked value) for one tensor, "
        f"{sizes['many']:,} bytes ({sizes['many'] / k:.3f} per masked value) for {tensors:,}: "
        f"{sizes['many'] / sizes['one']:.3f}x."
    )
    figures["bytes ratio"] = sizes["many"] / sizes["one"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    started = time.perf_counter()
    run(print, tensors=args.tensors, size=args.size, rounds=args.rounds)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
