"""Writes tests/data/store_v2, the format_version 2 golden store. Run once; commit the result; never regenerate."""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from golden_v2 import base_state, mask, optimizer_state, step_state  # noqa: E402

from fishckpt import CheckpointStore, OutsideMaskWarning  # noqa: E402


class _Optimizer:
    """Stands in for an optimizer: the store only calls state_dict()."""

    def __init__(self, step: int) -> None:
        self.step = step

    def state_dict(self) -> dict[str, object]:
        return optimizer_state(self.step)


target = HERE / "store_v2"
shutil.rmtree(target, ignore_errors=True)
store = CheckpointStore.create(target, base_state(), mask(), chunk_bytes=256)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", OutsideMaskWarning)
    store.save(step_state(1), 1, metadata={"note": "masked only"})
    store.save(step_state(2), 2, metadata={"note": "with changes", "loss": float("nan")}, optimizer=_Optimizer(2))
(target / ".lock").unlink(missing_ok=True)
print(f"wrote {target}")
