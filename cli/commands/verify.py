"""The `verify` command: re-read a store's files and check every digest."""

from __future__ import annotations

from pathlib import Path

import click

from fishckpt import CheckpointStore, VerifyError, VerifyFailure

from .._format import echo_json
from .._options import STEP, json_option, store_argument
from .._progress import progress


@click.command()
@store_argument
@click.argument("steps", metavar="[STEP...]", nargs=-1, type=STEP)
@json_option
def verify(store_path: Path, steps: tuple[int, ...], as_json: bool) -> None:
    """Check STORE's files against their digests; exit 0 only if everything verifies.

    Without STEP, the base and every saved step are re-read and every hash is
    checked. With STEP..., only those checkpoints are (the base bytes are
    hashed in the run without STEP). Each failing file and tensor is named;
    the exit status is then 1.
    """
    store = CheckpointStore.open(store_path)
    failures: list[VerifyFailure] = []
    checked = list(dict.fromkeys(steps)) if steps else store.steps
    if steps:
        for step in progress(checked, description="verifying", unit="step", total=len(checked)):
            try:
                store.verify(step)
            except VerifyError as error:
                failures.extend(error.failures)
    else:
        try:
            store.verify()
        except VerifyError as error:
            failures.extend(error.failures)
    if as_json:
        echo_json(
            {
                "store": str(store.path),
                "ok": not failures,
                "base_checked": not steps,
                "steps_checked": checked,
                "failures": [
                    {"file": str(failure.file), "tensor": failure.tensor, "problem": failure.problem}
                    for failure in failures
                ],
            }
        )
    if failures:
        listing = "" if as_json else "\n" + "\n".join(f"  {failure}" for failure in failures)
        raise click.ClickException(
            f"{store.path}: {len(failures)} integrity problem(s){listing}\n"
            "Restore the damaged files from a copy, or delete damaged steps with `fishckpt rm STORE STEP`."
        )
    if not as_json:
        what = "the base and " if not steps else ""
        click.echo(f"OK: {what}{len(checked)} checkpoint(s) of {store.path} verified.")
