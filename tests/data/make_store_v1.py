"""Writes tests/data/store_v1, the format_version 1 golden store. Run once; commit the result; never regenerate."""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from golden_v1 import base_state, mask, step_state  # noqa: E402

from fishckpt import CheckpointStore, OutsideMaskWarning  # noqa: E402

target = HERE / "store_v1"
shutil.rmtree(target, ignore_errors=True)
store = CheckpointStore.create(target, base_state(), mask(), chunk_bytes=64)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", OutsideMaskWarning)
    store.save(step_state(1), 1, metadata={"note": "masked only"})
    store.save(step_state(2), 2, metadata={"note": "with buffers"})
(target / ".lock").unlink()
print(f"wrote {target}")
