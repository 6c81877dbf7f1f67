"""Commands over a store's saved steps: `ls` them, `rm` some, `prune` old ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from fishckpt import CheckpointInfo, CheckpointStore

from .._format import compression_ratio, echo_json, format_ratio, human_bytes, json_number, table, utc_iso
from .._options import STEP, json_option, store_argument
from .._progress import progress


def checkpoint_infos(store: CheckpointStore) -> list[CheckpointInfo]:
    """Every saved step's header, in step order."""
    saved = store.steps
    return [store.info(step) for step in progress(saved, description="reading", unit="step", total=len(saved))]


def _message(info: CheckpointInfo) -> str | None:
    message = info.metadata.get("message")
    return None if message is None else str(message)


@click.command()
@store_argument
@json_option
def ls(store_path: Path, as_json: bool) -> None:
    """List the checkpoints saved in STORE, one row per step.

    Columns: step, time saved (UTC), bytes on disk, ratio to the dense size,
    entries changed outside the mask, and the message given to `save`.
    """
    store = CheckpointStore.open(store_path)
    infos = checkpoint_infos(store)
    if as_json:
        echo_json(
            {
                "store": str(store.path),
                "dense_bytes": store.dense_bytes,
                "k": store.mask.k,
                "checkpoints": [_info_json(info) for info in infos],
            }
        )
        return
    if not infos:
        click.echo(f"{store.path}: no checkpoints saved yet (add one with `fishckpt save`).")
        return
    rows = [
        [
            str(info.step),
            utc_iso(info.created),
            human_bytes(info.bytes),
            format_ratio(compression_ratio(info.dense_bytes, info.bytes)),
            f"{sum(info.changed_outside_mask.values()):,}",
            _message(info) or "",
        ]
        for info in infos
    ]
    headers = ["STEP", "TIME (UTC)", "BYTES", "RATIO", "OUTSIDE MASK", "MESSAGE"]
    click.echo(table(headers, rows, right=[True, False, True, True, True, False]))


def _info_json(info: CheckpointInfo) -> dict[str, Any]:
    return {
        "step": info.step,
        "created": utc_iso(info.created),
        "created_unix": info.created,
        "bytes": info.bytes,
        "dense_bytes": info.dense_bytes,
        "ratio": json_number(compression_ratio(info.dense_bytes, info.bytes)),
        "changed_outside_mask": sum(info.changed_outside_mask.values()),
        "changed_outside_mask_by_tensor": dict(info.changed_outside_mask),
        "message": _message(info),
        "metadata": info.metadata,
    }


@click.command()
@store_argument
@click.argument("steps", metavar="STEP...", nargs=-1, required=True, type=STEP)
def rm(store_path: Path, steps: tuple[int, ...]) -> None:
    """Delete the checkpoints STEP... from STORE.

    Other steps never depend on a deleted one. If any STEP is not saved,
    nothing is deleted.
    """
    store = CheckpointStore.open(store_path)
    saved = set(store.steps)
    missing = [step for step in steps if step not in saved]
    if missing:
        raise click.ClickException(
            f"{store.path}: step(s) {_listing(missing)} not in the store (saved: {_listing(sorted(saved))}); "
            "nothing was deleted"
        )
    for step in dict.fromkeys(steps):
        store.delete(step)
    click.echo(f"Deleted step(s) {_listing(list(dict.fromkeys(steps)))} from {store.path}.")


@click.command()
@store_argument
@click.option("--keep-last", type=click.IntRange(min=1), required=True, help="How many of the latest steps to keep.")
@click.option("--dry-run", is_flag=True, help="Only say what would be deleted.")
def prune(store_path: Path, keep_last: int, dry_run: bool) -> None:
    """Delete all but the last N checkpoints of STORE (by step number).

    The base and the mask are kept. Use `--dry-run` to see what would go.
    """
    store = CheckpointStore.open(store_path)
    saved = store.steps
    doomed = saved[: max(0, len(saved) - keep_last)]
    kept = saved[len(doomed) :]
    if not doomed:
        click.echo(f"Nothing to delete: {store.path} has {len(saved)} step(s), keeping the last {keep_last}.")
        return
    if dry_run:
        click.echo(f"Would delete step(s) {_listing(doomed)}; would keep {_listing(kept)}.")
        return
    for step in progress(doomed, description="deleting", unit="step", total=len(doomed)):
        store.delete(step)
    click.echo(f"Deleted step(s) {_listing(doomed)}; kept {_listing(kept)}.")


def _listing(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if steps else "none"
