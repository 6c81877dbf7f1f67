"""The `mask` commands: describe a mask file, and make random or diff masks."""

from __future__ import annotations

import math
from pathlib import Path

import click

from .._format import echo_json, table
from .._options import PATH, STORE_LOCATION, StoreLocation, check_output, force_option, json_option, store_options

keep_ratio_option = click.option(
    "--keep-ratio",
    type=click.FloatRange(min=0.0, max=1.0),
    required=True,
    help="Fraction of all entries to keep (0 to 1).",
)
output_option = click.option("-o", "--output", "out", type=PATH, required=True, help="The mask file to write.")


@click.group()
def mask() -> None:
    """Inspect mask files and make baseline masks."""


@mask.command("info")
@click.argument("store_path", metavar="FILE", type=STORE_LOCATION)
@json_option
@store_options
def info_command(store: StoreLocation, as_json: bool) -> None:
    """Describe the mask in FILE: k, density and entries per tensor.

    FILE is anything `init --mask` accepts (a fishckpt mask, or safetensors or
    PyTorch bool/0-1 tensors), or a store, whose mask is shown: a store folder,
    or a store's URL (mask files are read from local paths only).
    """
    from fishckpt import Mask

    # A URL is always a store (Mask.load reads local files only); a local path is one when it is a folder.
    loaded = store.open().mask if store.is_url or Path(store.where).is_dir() else Mask.load(store.where)
    file = str(store)
    counts = loaded.counts()
    numels = {name: math.prod(loaded.shape(name)) for name in loaded.names}
    if as_json:
        tensors = [
            {
                "name": name,
                "shape": list(loaded.shape(name)),
                "k": counts[name],
                "numel": numels[name],
                "density": counts[name] / numels[name] if numels[name] else 0.0,
            }
            for name in loaded.names
        ]
        echo_json(
            {
                "file": str(file),
                "k": loaded.k,
                "numel": loaded.numel,
                "density": loaded.density,
                "digest": loaded.digest,
                "tensors": tensors,
            }
        )
        return
    click.echo(
        f"{file}: k = {loaded.k:,} of {loaded.numel:,} entries ({loaded.density:.4%}) in {len(loaded)} tensor(s)"
    )
    rows = [
        [
            name,
            "x".join(map(str, loaded.shape(name))) or "scalar",
            f"{counts[name]:,}",
            f"{numels[name]:,}",
            f"{counts[name] / numels[name]:.2%}" if numels[name] else "-",
        ]
        for name in loaded.names
    ]
    if rows:
        click.echo(table(["TENSOR", "SHAPE", "K", "OF", "DENSITY"], rows, right=[False, False, True, True, True]))


@mask.command("random")
@click.argument("base", type=PATH)
@keep_ratio_option
@click.option("--seed", type=int, required=True, help="Seed of the generator; the same seed gives the same mask.")
@output_option
@force_option
def random_command(base: Path, keep_ratio: float, seed: int, out: Path, force: bool) -> None:
    """Write a uniformly random mask over BASE's floating-point tensors.

    BASE is a safetensors or PyTorch checkpoint file. The same BASE, ratio and
    seed always give the same mask (the paper's random baseline).
    """
    check_output(out, force=force)
    from fishckpt import load_state_file, random_mask

    made = random_mask(load_state_file(base), keep_ratio, seed=seed)
    written = made.save(out, overwrite=force)
    click.echo(f"Wrote {out} ({written:,} bytes): random mask, k = {made.k:,} of {made.numel:,} ({made.density:.4%}).")


@mask.command("diff")
@click.argument("base", type=PATH)
@click.argument("tuned", type=PATH)
@keep_ratio_option
@output_option
@force_option
def diff_command(base: Path, tuned: Path, keep_ratio: float, out: Path, force: bool) -> None:
    """Write a mask of the entries that moved most from BASE to TUNED (largest |TUNED - BASE|).

    Both are checkpoint files of the same model. Entries whose bits did not
    change are never selected, so k can be smaller than asked for.
    """
    check_output(out, force=force)
    from fishckpt import diff_mask, load_state_file

    made = diff_mask(load_state_file(base), load_state_file(tuned), keep_ratio=keep_ratio)
    written = made.save(out, overwrite=force)
    click.echo(f"Wrote {out} ({written:,} bytes): diff mask, k = {made.k:,} of {made.numel:,} ({made.density:.4%}).")
