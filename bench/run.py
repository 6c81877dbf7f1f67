"""`make bench`: every benchmark in one run, printed as markdown tables."""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_ddp
import bench_loop
import bench_many
import bench_method
import bench_remote
import bench_sharded
import bench_store


def main() -> None:
    started = time.perf_counter()
    print(
        f"fishckpt benchmarks: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}, Python {platform.python_version()}"
    )
    print("\n## Store (issue: sparse checkpoint store)")
    bench_store.run(print)
    print("\n## In the training loop (issue 10)")
    bench_loop.run(print)
    print("\n## Many tensors (issue 9)")
    bench_many.run(print)
    print("\n## Remote stores (issue 13)")
    bench_remote.run(print)
    print("\n## Method (issue: FISH masks and masked training)")
    bench_method.run(print)
    print("\n## Distributed (issue 12)")
    bench_ddp.run(print)
    print("\n## Sharded checkpoints (issue 12)")
    bench_sharded.run(print)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
