"""The `report` command: where a store's bytes go, and how it compares with dense checkpoints."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import click

from fishckpt import StoreReport

from .._format import echo_json, format_ratio, human_bytes, json_number, smaller_or_larger, table
from .._options import PATH, StoreLocation, check_output, json_option, store_argument, store_options, write_output
from .steps import fail_on_problems, read_steps

TOP_TENSORS = 10
PLOT_NEEDS = "--plot needs matplotlib: pip install 'fishckpt[plot]'"


@click.command()
@store_argument
@json_option
@click.option("--plot", type=PATH, help="Also write a PNG chart of checkpoint size per step against dense.")
@click.option("--force", is_flag=True, help="Replace the --plot file if it exists.")
@store_options
def report(store: StoreLocation, as_json: bool, plot: Path | None, force: bool) -> None:
    """Summarise where STORE's bytes go and how it compares with dense checkpoints.

    Shows the base, mask and per-checkpoint sizes, bytes per masked value, the
    compression ratio, the whole store against the same steps saved densely,
    and the tensors with the most changes outside the mask.
    """
    if plot is not None:
        _require_matplotlib()
        check_output(plot, force=force)
    summary = read_steps(store.catalog())
    if plot is not None:
        write_output(plot, _chart_png(summary), force=force)
    if as_json:
        echo_json(_json(summary, plot))
    else:
        _print_summary(summary, plot)
    fail_on_problems(summary)


def _json(summary: StoreReport, plot: Path | None) -> dict[str, Any]:
    return {
        "store": summary.location,
        "tensors": summary.tensors,
        "dense_bytes": summary.dense_bytes,
        "mask": {"k": summary.k, "numel": summary.numel, "density": summary.density},
        "files": {
            "base_bytes": summary.base_bytes,
            "mask_bytes": summary.mask_bytes,
            "manifest_bytes": summary.manifest_bytes,
            "checkpoint_bytes": summary.checkpoint_bytes,
            "training_state_bytes": summary.training_state_bytes,
            "total_bytes": summary.total_bytes,
        },
        "checkpoints": [
            {
                "step": info.step,
                "bytes": info.bytes,
                "ratio": json_number(info.compression_ratio),
                "training_state_bytes": info.training_state_bytes,
                # optimizer/RNG state is reported apart: this is the model's cost per value
                "bytes_per_masked_value": info.bytes_per_masked_value,
                "changed_outside_mask": info.outside_mask_total,
            }
            for info in summary.steps
        ],
        "bytes_per_masked_value": summary.bytes_per_masked_value,
        "compression_ratio": None if summary.compression_ratio is None else json_number(summary.compression_ratio),
        "dense_equivalent_bytes": summary.dense_equivalent_bytes,
        "store_vs_dense_ratio": summary.store_vs_dense_ratio,
        "outside_mask_top": [
            {"tensor": row.tensor, "entries": row.entries, "steps": row.steps}
            for row in summary.outside_mask_top(TOP_TENSORS)
        ],
        "plot": None if plot is None else str(plot),
        "damaged": [{"step": step, "problem": problem} for step, problem in sorted(summary.problems.items())],
    }


def _print_summary(summary: StoreReport, plot: Path | None) -> None:
    click.echo(f"Store {summary.location}: {summary.tensors} tensors, {human_bytes(summary.dense_bytes)} dense")
    click.echo(f"  base         {human_bytes(summary.base_bytes)}")
    click.echo(
        f"  mask         {human_bytes(summary.mask_bytes)} (k = {summary.k:,} of {summary.numel:,} "
        f"entries, {summary.density:.2%})"
    )
    training = summary.training_state_bytes
    click.echo(
        f"  checkpoints  {human_bytes(summary.checkpoint_bytes)} in {len(summary.steps)} step(s)"
        + (f", of which {human_bytes(training)} optimizer/RNG state" if training else "")
    )
    if not summary.steps:
        click.echo(f"  total        {human_bytes(summary.total_bytes)}; no checkpoints saved yet.")
        if plot is not None:
            click.echo(f"Wrote the chart to {plot}.")
        return
    click.echo(
        f"  total        {human_bytes(summary.total_bytes)} on disk vs "
        f"{human_bytes(summary.dense_equivalent_bytes)} for the same {len(summary.steps)} step(s) saved densely "
        f"({smaller_or_larger(summary.store_vs_dense_ratio or 0.0)})"
    )
    per_value = summary.bytes_per_masked_value
    click.echo(
        "Checkpoints: "
        f"{smaller_or_larger(summary.compression_ratio or 0.0)} "
        "than dense" + (f", {per_value:.2f} bytes per masked value (model only)." if per_value is not None else ".")
    )
    rows = [
        [
            str(info.step),
            human_bytes(info.bytes),
            format_ratio(info.compression_ratio),
            "-" if info.bytes_per_masked_value is None else f"{info.bytes_per_masked_value:.2f}",
            f"{info.outside_mask_total:,}",
        ]
        for info in summary.steps
    ]
    click.echo(table(["STEP", "BYTES", "RATIO", "BYTES/VALUE", "OUTSIDE MASK"], rows, right=[True] * 5))
    top = summary.outside_mask_top(TOP_TENSORS)
    if top:
        click.echo("Tensors with the most changes outside the mask:")
        click.echo(
            table(
                ["TENSOR", "ENTRIES", "STEPS"],
                [[row.tensor, f"{row.entries:,}", str(row.steps)] for row in top],
                right=[False, True, True],
            )
        )
    else:
        click.echo("No changes outside the mask in any step.")
    if plot is not None:
        click.echo(f"Wrote the chart to {plot}.")


def _require_matplotlib() -> None:
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise click.ClickException(PLOT_NEEDS) from None


def _chart_png(summary: StoreReport) -> bytes:
    """Checkpoint bytes per step (log scale) with the dense size as a reference line."""
    # The object API, not pyplot: no global backend or figure state changes in the caller's process.
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    steps = [info.step for info in summary.steps]
    axes.plot(steps, [info.bytes for info in summary.steps], marker="o", label="fishckpt checkpoint")
    axes.axhline(summary.dense_bytes, color="tab:red", linestyle="--", label="dense checkpoint")
    axes.set_yscale("log")
    # Labels on the major ticks only: minor ones (every 2x..9x on a log axis) pile up into a smear.
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: human_bytes(int(value))))
    axes.yaxis.set_minor_formatter(NullFormatter())
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("step")
    axes.set_ylabel("bytes")
    axes.set_title(f"Checkpoint size per step: {summary.location.rstrip('/').rsplit('/', 1)[-1]}")
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
