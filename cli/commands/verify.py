"""The `verify` command: re-read a store's files and check every digest."""

from __future__ import annotations

import click

from .._format import echo_json
from .._options import STEP, StoreLocation, json_option, store_argument, store_options
from .._progress import progress


@click.command()
@store_argument
@click.argument("steps", metavar="[STEP...]", nargs=-1, type=STEP)
@json_option
@store_options
def verify(store: StoreLocation, steps: tuple[int, ...], as_json: bool) -> None:
    """Check STORE's files against their digests; exit 0 only if everything verifies.

    Without STEP, every chunk of the base and every saved step are re-read and
    every digest is checked. With STEP..., only those steps are, and the base's
    values at the mask's indices (what they are coded against). The base is
    checked first: if it is damaged, it alone is blamed, never the steps. A step
    deleted while verify runs (a prune) is reported as gone, not as a failure.
    """
    from fishckpt import VerifyError, VerifyReport

    opened = store.open()
    wanted = list(dict.fromkeys(steps)) if steps else None

    def bar(items: list[int]) -> object:
        return progress(items, description="verifying", unit="step", total=len(items))

    try:
        report = opened.verify(wanted, progress=bar)
        failures = []
    except VerifyError as error:
        failures = error.failures
        assert isinstance(error.report, VerifyReport)
        report = error.report
    base_file = opened.files()["base"]
    base_failed = any(failure.file == base_file for failure in failures)
    steps_failed = any(failure.file != base_file for failure in failures)
    if as_json:
        echo_json(
            {
                "store": opened.location,
                "ok": not failures,
                "base_checked": report.base_checked,
                "base_ok": report.base_ok,
                "steps_checked": report.steps,
                "steps_gone": report.gone,
                "failures": [
                    {"file": str(failure.file), "tensor": failure.tensor, "problem": failure.problem}
                    for failure in failures
                ],
            }
        )
    gone = f" Step(s) {', '.join(map(str, report.gone))} were deleted while verifying (skipped)." if report.gone else ""
    if failures:
        listing = "" if as_json else "\n" + "\n".join(f"  {failure}" for failure in failures)
        advice = []
        if base_failed:
            advice.append(f"The base file is damaged: restore {base_file} from a copy.")
            if not steps_failed:
                advice.append("The step files are not to blame (their own checksums were checked): leave them.")
        if steps_failed:
            advice.append("Restore the damaged step files from a copy, or delete them with `fishckpt rm STORE STEP`.")
        raise click.ClickException(
            f"{opened.location}: {len(failures)} integrity problem(s){listing}\n" + "\n".join(advice) + gone
        )
    if not as_json:
        what = "the base and " if report.base_checked else ""
        click.echo(f"OK: {what}{len(report.steps)} checkpoint(s) of {opened.location} verified.{gone}")
