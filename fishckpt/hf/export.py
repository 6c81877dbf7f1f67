"""A saved step as a Hugging Face model folder: ``model.safetensors`` and ``config.json``, for ``from_pretrained``.

Needs neither transformers nor accelerate: the weights come from the store (verified, bit for
bit) and the config from the step's metadata, where ``FishTrainer`` keeps it, or from the caller.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import FormatError, InvalidArgumentError, MissingFileError
from ..statefiles import save_state_file
from ..storage.local import atomic_write
from ..store.store import CheckpointStore

__all__ = ["HF_METADATA_KEY", "export_hf"]

# The step metadata key FishTrainer writes: {"config": ..., "trainer_state": ..., "scaler": ...}.
HF_METADATA_KEY = "hf"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

PathLike = str | os.PathLike[str]


def export_hf(
    store: CheckpointStore | PathLike,
    step: int,
    folder: PathLike,
    *,
    config: Mapping[str, Any] | PathLike | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Writes step ``step`` of a store as a folder that ``AutoModel...from_pretrained(folder)`` loads.

    The folder gets ``model.safetensors`` (every tensor of the step, verified against the step's
    digest as it is rebuilt, with the metadata ``{"format": "pt"}`` that transformers requires)
    and ``config.json``. Tied tensors (a decoder sharing the word embeddings) are written once,
    under the first of their names, as ``save_pretrained`` does; ``from_pretrained`` ties them
    again. The weights loaded from the folder are the step's, bit for bit (tested).

    The config is the one ``fishckpt.hf.FishTrainer`` kept with the step (the model's
    ``config.to_dict()`` with ``architectures`` set). Steps saved otherwise need ``config``: a
    dict, a ``config.json`` file, or a folder holding one (the pretrained model's folder, say).
    ``config`` also overrides a kept config.

    Tokenizer files are not part of a store; save them beside the export with
    ``tokenizer.save_pretrained(folder)``.

    Args:
        store: A store, or the path or URL of one.
        step: The saved step to export.
        folder: The output folder; created if missing. It must be empty unless ``overwrite``.
        config: The model's config, when the step does not hold one (or to replace it).
        overwrite: Write into a folder that holds files already, replacing ``model.safetensors``
            and ``config.json``.

    Returns:
        The two files written.

    Raises:
        StepNotFoundError: ``step`` is not saved.
        InvalidArgumentError: No config for the step, or a config without ``model_type``.
        FileExistsError: ``folder`` holds files and ``overwrite`` is false (nothing is written).
        IntegrityError: The step does not verify.

    Example:
        >>> export_hf("out/fishckpt", 120, "out/model-120")
        >>> model = AutoModelForSequenceClassification.from_pretrained("out/model-120")
    """
    if isinstance(store, CheckpointStore):
        opened = store
    else:  # a URL stays text; Path() would fold its "//"
        opened = CheckpointStore.open(store if isinstance(store, str) else Path(store))
    settings = _config_for(opened, step, config)
    target = Path(folder)
    if target.exists() and not target.is_dir():
        raise FileExistsError(errno.EEXIST, "exists and is not a folder; give a folder to export into", str(target))
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            errno.EEXIST, "folder is not empty; export into a new folder, or pass overwrite=True", str(target)
        )
    state = opened.load(step, verify=True)
    # load() hands back one tensor object for keys that share storage in the base; keep the first name.
    seen: set[int] = set()
    untied = {}
    for name, tensor in state.items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            untied[name] = tensor
    target.mkdir(parents=True, exist_ok=True)
    weights, config_file = target / WEIGHTS_NAME, target / CONFIG_NAME
    save_state_file(weights, untied, file_format="safetensors", overwrite=overwrite)
    text = json.dumps(settings, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write(config_file, [text.encode("utf-8")], overwrite=overwrite)
    return [weights, config_file]


def _config_for(store: CheckpointStore, step: int, given: Mapping[str, Any] | PathLike | None) -> dict[str, Any]:
    """The config to write: the caller's, else the one kept with the step; checked for ``model_type``."""
    where = f"{store.location} step {step}"
    if given is None:
        kept = store.info(step).metadata.get(HF_METADATA_KEY)
        settings = kept.get("config") if isinstance(kept, Mapping) else None
        if not isinstance(settings, Mapping):
            raise InvalidArgumentError(
                f"{where} holds no Hugging Face config (it was not saved by fishckpt.hf.FishTrainer); pass "
                "config= (a dict, a config.json, or the pretrained model's folder), or --config on the command line"
            )
        source = where
    elif isinstance(given, Mapping):
        settings, source = given, "the config given"
    else:
        path = Path(given)
        path = path / CONFIG_NAME if path.is_dir() else path
        try:
            settings = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MissingFileError(f"{path}: no such file; give a config.json or a folder holding one") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise FormatError(f"{path}: not a JSON config file ({error})") from None
        if not isinstance(settings, dict):
            raise FormatError(f"{path}: a config.json holds a JSON object, not {type(settings).__name__}")
        source = str(path)
    if not isinstance(settings.get("model_type"), str):
        raise InvalidArgumentError(
            f"{source}: the config has no model_type, so AutoModel cannot tell which class to build; "
            "give the config.json of the pretrained model"
        )
    return dict(settings)
