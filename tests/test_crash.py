"""A process killed at any instant during save leaves a store that opens with every earlier step intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_state_bits_equal

from fishckpt import CheckpointStore, Mask

CHILD = textwrap.dedent(
    """
    import os, sys, torch
    import fishckpt.storage.local as io
    from fishckpt import CheckpointStore

    store_path, crash_at, first_step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    real = {name: getattr(os, name) for name in ("fsync", "link", "unlink", "replace")}
    calls = dict.fromkeys(real, 0)

    def dying(name):
        def call(*args, **kwargs):
            calls[name] += 1
            if crash_at == f"{name}:{calls[name]}":
                os._exit(9)  # no cleanup, no flush: like a power cut for this process
            return real[name](*args, **kwargs)
        return call

    class PatchedOs:
        def __getattr__(self, attribute):
            return dying(attribute) if attribute in real else getattr(os, attribute)

    io.os = PatchedOs()
    store = CheckpointStore.open(store_path)
    generator = torch.Generator().manual_seed(1234)
    step = first_step
    for _ in range(200):  # saves until killed
        state = {"w": torch.randn(512, 512, generator=generator), "b": torch.zeros(512)}
        store.save(state, step, check_outside_mask=False)
        print(step, flush=True)
        step += 1
    """
)


def _base() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(512, 512), "b": torch.zeros(512)}


def _mask() -> Mask:
    return Mask.from_indices({"w": range(0, 512 * 512, 97)}, {"w": (512, 512)})


def _expected(step: int, first_step: int) -> dict[str, torch.Tensor]:
    """What the child saved as ``step``: the same generator sequence, restricted to the mask."""
    generator = torch.Generator().manual_seed(1234)
    for _ in range(step - first_step + 1):
        state = {"w": torch.randn(512, 512, generator=generator), "b": torch.zeros(512)}
    out = _base()
    index = _mask()["w"]
    out["w"].view(-1)[index] = state["w"].view(-1)[index]
    return out


def _assert_store_intact(path: Path, saved: dict[int, dict[str, torch.Tensor]]) -> None:
    store = CheckpointStore.open(path)
    assert set(saved) <= set(store.steps)
    store.verify()
    for step, expected in saved.items():
        assert_state_bits_equal(store.load(step), expected)


@pytest.fixture
def store_with_history(tmp_path: Path) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    store = CheckpointStore.create(tmp_path / "store", _base(), _mask())
    saved = {}
    for step in (1, 2):
        saved[step] = _expected(step, 1)
        store.save(saved[step], step)
    return store.path, saved


@pytest.mark.parametrize(
    "crash_at",
    # fsync:1 = the temp file's fsync; link:1 = publishing the file; unlink:1 = removing the temp name;
    # fsync:2 = the directory fsync; the later ones crash in the second save after a first success.
    ["fsync:1", "link:1", "unlink:1", "fsync:2", "fsync:3", "link:2", "fsync:4"],
)
def test_injected_crash_points(store_with_history, crash_at: str) -> None:
    path, saved = store_with_history
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), crash_at, "10"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 9, f"the crash point was never reached: {result.stderr}"
    completed = [int(line) for line in result.stdout.split()]
    for step in completed:  # steps the child reported as saved are durable and exact
        saved[step] = _expected(step, 10)
    _assert_store_intact(path, saved)
    # The interrupted step is either absent or complete, never partial.
    store = CheckpointStore.open(path)
    for step in set(store.steps) - set(saved):
        assert_state_bits_equal(store.load(step), _expected(step, 10))
    # A later save cleans up whatever temp files the crash left.
    store.save(_expected(1, 1), 99)
    assert [p.name for p in (path / "steps").iterdir() if p.name.startswith(".tmp-")] == []


def test_sigkill_at_random_instants(store_with_history) -> None:
    path, saved = store_with_history
    generator = torch.Generator().manual_seed(7)
    for attempt in range(6):
        first = 1000 * (attempt + 1)  # apart by more than the 200 steps a child saves at most
        with subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), "never", str(first)], stdout=subprocess.PIPE, text=True
        ) as child:
            assert child.stdout is not None
            child.stdout.readline()  # the child is up and has saved one step
            time.sleep(float(torch.rand(1, generator=generator)) * 0.3)
            os.kill(child.pid, signal.SIGKILL)
            # Killed, or done with its 200 saves first; any other end is the child's own error.
            assert child.wait() in (-signal.SIGKILL, 0), f"the child failed on its own (attempt {attempt})"
        _assert_store_intact(path, saved)
        store = CheckpointStore.open(path)
        for step in store.steps:
            if step >= first:  # every visible step of the killed child is complete and exact
                assert_state_bits_equal(store.load(step), _expected(step, first))
