"""Timing, peak-memory and table helpers shared by the benchmarks."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE


@contextmanager
def peak_rss_growth() -> Iterator[list[int]]:
    """Samples RSS every millisecond; yields a list that receives the peak growth in bytes."""
    start = rss_bytes()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    result: list[int] = []
    try:
        yield result
    finally:
        done.set()
        thread.join()
        peak[0] = max(peak[0], rss_bytes())
        result.append(peak[0] - start)


def best_of(repeats: int, run: Callable[[int], T]) -> tuple[float, int, T]:  # repeats >= 1
    """Runs ``run(i)`` ``repeats`` times untimed by anything else, then once more under the RSS sampler.

    Returns (best seconds, peak RSS growth, last result). The sampler is a Python thread that
    would compete for the GIL, so timed runs go without it. Dirty pages are flushed before each
    run (untimed): on 2 cores, kernel writeback of an earlier gigabyte would otherwise be timed
    as part of a later run.
    """
    best = float("inf")
    for i in range(repeats):
        os.sync()
        start = time.perf_counter()
        result = run(i)
        best = min(best, time.perf_counter() - start)
    os.sync()
    with peak_rss_growth() as growth:
        result = run(repeats)
    return best, growth[0], result


def interleaved(rounds: int, runs: dict[str, Callable[[int], object]]) -> dict[str, tuple[float, int]]:
    """Best seconds and peak RSS growth of each run, timed round by round: every run once per round.

    On this shared VM whole stretches of time run slow (kernel reclaim, a busy
    neighbour). Timing all repeats of one method and then all of the next lets
    one method land in a slow stretch and another in a quiet one; interleaving
    gives every method the same stretches, so ratios compare like with like.
    Peak RSS comes from one more run of each under the sampler, as in ``best_of``.
    """
    best = dict.fromkeys(runs, float("inf"))
    for i in range(rounds):
        for name, run in runs.items():
            os.sync()
            start = time.perf_counter()
            run(i)
            best[name] = min(best[name], time.perf_counter() - start)
    out = {}
    for name, run in runs.items():
        os.sync()
        with peak_rss_growth() as growth:
            run(rounds)
        out[name] = (best[name], growth[0])
    return out


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join([line, rule, *body])


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"
