"""The `report` command: where a store's bytes go, and how it compares with dense checkpoints."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any

import click

from fishckpt import CheckpointInfo, CheckpointStore
from fishckpt._io import atomic_write

from .._format import (
    compression_ratio,
    echo_json,
    format_ratio,
    human_bytes,
    json_number,
    smaller_or_larger,
    table,
)
from .._options import PATH, check_output, json_option, store_argument
from .steps import checkpoint_infos

TOP_TENSORS = 10
PLOT_NEEDS = "--plot needs matplotlib: pip install 'fishckpt[plot]'"


@click.command()
@store_argument
@json_option
@click.option("--plot", type=PATH, help="Also write a PNG chart of checkpoint size per step against dense.")
@click.option("--force", is_flag=True, help="Replace the --plot file if it exists.")
def report(store_path: Path, as_json: bool, plot: Path | None, force: bool) -> None:
    """Summarise where STORE's bytes go and how it compares with dense checkpoints.

    Shows the base, mask and per-checkpoint sizes, bytes per masked value, the
    compression ratio, the whole store against the same steps saved densely,
    and the tensors with the most changes outside the mask.
    """
    if plot is not None:
        _require_matplotlib()
        check_output(plot, force=force)
    store = CheckpointStore.open(store_path)
    infos = checkpoint_infos(store)
    summary = _summary(store, infos)
    if plot is not None:
        atomic_write(plot, [_chart_png(store, infos)], overwrite=force)
        summary["plot"] = str(plot)
    if as_json:
        echo_json(summary)
    else:
        _print_summary(store, infos, summary)


def _summary(store: CheckpointStore, infos: list[CheckpointInfo]) -> dict[str, Any]:
    mask = store.mask
    files = {
        "base_bytes": store.files()["base"].stat().st_size,
        "mask_bytes": store.files()["mask"].stat().st_size,
        "manifest_bytes": store.files()["manifest"].stat().st_size,
        "checkpoint_bytes": sum(info.bytes for info in infos),
        "training_state_bytes": sum(info.training_state_bytes for info in infos),
        "total_bytes": sum(entry.stat().st_size for entry in store.path.rglob("*") if entry.is_file()),
    }
    dense_equivalent = len(infos) * store.dense_bytes
    values = mask.k * len(infos)
    outside: Counter[str] = Counter()
    outside_steps: Counter[str] = Counter()
    for info in infos:
        outside.update(info.changed_outside_mask)
        outside_steps.update(info.changed_outside_mask.keys())
    return {
        "store": str(store.path),
        "tensors": len(store.tensor_names),
        "dense_bytes": store.dense_bytes,
        "mask": {"k": mask.k, "numel": mask.numel, "density": mask.density},
        "files": files,
        "checkpoints": [
            {
                "step": info.step,
                "bytes": info.bytes,
                "ratio": json_number(compression_ratio(info.dense_bytes, info.bytes)),
                "training_state_bytes": info.training_state_bytes,
                # optimizer/RNG state is reported apart: this is the model's cost per value
                "bytes_per_masked_value": (info.bytes - info.training_state_bytes) / mask.k if mask.k else None,
                "changed_outside_mask": sum(info.changed_outside_mask.values()),
            }
            for info in infos
        ],
        "bytes_per_masked_value": (files["checkpoint_bytes"] - files["training_state_bytes"]) / values
        if values
        else None,
        "compression_ratio": json_number(compression_ratio(dense_equivalent, files["checkpoint_bytes"]))
        if infos
        else None,
        "dense_equivalent_bytes": dense_equivalent,
        "store_vs_dense_ratio": dense_equivalent / files["total_bytes"] if infos else None,
        "outside_mask_top": [
            {"tensor": name, "entries": entries, "steps": outside_steps[name]}
            for name, entries in sorted(outside.items(), key=lambda item: (-item[1], item[0]))[:TOP_TENSORS]
        ],
        "plot": None,
    }


def _print_summary(store: CheckpointStore, infos: list[CheckpointInfo], summary: dict[str, Any]) -> None:
    files, mask = summary["files"], summary["mask"]
    click.echo(f"Store {store.path}: {summary['tensors']} tensors, {human_bytes(store.dense_bytes)} dense")
    click.echo(f"  base         {human_bytes(files['base_bytes'])}")
    click.echo(
        f"  mask         {human_bytes(files['mask_bytes'])} (k = {mask['k']:,} of {mask['numel']:,} "
        f"entries, {mask['density']:.2%})"
    )
    training = files["training_state_bytes"]
    click.echo(
        f"  checkpoints  {human_bytes(files['checkpoint_bytes'])} in {len(infos)} step(s)"
        + (f", of which {human_bytes(training)} optimizer/RNG state" if training else "")
    )
    if not infos:
        click.echo(f"  total        {human_bytes(files['total_bytes'])}; no checkpoints saved yet.")
        return
    click.echo(
        f"  total        {human_bytes(files['total_bytes'])} on disk vs "
        f"{human_bytes(summary['dense_equivalent_bytes'])} for the same {len(infos)} step(s) saved densely "
        f"({smaller_or_larger(summary['store_vs_dense_ratio'])})"
    )
    per_value = summary["bytes_per_masked_value"]
    click.echo(
        "Checkpoints: "
        f"{smaller_or_larger(compression_ratio(summary['dense_equivalent_bytes'], files['checkpoint_bytes']))} "
        "than dense" + (f", {per_value:.2f} bytes per masked value (model only)." if per_value is not None else ".")
    )
    rows = [
        [
            str(row["step"]),
            human_bytes(row["bytes"]),
            format_ratio(compression_ratio(store.dense_bytes, row["bytes"])),
            "-" if row["bytes_per_masked_value"] is None else f"{row['bytes_per_masked_value']:.2f}",
            f"{row['changed_outside_mask']:,}",
        ]
        for row in summary["checkpoints"]
    ]
    click.echo(table(["STEP", "BYTES", "RATIO", "BYTES/VALUE", "OUTSIDE MASK"], rows, right=[True] * 5))
    if summary["outside_mask_top"]:
        click.echo("Tensors with the most changes outside the mask:")
        click.echo(
            table(
                ["TENSOR", "ENTRIES", "STEPS"],
                [[row["tensor"], f"{row['entries']:,}", str(row["steps"])] for row in summary["outside_mask_top"]],
                right=[False, True, True],
            )
        )
    else:
        click.echo("No changes outside the mask in any step.")
    if summary["plot"] is not None:
        click.echo(f"Wrote the chart to {summary['plot']}.")


def _require_matplotlib() -> None:
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise click.ClickException(PLOT_NEEDS) from None


def _chart_png(store: CheckpointStore, infos: list[CheckpointInfo]) -> bytes:
    """Checkpoint bytes per step (log scale) with the dense size as a reference line."""
    # The object API, not pyplot: no global backend or figure state changes in the caller's process.
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    steps = [info.step for info in infos]
    axes.plot(steps, [info.bytes for info in infos], marker="o", label="fishckpt checkpoint")
    axes.axhline(store.dense_bytes, color="tab:red", linestyle="--", label="dense checkpoint")
    axes.set_yscale("log")
    size_labels = FuncFormatter(lambda value, _: human_bytes(int(value)))
    axes.yaxis.set_major_formatter(size_labels)
    axes.yaxis.set_minor_formatter(size_labels)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("step")
    axes.set_ylabel("bytes")
    axes.set_title(f"Checkpoint size per step: {store.path.name}")
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
