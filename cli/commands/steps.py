"""Commands over a store's saved steps: `ls` them, `rm` some, `prune` old ones."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from fishckpt import Catalog

from .._format import compression_ratio, echo_json, format_ratio, human_bytes, json_safe, table, utc_iso
from .._options import STEP, StoreLocation, json_option, store_argument, store_options, wait_option
from .._progress import progress

if TYPE_CHECKING:
    from fishckpt import CheckpointInfo, StoreReport


def read_steps(catalog: Catalog) -> StoreReport:
    """Every saved step's header, in step order, with a progress bar on a terminal; damaged ones in ``problems``."""
    saved = catalog.steps
    return catalog.report(steps=progress(saved, description="reading", unit="step", total=len(saved)))


def fail_on_problems(summary: StoreReport) -> None:
    """Exit 1 naming each damaged step, after everything else was shown."""
    if summary.problems:
        lines = "\n".join(f"  step {step}: {problem}" for step, problem in sorted(summary.problems.items()))
        raise click.ClickException(
            f"{summary.location}: {len(summary.problems)} step file(s) cannot be read:\n{lines}\n"
            "Restore them from a copy, or delete them with `fishckpt rm`; the other steps are fine."
        )


def _message(info: CheckpointInfo) -> str | None:
    message = info.metadata.get("message")
    return None if message is None else str(message)


@click.command()
@store_argument
@json_option
@store_options
def ls(store: StoreLocation, as_json: bool) -> None:
    """List the checkpoints saved in STORE, one row per step.

    Columns: step, time saved (UTC), bytes on disk, ratio to the dense size,
    entries changed outside the mask, and the message given to `save`. A step
    whose file is damaged is listed as such (and the exit status is then 1).
    """
    catalog = store.catalog()
    summary = read_steps(catalog)
    if as_json:
        echo_json(
            {
                "store": catalog.location,
                "dense_bytes": catalog.dense_bytes,
                "k": catalog.k,
                "checkpoints": [_info_json(info) for info in summary.steps],
                "damaged": [{"step": step, "problem": problem} for step, problem in sorted(summary.problems.items())],
            }
        )
        fail_on_problems(summary)
        return
    if not summary.steps and not summary.problems:
        click.echo(f"{catalog.location}: no checkpoints saved yet (add one with `fishckpt save`).")
        return
    rows = [
        [
            str(info.step),
            utc_iso(info.created),
            human_bytes(info.bytes),
            format_ratio(compression_ratio(info.dense_bytes, info.bytes)),
            f"{info.outside_mask_total:,}",
            _message(info) or "",
        ]
        for info in summary.steps
    ]
    rows += [[str(step), "DAMAGED", "-", "-", "-", "cannot be read (see below)"] for step in summary.problems]
    rows.sort(key=lambda row: int(row[0]))
    headers = ["STEP", "TIME (UTC)", "BYTES", "RATIO", "OUTSIDE MASK", "MESSAGE"]
    click.echo(table(headers, rows, right=[True, False, True, True, True, False]))
    fail_on_problems(summary)


def _info_json(info: CheckpointInfo) -> dict[str, Any]:
    return {
        "step": info.step,
        "created": utc_iso(info.created),
        "created_unix": info.created,
        "bytes": info.bytes,
        "dense_bytes": info.dense_bytes,
        "ratio": json_safe(compression_ratio(info.dense_bytes, info.bytes)),
        "changed_outside_mask": info.outside_mask_total,
        "changed_outside_mask_by_tensor": dict(info.changed_outside_mask),
        "message": _message(info),
        "metadata": json_safe(info.metadata),
    }


@click.command()
@store_argument
@click.argument("steps", metavar="STEP...", nargs=-1, required=True, type=STEP)
@wait_option
@store_options
def rm(store: StoreLocation, steps: tuple[int, ...], wait: float) -> None:
    """Delete the checkpoints STEP... from STORE.

    Other steps never depend on a deleted one. If any STEP is not saved,
    nothing is deleted.
    """
    opened = store.open(lock_timeout=wait)
    saved = set(opened.steps)
    missing = [step for step in steps if step not in saved]
    if missing:
        raise click.ClickException(
            f"{opened.location}: step(s) {_listing(missing)} not in the store (saved: {_listing(sorted(saved))}); "
            "nothing was deleted"
        )
    for step in dict.fromkeys(steps):
        opened.delete(step)
    click.echo(f"Deleted step(s) {_listing(list(dict.fromkeys(steps)))} from {opened.location}.")


@click.command()
@store_argument
@click.option("--keep-last", type=click.IntRange(min=1), required=True, help="How many of the latest steps to keep.")
@click.option("--dry-run", is_flag=True, help="Only say what would be deleted.")
@wait_option
@store_options
def prune(store: StoreLocation, keep_last: int, dry_run: bool, wait: float) -> None:
    """Delete all but the last N checkpoints of STORE (by step number).

    The base and the mask are kept. Use `--dry-run` to see what would go.
    """
    opened = store.open(lock_timeout=wait)
    saved = opened.steps
    doomed = saved[: max(0, len(saved) - keep_last)]
    kept = saved[len(doomed) :]
    if not doomed:
        click.echo(f"Nothing to delete: {opened.location} has {len(saved)} step(s), keeping the last {keep_last}.")
        return
    if dry_run:
        click.echo(f"Would delete step(s) {_listing(doomed)}; would keep {_listing(kept)}.")
        return
    for step in progress(doomed, description="deleting", unit="step", total=len(doomed)):
        opened.delete(step)
    click.echo(f"Deleted step(s) {_listing(doomed)}; kept {_listing(kept)}.")


def _listing(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if steps else "none"
