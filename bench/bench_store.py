"""Store benchmark (issue 2): fishckpt against dense saves and the FISH reference format, one run."""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_of, fsync_file, interleaved, mib, table

import fishckpt
from fishckpt import CheckpointStore, Mask
from fishckpt.store import native as _scan


def synthetic_model(hidden: int, layers: int, seed: int) -> dict[str, torch.Tensor]:
    """A transformer-like fp32 state: two large linear weights per layer, biases and norms, N(0, 0.02)."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        prefix = f"layers.{layer}"
        state[f"{prefix}.ff_in.weight"] = torch.randn(4 * hidden, hidden, generator=generator) * 0.02
        state[f"{prefix}.ff_in.bias"] = torch.randn(4 * hidden, generator=generator) * 0.02
        state[f"{prefix}.ff_out.weight"] = torch.randn(hidden, 4 * hidden, generator=generator) * 0.02
        state[f"{prefix}.ff_out.bias"] = torch.randn(hidden, generator=generator) * 0.02
        state[f"{prefix}.norm.weight"] = torch.ones(hidden)
        state[f"{prefix}.norm.bias"] = torch.zeros(hidden)
    return state


def random_mask(state: dict[str, torch.Tensor], keep_ratio: float, seed: int) -> Mask:
    generator = torch.Generator().manual_seed(seed)
    return Mask.from_bool({name: torch.rand(t.shape, generator=generator) < keep_ratio for name, t in state.items()})


def random_walk(
    state: dict[str, torch.Tensor], mask: Mask, steps: int, lr: float, seed: int
) -> dict[str, torch.Tensor]:
    """Each masked value moves by lr * sqrt(steps) * N(0, 1): a random walk of Adam-sized steps."""
    generator = torch.Generator().manual_seed(seed)
    out = {name: t.clone() for name, t in state.items()}
    for name in mask:
        flat = out[name].view(-1)
        index = mask[name]
        flat[index] += lr * math.sqrt(steps) * torch.randn(index.numel(), generator=generator)
    return out


def _timed_rows(
    base: dict[str, torch.Tensor],
    tuned: dict[str, torch.Tensor],
    other: dict[str, torch.Tensor],
    mask: Mask,
    work: Path,
    repeats: int,
) -> tuple[list[list[str]], dict[str, float]]:
    dense = sum(t.numel() * t.element_size() for t in base.values())
    k = mask.k
    rows: list[list[str]] = []
    figures: dict[str, float] = {}

    def add(label: str, size: int, save: tuple[float, int], restore: tuple[float, int] | None, key: str) -> None:
        figures[f"{key}.bytes"] = size
        figures[f"{key}.save"] = save[0]
        figures[f"{key}.restore"] = restore[0] if restore else float("nan")
        rows.append(
            [
                label,
                f"{size:,}",
                f"{size / k:.3f}",
                f"{save[0] * 1e3:,.1f}",
                f"{restore[0] * 1e3:,.1f}" if restore else "-",
                mib(save[1]),
                mib(restore[1]) if restore else "-",
            ]
        )

    # Every method's files and stores are set up first, then all saves are timed round by
    # round, then all restores, so that the methods share the machine's slow and quiet spells.
    path_a, path_b, path_c = work / "dense.safetensors", work / "dense.pt", work / "fish_reference.pt"
    base_file = work / "base_for_c.safetensors"  # (c) restores from the dense base plus its sparse file
    save_file(base, base_file)
    fsync_file(base_file)
    store = CheckpointStore.create(work / "store", base, mask)

    def save_a(_: int) -> None:  # (a) safetensors
        path_a.unlink(missing_ok=True)
        save_file(tuned, path_a)
        fsync_file(path_a)

    def save_b(_: int) -> None:  # (b) torch.save
        torch.save(tuned, path_b)
        fsync_file(path_b)

    def save_c(_: int) -> None:  # (c) the FISH reference code's format: pickled {pos: int32, weight} per tensor
        sparse = {
            name: {"pos": mask[name].to(torch.int32), "weight": tuned[name].reshape(-1)[mask[name]]}
            for name in mask
            if mask[name].numel()
        }
        torch.save(sparse, path_c)
        fsync_file(path_c)

    def save_d_torch(_: int) -> None:  # the exact save where the C extension is not built
        with mock.patch.object(_scan, "module", None):
            store.save(tuned, 1, overwrite=True)

    saves: dict[str, Callable[[int], object]] = {
        "a": save_a,
        "b": save_b,
        "c": save_c,
        "d": lambda _: store.save(tuned, 1, overwrite=True),
        "dfast": lambda _: store.save(tuned, 2, overwrite=True, check_outside_mask=False),
    }
    if _scan.available():
        saves["dtorch"] = save_d_torch
    saved = interleaved(repeats, saves)

    def restore_c(_: int) -> dict[str, torch.Tensor]:
        state = {name: t.clone() for name, t in load_file(base_file).items()}
        for name, record in torch.load(path_c, weights_only=True).items():
            state[name].view(-1)[record["pos"].long()] = record["weight"]
        return state

    restored = interleaved(
        repeats,
        {
            "a": lambda _: {name: t.clone() for name, t in load_file(path_a).items()},  # verifies nothing
            "b": lambda _: torch.load(path_b, weights_only=True),
            "c": restore_c,
            "d": lambda _: store.load(1),
            "dfast": lambda _: store.load(2, verify=False),
        },
    )
    add("(a) safetensors.save_file + fsync", path_a.stat().st_size, saved["a"], restored["a"], "a")
    add("(b) torch.save + fsync", path_b.stat().st_size, saved["b"], restored["b"], "b")
    add("(c) FISH reference: torch.save {pos, weight}", path_c.stat().st_size, saved["c"], restored["c"], "c")
    d_bytes = store.info(1).bytes
    add("(d) fishckpt save (exact check) / load (verified)", d_bytes, saved["d"], restored["d"], "d")
    if "dtorch" in saved:
        add("(d) fishckpt save (exact check), pure-Python scan", d_bytes, saved["dtorch"], None, "dtorch")
    fast_bytes = store.info(2).bytes
    add("(d) fishckpt save (fast path) / load (verify=False)", fast_bytes, saved["dfast"], restored["dfast"], "dfast")

    # switching a live state between two steps in place
    store.save(other, 3)
    target = store.load(1)
    store.load_into(target, 3)  # first call: full write; later calls: O(k)

    def switch(i: int) -> None:
        store.load_into(target, 1 if i % 2 == 0 else 3)

    sw = best_of(max(repeats, 4), switch)
    figures["switch"] = sw[0]
    rows.append(
        ["(d) fishckpt load_into, switch between two steps", "-", "-", "-", f"{sw[0] * 1e3:,.1f}", "-", mib(sw[1])]
    )
    store.verify()
    shutil.rmtree(work / "store")
    figures["dense"] = dense
    return rows, figures


SENTENCES = [
    "The checkpoint was restored bit for bit.",
    "Only a small fraction of the weights is trained.",
    "Fisher information tells which parameters matter for the task.",
    "A random mask of the same size does clearly worse.",
    "The base model is stored once and never changes.",
    "Sparse updates make distributed training cheaper.",
    "This sentence is about nothing in particular.",
    "Checkpoints should be small, fast and safe.",
]


def minilm_states(
    steps: int, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor], Mask]:
    """Real all-MiniLM-L6-v2 weights, a random 0.5% mask, and the states after steps/2 and steps of masked AdamW."""
    from bench_method import minilm_classifier  # which puts experiments/ on the path for this one:
    from minilm import minilm_tokenizer

    model = minilm_classifier(num_labels=2, seed=seed)
    tokenizer = minilm_tokenizer()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    batch["labels"] = torch.tensor([i % 2 for i in range(len(SENTENCES))])
    base = {name: t.detach().clone() for name, t in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed + 1)
    mask = Mask.from_bool(
        {name: torch.rand(p.shape, generator=generator) < 0.005 for name, p in model.named_parameters()}
    )
    optimizer = fishckpt.SparseAdamW(model, mask, lr=1e-4, weight_decay=0.01)
    model.train()
    halfway: dict[str, torch.Tensor] = {}
    for step in range(1, steps + 1):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == steps // 2:
            halfway = {name: t.detach().clone() for name, t in model.state_dict().items()}
    tuned = {name: t.detach().clone() for name, t in model.state_dict().items()}
    return base, tuned, halfway, mask


def run(report: Callable[[str], None], *, hidden: int = 1664, layers: int = 12, repeats: int = 5) -> dict[str, float]:
    """Runs the synthetic workload and the real MiniLM workload; reports markdown tables."""
    warnings.simplefilter("ignore", fishckpt.OutsideMaskWarning)
    torch.manual_seed(0)
    base = synthetic_model(hidden, layers, seed=0)
    numel = sum(t.numel() for t in base.values())
    mask = random_mask(base, 0.005, seed=1)
    tuned = random_walk(base, mask, steps=30, lr=1e-4, seed=2)
    other = random_walk(base, mask, steps=30, lr=1e-4, seed=3)
    scan = "C extension" if _scan.available() else "pure Python (the C extension was not built)"
    report(f"\nExact-check scan in use: {scan}")
    report(
        f"\n### Synthetic model: {numel / 1e6:.1f}M fp32 parameters in {len(base)} tensors "
        f"({mib(numel * 4)}), random mask k = {mask.k:,} ({mask.density:.2%})\n"
    )
    with tempfile.TemporaryDirectory(dir=".") as scratch:
        rows, figures = _timed_rows(base, tuned, other, mask, Path(scratch), repeats)
    headers = [
        "method",
        "bytes",
        "bytes / masked value",
        "save ms",
        "restore ms",
        "save peak RSS +",
        "restore peak RSS +",
    ]
    report(table(headers, rows))
    a = figures
    ratios = [
        ["bytes per masked value (d)", f"{a['d.bytes'] / mask.k:.3f}", "<= 2.8"],
        ["dense (a) bytes / (d) bytes", f"{a['a.bytes'] / a['d.bytes']:.0f}x", ">= 285x"],
        ["save speed-up, exact check: (a) / (d)", f"{a['a.save'] / a['d.save']:.1f}x", ">= 8x"],
        *(
            [["save speed-up, exact check, pure-Python scan: (a) / (d)", f"{a['a.save'] / a['dtorch.save']:.1f}x", "-"]]
            if "dtorch.save" in a
            else []
        ),
        ["save speed-up, fast path: (a) / (d fast)", f"{a['a.save'] / a['dfast.save']:.1f}x", ">= 25x"],
        ["verified load / (a) unverified load+copy", f"{a['d.restore'] / a['a.restore']:.2f}x", "<= 1.5x"],
        ["unverified load / (a) load+copy", f"{a['dfast.restore'] / a['a.restore']:.2f}x", "<= 1.1x"],
        ["switch speed-up: verified load / load_into switch", f"{a['d.restore'] / a['switch']:.1f}x", ">= 15x"],
    ]
    report("\n" + table(["ratio (same run)", "measured", "target"], ratios))

    base, tuned, halfway, mask = minilm_states(steps=30, seed=0)
    numel = sum(t.numel() for t in base.values())
    report(
        f"\n### Real model: all-MiniLM-L6-v2 + 2-way head, {numel / 1e6:.1f}M parameters in {len(base)} tensors, "
        f"random mask k = {mask.k:,} ({mask.density:.2%}), 30 steps of SparseAdamW at lr 1e-4 on 8 sentences\n"
    )
    with tempfile.TemporaryDirectory(dir=".") as scratch:
        rows, real = _timed_rows(base, tuned, halfway, mask, Path(scratch), repeats)
    report(table(headers, rows))
    report(
        f"\nbytes per masked value {real['d.bytes'] / mask.k:.3f}; dense / fishckpt bytes "
        f"{real['a.bytes'] / real['d.bytes']:.0f}x; save speed-up (exact) {real['a.save'] / real['d.save']:.1f}x, "
        f"(fast path) {real['a.save'] / real['dfast.save']:.1f}x"
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=1664, help="model width (1664 gives ~1 GiB)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    started = time.perf_counter()
    run(print, hidden=args.hidden, layers=args.layers, repeats=args.repeats)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
