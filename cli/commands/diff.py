"""The `diff` command: what changed between two steps or checkpoint files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    import torch

    from fishckpt import CheckpointStore, StateDiff, TensorDiff

from .._format import echo_json, json_number, table
from .._options import StoreLocation, json_option, store_argument, store_options


def load_operand(text: str, store: CheckpointStore) -> tuple[str, dict[str, torch.Tensor]]:
    """A label and the state for A or B: an existing path is a file, an integer is a step of ``store``."""
    from fishckpt import load_state_file

    path = Path(text)
    if path.exists():
        return str(path), load_state_file(path)
    if not (text.isascii() and text.isdigit()):
        raise click.ClickException(
            f"{text}: no such file, and not a step number; give a checkpoint file or a step of {store.location}"
        )
    step = int(text)
    return f"step {step}", store.load(step, verify=True)


@click.command()
@store_argument
@click.argument("a")
@click.argument("b")
@click.option("--top", type=click.IntRange(min=1), help="Show only the N tensors with the most changed entries.")
@json_option
@store_options
def diff(store: StoreLocation, a: str, b: str, top: int | None, as_json: bool) -> None:
    """Compare A and B tensor by tensor; each is a step of STORE or a checkpoint file.

    An existing path is read as a file; otherwise A or B must be a step number.
    An entry counts as changed when its bit pattern differs (so NaN to the same
    NaN is unchanged and 0.0 to -0.0 is a change). For each changed tensor:
    entries changed, max |Δ| and the L2 norm of Δ (in float64; float tensors
    only), and how many changed entries lie outside STORE's mask. Then totals.
    """
    from fishckpt import diff_states

    opened = store.open()
    label_a, state_a = load_operand(a, opened)
    label_b, state_b = load_operand(b, opened)
    result = diff_states(state_a, state_b, opened.mask)
    rows = result.changed[:top] if top is not None else result.changed
    if as_json:
        echo_json(
            {
                "store": opened.location,
                "a": label_a,
                "b": label_b,
                "tensors": [_tensor_json(t) for t in rows],
                "only_in_a": result.only_in_a,
                "only_in_b": result.only_in_b,
                "mismatched": [{"name": n, "a": ta, "b": tb} for n, ta, tb in result.mismatched],
                "totals": _totals(result),
            }
        )
        return
    click.echo(f"Comparing {label_a} with {label_b} (mask of {opened.location})")
    if rows:
        click.echo(
            table(
                ["TENSOR", "CHANGED", "OF", "MAX |Δ|", "L2(Δ)", "OUTSIDE MASK"],
                [
                    [
                        t.name,
                        f"{t.changed:,}",
                        f"{t.numel:,}",
                        _number(t.max_abs_delta),
                        _number(t.l2),
                        f"{t.outside_mask:,}",
                    ]
                    for t in rows
                ],
                right=[False, True, True, True, True, True],
            )
        )
        if len(rows) < len(result.changed):
            click.echo(f"... and {len(result.changed) - len(rows)} more changed tensor(s) (see --top).")
    totals = _totals(result)
    if totals["entries_changed"] == 0:
        click.echo(f"No changes in the {len(result.compared)} tensor(s) both hold: identical bit for bit.")
    else:
        click.echo(
            f"Total: {totals['entries_changed']:,} entries changed in {totals['tensors_changed']} of "
            f"{len(result.compared)} tensor(s); {totals['outside_mask']:,} outside the mask; "
            f"max |Δ| {_number(_float_or_none(totals['max_abs_delta']))}, "
            f"L2(Δ) {_number(_float_or_none(totals['l2']))}."
        )
    for label, names in (("Only in A", result.only_in_a), ("Only in B", result.only_in_b)):
        if names:
            click.echo(f"{label}: {', '.join(names)}")
    for name, described_a, described_b in result.mismatched:
        click.echo(f"Not compared: {name} is {described_a} in A but {described_b} in B")


def _tensor_json(diff: TensorDiff) -> dict[str, Any]:
    return {
        "name": diff.name,
        "dtype": str(diff.dtype).removeprefix("torch."),
        "shape": list(diff.shape),
        "numel": diff.numel,
        "changed": diff.changed,
        "outside_mask": diff.outside_mask,
        "max_abs_delta": None if diff.max_abs_delta is None else json_number(diff.max_abs_delta),
        "l2": None if diff.l2 is None else json_number(diff.l2),
    }


def _totals(result: StateDiff) -> dict[str, Any]:
    return {
        "tensors_compared": len(result.compared),
        "tensors_changed": len(result.changed),
        "entries_changed": result.entries_changed,
        "outside_mask": result.outside_mask,
        "max_abs_delta": json_number(result.max_abs_delta),
        "l2": json_number(result.l2),
    }


def _float_or_none(value: float | str | None) -> float | None:
    return float(value) if value is not None else None


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.6g}"
