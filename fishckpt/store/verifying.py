"""``CheckpointStore.verify``: every file of a store re-read and every digest checked, the base first.

A damaged base is reported as the base's fault, never as the fault of the steps that fail
against it, and a step deleted while this runs (pruned meanwhile) is reported as gone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import BaseMismatchError, FormatError, IntegrityError, StepNotFoundError, VerifyError, VerifyFailure
from ..format.names import BASE_NAME
from . import stepcodec
from .catalog import Catalog
from .layout import StoreLayout
from .records import VerifyReport


def verify(
    layout: StoreLayout,
    catalog: Catalog,
    numbers: list[int],
    *,
    whole_base: bool,
    progress: Any,
    decode: Callable[..., stepcodec.Decoded],
    blame_base: Callable[[], None],
) -> VerifyReport:
    """Checks the base (every chunk if ``whole_base``, its masked values always), then each step of ``numbers``.

    ``decode(record, file, where=)`` proves a sharded step and its parts; ``blame_base()``
    raises the base's own error if it is damaged. Raises VerifyError listing every failure.
    """
    failures: list[VerifyFailure] = []
    base_file = catalog.file(BASE_NAME)
    try:
        if whole_base:
            for row, chunk in layout.stored_base_failures():
                name = layout.table.entries[row].name
                failures.append(VerifyFailure(base_file, name, f"chunk {chunk} does not match its digest"))
        if not failures:  # a base found damaged chunk by chunk needs no second report
            layout.base()
            layout.base_values()
    except (IntegrityError, FormatError) as error:
        failures.append(VerifyFailure(base_file, None, _without_prefix(str(error), str(base_file))))
    base_ok = not failures
    checked, gone = [], []
    for number in progress(numbers) if progress is not None else numbers:
        file = catalog.file(catalog.key(number))
        try:
            record, step_file = catalog.read_record(number, sections=True)
            if base_ok and record.shards is not None:
                decode(record, step_file, where=str(file))  # proves every part, or raises
            elif base_ok:
                decoded = stepcodec.decode(layout, record, step_file, where=str(file), check=False)
                for tensor in stepcodec.content_failures(layout, decoded):
                    what = "does not match its recorded digest"
                    failures.append(VerifyFailure(file, tensor, what if tensor else "content " + what))
            checked.append(number)
        except StepNotFoundError:
            gone.append(number)
        except (IntegrityError, FormatError, BaseMismatchError) as error:
            failures.append(VerifyFailure(file, None, _without_prefix(str(error), str(file))))
            checked.append(number)
    if base_ok and not whole_base and any(f.file != base_file for f in failures):
        try:
            blame_base()
        except IntegrityError as error:  # the steps fail because the base is damaged: blame it alone
            failures = [VerifyFailure(base_file, None, _without_prefix(str(error), str(base_file)))]
            base_ok = False
    report = VerifyReport(steps=checked, gone=gone, base_checked=whole_base, base_ok=base_ok)
    if failures:
        raise VerifyError(failures, report)
    return report


def _without_prefix(message: str, where: str) -> str:
    prefix = f"{where}: "
    return message[len(prefix) :] if message.startswith(prefix) else message
