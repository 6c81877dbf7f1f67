"""Commands that write: `init` a store, `save` a checkpoint file into it, `restore` one out of it, `upgrade` it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import click

from fishckpt import MaskMismatchError, OutsideMaskWarning, StateMismatchError

from .._files import FORMATS, format_for
from .._format import compression_ratio, human_bytes, smaller_or_larger
from .._options import (
    PATH,
    STEP,
    StoreLocation,
    check_output,
    force_option,
    is_url,
    store_argument,
    store_options,
    wait_option,
)


@click.command()
@store_argument
@click.option("--base", "base_file", type=PATH, required=True, help="Dense starting weights (safetensors or .pt/.bin).")
@click.option("--mask", "mask_file", type=PATH, required=True, help="Mask file: fishckpt, or bool/0-1 tensors.")
@click.option("--force", is_flag=True, help="Replace an existing fishckpt store at STORE (never any other folder).")
@wait_option
@store_options
def init(store: StoreLocation, base_file: Path, mask_file: Path, force: bool, wait: float) -> None:
    """Create a store at STORE from a base checkpoint file and a mask.

    The base is stored once, densely; every later `save` stores only what the
    mask selects (plus anything that changed outside it). STORE must not exist
    or be empty; `--force` replaces an existing fishckpt store, never another folder,
    waiting for its writer lock first (a writer still using the old store then fails).
    """
    from fishckpt import Mask, load_state_file

    if not force and store.is_store():
        raise click.ClickException(
            f"{store}: already a fishckpt store; pass --force to replace it (its checkpoints are deleted)"
        )
    mask = Mask.load(mask_file)
    state = load_state_file(base_file)
    try:
        created = store.create(state, mask, overwrite=force, lock_timeout=wait)
    except MaskMismatchError as error:
        raise click.ClickException(f"{mask_file} does not fit the base {base_file}: {error}") from error
    click.echo(
        f"Created store {created.location}: {len(created.tensor_names)} tensors, "
        f"{human_bytes(created.dense_bytes)} dense; "
        f"the mask keeps {mask.k:,} of {mask.numel:,} entries ({mask.density:.2%})."
    )


@click.command()
@store_argument
@click.argument("file", type=PATH)
@click.option("--step", type=STEP, required=True, help="Step number to save FILE as.")
@click.option("-m", "--message", help="A note kept with the checkpoint (shown by `ls`).")
@click.option("--strict", is_flag=True, help="Refuse (exit 1, write nothing) if entries outside the mask changed.")
@click.option("--force", is_flag=True, help="Replace the checkpoint if STEP is already saved.")
@click.option("--fast", is_flag=True, help="Read only the masked entries; changes outside the mask are not looked for.")
@wait_option
@store_options
def save(
    store: StoreLocation, file: Path, step: int, message: str | None, strict: bool, force: bool, fast: bool, wait: float
) -> None:
    """Save the checkpoint FILE into STORE as step STEP, keeping only the masked values.

    FILE must have exactly the base's tensors, shapes and dtypes. Entries that
    changed outside the mask are stored too and reported (with `--strict` they
    are refused instead). Prints the bytes written and the ratio to FILE's dense size.
    """
    if strict and fast:
        raise click.UsageError("--strict needs the check of entries outside the mask that --fast skips; drop one")
    from fishckpt import load_state_file

    opened = store.open(lock_timeout=wait)
    if step in opened.steps and not force:
        raise click.ClickException(f"{opened.location}: step {step} is already saved; pass --force to replace it")
    state = load_state_file(file)
    metadata = {"message": message} if message is not None else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OutsideMaskWarning)
        try:
            info = opened.save(
                state, step, metadata=metadata, check_outside_mask=not fast, strict=strict, overwrite=force
            )
        except StateMismatchError as error:
            raise click.ClickException(f"{file}: does not fit the store: {error}") from error
    for record in caught:
        if issubclass(record.category, OutsideMaskWarning):
            click.echo(f"Warning: {record.message}", err=True)
        else:  # not ours to swallow
            warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)
    ratio = compression_ratio(info.dense_bytes, info.bytes_written)
    click.echo(
        f"Saved step {info.step} to {opened.location}: {human_bytes(info.bytes_written)} written "
        f"({info.bytes_written:,} bytes) for {human_bytes(info.dense_bytes)} dense ({smaller_or_larger(ratio)})."
    )
    if not info.checked_outside_mask:
        click.echo("Changes outside the mask: not checked (--fast); restoring gives the base's values there.")
    elif info.changed_outside_mask:
        total = sum(info.changed_outside_mask.values())
        tensors = len(info.changed_outside_mask)
        entries = f"{total:,} {'entry' if total == 1 else 'entries'}"
        click.echo(
            f"Changes outside the mask: {entries} in {tensors} {'tensor' if tensors == 1 else 'tensors'}, stored too."
        )
    else:
        click.echo("Changes outside the mask: none.")


@click.command()
@store_argument
@click.argument("step", type=STEP)
@click.option("-o", "--output", "out", type=PATH, required=True, help="The checkpoint file to write.")
@click.option(
    "--format",
    "file_format",
    type=click.Choice(FORMATS),
    help="File format; default: pt for .pt/.pth/.bin, safetensors otherwise.",
)
@force_option
@store_options
def restore(store: StoreLocation, step: int, out: Path, file_format: str | None, force: bool) -> None:
    """Rebuild step STEP of STORE as a full checkpoint file OUT, bit for bit.

    Every restored tensor is verified against the digest recorded at save. OUT
    is written atomically (temp file, then rename) and an existing OUT is only
    replaced with `--force`. safetensors cannot share storage, so tied tensors
    are written as separate copies there; `--format pt` keeps them tied.
    """
    check_output(out, force=force)
    from fishckpt import save_state_file

    opened = store.open()
    state = opened.load(step, verify=True)
    chosen = format_for(out, file_format)
    written = save_state_file(out, state, file_format=chosen, overwrite=force)
    click.echo(f"Restored step {step} of {opened.location} (verified) to {out}: {human_bytes(written)}, {chosen}.")


@click.command()
@store_argument
@click.argument("step", type=STEP)
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path), metavar="DIR")
@click.option("--hf", "hugging_face", is_flag=True, help="Write a Hugging Face model folder (the only target so far).")
@click.option(
    "--config",
    "config",
    type=PATH,
    help="The model's config.json (or a folder holding one), for steps saved without one; overrides a kept one.",
)
@click.option("--force", is_flag=True, help="Write into a folder that holds files, replacing the two files.")
@store_options
def export(store: StoreLocation, step: int, folder: Path, hugging_face: bool, config: Path | None, force: bool) -> None:
    """Write step STEP of STORE as a Hugging Face model folder DIR, bit for bit.

    DIR gets model.safetensors (every tensor verified as it is rebuilt; tied tensors
    written once, as save_pretrained does) and config.json, so that
    AutoModel.from_pretrained(DIR) and AutoModelFor....from_pretrained(DIR) load it.
    The config is the one fishckpt.hf.FishTrainer kept with the step; give --config for
    steps saved otherwise. Tokenizer files are not in a store: save them into DIR yourself.
    """
    if not hugging_face:
        raise click.UsageError(
            "choose what to export to: --hf (a Hugging Face model folder); for one checkpoint "
            "file use `fishckpt restore`"
        )
    from fishckpt import export_hf

    opened = store.open()
    written = export_hf(opened, step, folder, config=config, overwrite=force)
    weights = written[0]
    architecture = json.loads(written[1].read_text(encoding="utf-8")).get("architectures") or ["(no architectures)"]
    click.echo(
        f"Exported step {step} of {opened.location} (verified) to {folder}: {weights.name} "
        f"({human_bytes(weights.stat().st_size)}), config.json ({', '.join(architecture)}). "
        f"Load it with AutoModel.from_pretrained({str(folder)!r})."
    )


@click.command()
@store_argument
@wait_option
def upgrade(store_path: Path | str, wait: float) -> None:
    """Rewrite a format 1 store (fishckpt 0.1) as format 2, so that it takes new steps.

    Every step is decoded, rewritten, decoded again and compared bit for bit
    before the store is swapped, atomically, under its writer lock; if anything
    fails, the old store is left exactly as it was. Loading works on format 1 as is.
    STORE is a local folder: a store at a URL cannot be upgraded in place.
    """
    if is_url(store_path):
        # The library's swap on object storage deletes the old store before the new one is
        # written, and the upgrade then finds no steps to carry over: the steps would be lost.
        raise click.ClickException(
            f"{str(store_path).rstrip('/')}: a store at a URL cannot be upgraded in place (its steps would be "
            "lost); copy it to a local folder, run `fishckpt upgrade` there and copy the result to a new URL. "
            "Format 1 stores at URLs can be read (ls, restore, verify) as they are"
        )
    from fishckpt import CheckpointStore

    upgraded = CheckpointStore.upgrade(store_path, lock_timeout=wait)
    click.echo(
        f"Upgraded {upgraded.location} to format {upgraded.format_version}: {len(upgraded.steps)} step(s) "
        "rewritten and proved bit for bit."
    )
