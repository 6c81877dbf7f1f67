"""The checkpoint manager: async capture, backpressure, failures, exit, retention, resume."""

from __future__ import annotations

import errno
import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_state_bits_equal, bits

from fishckpt import (
    Checkpointer,
    CheckpointStore,
    IntegrityError,
    Mask,
    OutsideMaskWarning,
    SparseAdamW,
    StepNotFoundError,
    StoreLockedError,
)
from fishckpt.storage.local import exclusive_lock


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def _mask(model: torch.nn.Module) -> Mask:
    generator = torch.Generator().manual_seed(1)
    return Mask.from_bool({n: torch.rand(p.shape, generator=generator) < 0.2 for n, p in model.named_parameters()})


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 1) -> None:
    for _ in range(steps):
        loss = model(torch.randn(8, 16)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.fixture
def setup(tmp_path: Path):
    model = _model()
    mask = _mask(model)
    store = CheckpointStore.create(tmp_path / "store", model, mask)
    optimizer = SparseAdamW(model, mask, lr=1e-2)
    return model, optimizer, store


def _slow_commits(monkeypatch: pytest.MonkeyPatch, store: CheckpointStore, seconds: float) -> threading.Event:
    """Makes each background write start late, so the training thread surely moves on first."""
    started = threading.Event()
    real = store.commit

    def slow(pending, **kwargs):
        started.set()
        time.sleep(seconds)
        return real(pending, **kwargs)

    monkeypatch.setattr(store, "commit", slow)
    return started


def test_mutating_model_and_optimizer_after_step_never_changes_what_is_written(setup, monkeypatch) -> None:
    model, optimizer, store = setup
    _train(model, optimizer, 3)
    expected_model = _snapshot(model)
    expected_moments = {
        name: {key: value.clone() for key, value in optimizer.state[param].items() if isinstance(value, torch.Tensor)}
        for name, param in model.named_parameters()
    }
    started = _slow_commits(monkeypatch, store, 0.3)
    ckpt = Checkpointer(store, every=1, check_outside_mask=False)
    assert ckpt.step(3, model, optimizer)
    assert started.wait(5)
    _train(model, optimizer, 2)  # SparseAdamW moves the weights and updates its moments in place
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # and a plain in-place write too
    ckpt.close()
    assert_state_bits_equal(store.load(3), expected_model)
    fresh = _model()
    fresh_optimizer = SparseAdamW(fresh, _mask(fresh), lr=1e-2)
    store.load_training_state(3, fresh_optimizer, rng=False)
    for name, param in fresh.named_parameters():
        for key, value in expected_moments[name].items():
            assert torch.equal(bits(fresh_optimizer.state[param][key]), bits(value)), (name, key)


def test_step_returns_at_once_off_schedule_and_the_training_thread_blocks_only_for_the_capture(
    setup, monkeypatch
) -> None:
    model, optimizer, store = setup
    _slow_commits(monkeypatch, store, 0.5)
    ckpt = Checkpointer(store, every=5)
    assert not ckpt.step(3, model, optimizer)
    started = time.perf_counter()
    assert ckpt.step(5, model, optimizer)
    assert time.perf_counter() - started < 0.4  # the 0.5 s write runs in the background
    ckpt.wait()
    assert store.steps == [5] and ckpt.last is not None and ckpt.last.step == 5


def test_a_second_save_waits_for_the_first_and_drops_nothing(setup, monkeypatch) -> None:
    model, optimizer, store = setup
    _slow_commits(monkeypatch, store, 0.2)
    with Checkpointer(store, every=1) as ckpt:
        for step in range(1, 6):
            _train(model, optimizer)
            ckpt.step(step, model, optimizer)
            assert ckpt._thread is None or not any(  # at most one save is ever in flight
                t.name.startswith("fishckpt-save") and t is not ckpt._thread for t in threading.enumerate()
            )
    assert store.steps == [1, 2, 3, 4, 5]


def test_a_full_disk_in_the_background_is_raised_with_its_type_on_the_next_call(setup, monkeypatch) -> None:
    model, optimizer, store = setup

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    ckpt = Checkpointer(store, every=1)
    monkeypatch.setattr("fishckpt.storage.local.os.fsync", full)
    ckpt.step(1, model, optimizer)
    with pytest.raises(OSError) as raised:
        ckpt.step(2, model, optimizer)
    assert raised.value.errno == errno.ENOSPC and "saving step 1" in str(raised.value)
    monkeypatch.undo()
    ckpt.wait()  # the failure was raised once; step 2 was not started, and nothing is left half-written
    assert store.steps == []
    ckpt.step(3, model, optimizer)
    ckpt.close()
    assert store.steps == [3]


def test_a_lock_held_elsewhere_is_raised_on_wait(setup, tmp_path: Path) -> None:
    model, optimizer, _ = setup
    impatient = CheckpointStore.open(tmp_path / "store", lock_timeout=0.05)
    ckpt = Checkpointer(impatient, every=1)
    with exclusive_lock(tmp_path / "store" / ".lock"):
        ckpt.step(1, model, optimizer)
        with pytest.raises(StoreLockedError):
            ckpt.wait()
    ckpt.close()


def test_an_error_in_the_loop_still_completes_the_pending_save(setup, monkeypatch) -> None:
    model, optimizer, store = setup
    _slow_commits(monkeypatch, store, 0.2)
    with pytest.raises(RuntimeError, match="the loop broke"), Checkpointer(store, every=1) as ckpt:
        ckpt.step(1, model, optimizer)
        raise RuntimeError("the loop broke")
    assert store.steps == [1]
    store.verify()


def test_the_manager_warns_once_and_logs_the_rest(setup, caplog) -> None:
    model, _, store = setup
    plain = torch.optim.SGD(model.parameters(), lr=0.1)  # moves every weight: changes outside the mask
    ckpt = Checkpointer(store, every=1, async_save=False)
    with pytest.warns(OutsideMaskWarning, match="This manager warns once") as caught, caplog.at_level(logging.INFO):
        for step in (1, 2, 3):
            _train(model, plain)
            ckpt.step(step, model, plain)
    assert len([w for w in caught if issubclass(w.category, OutsideMaskWarning)]) == 1
    assert sum("entries outside the mask changed" in record.message for record in caplog.records) == 2
    assert_state_bits_equal(store.load(3), _snapshot(model))


def test_retention_keeps_the_last_and_every_nth(setup) -> None:
    model, optimizer, store = setup
    with Checkpointer(store, every=1, keep_last=2, keep_every=4) as ckpt:
        for step in range(1, 11):
            _train(model, optimizer)
            ckpt.step(step, model, optimizer)
    assert store.steps == [4, 8, 9, 10]
    store.verify()


def test_protected_steps_outlive_retention_until_another_is_protected(setup) -> None:
    model, optimizer, store = setup
    with Checkpointer(store, every=1, keep_last=2) as ckpt:
        for step in range(1, 7):
            _train(model, optimizer)
            ckpt.step(step, model, optimizer)
            if step == 2:
                ckpt.protect([2])  # the best so far, say
        ckpt.wait()
        assert store.steps == [2, 5, 6]
        ckpt.protect([5])  # a new best: step 2 goes at the next save, step 5 stays past its age
        for step in range(7, 9):
            _train(model, optimizer)
            ckpt.step(step, model, optimizer)
    assert store.steps == [5, 7, 8]


def test_retention_racing_a_reader_never_shows_a_damaged_step(setup) -> None:
    model, optimizer, store = setup
    reader = CheckpointStore.open(store.path)
    problems: list[BaseException] = []
    loaded = [0]
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            for step in reader.steps:
                try:
                    reader.load(step)
                    loaded[0] += 1
                except StepNotFoundError:
                    pass
                except BaseException as error:
                    problems.append(error)

    thread = threading.Thread(target=read)
    thread.start()
    try:
        with Checkpointer(store, every=1, keep_last=1) as ckpt:
            for step in range(1, 41):
                _train(model, optimizer)
                ckpt.step(step, model, optimizer)
    finally:
        stop.set()
        thread.join()
    assert problems == [] and loaded[0] > 0
    assert store.steps == [40]


def test_resume_restores_the_latest_step_and_returns_it(setup, tmp_path: Path) -> None:
    model, optimizer, store = setup
    with Checkpointer(store, every=2) as ckpt:
        assert ckpt.resume(model, optimizer) is None  # nothing saved yet
        for step in range(1, 6):
            _train(model, optimizer)
            ckpt.step(step, model, optimizer)
    expected = store.load(4)
    fresh = _model()
    fresh_optimizer = SparseAdamW(fresh, _mask(fresh), lr=1e-2)
    assert Checkpointer(CheckpointStore.open(tmp_path / "store")).resume(fresh, fresh_optimizer) == 4
    assert_state_bits_equal(dict(fresh.state_dict()), expected)
    assert Checkpointer(store).resume(fresh, fresh_optimizer, step=2) == 2


def test_a_closed_manager_refuses_more_saves(setup) -> None:
    model, optimizer, store = setup
    ckpt = Checkpointer(store)
    ckpt.close()
    ckpt.close()  # twice is harmless
    with pytest.raises(Exception, match="closed"):
        ckpt.step(1, model, optimizer)


@pytest.mark.parametrize("kwargs", [{"every": 0}, {"keep_last": 0}, {"keep_every": -1}, {"every": True}])
def test_bad_schedules_are_refused(setup, kwargs) -> None:
    with pytest.raises(ValueError, match="must be a positive integer"):
        Checkpointer(setup[2], **kwargs)


# Exit while a save is pending ------------------------------------------------------------------------

EXITER = textwrap.dedent(
    """
    import sys, time, torch
    from fishckpt import CheckpointStore, Checkpointer
    store = CheckpointStore.open(sys.argv[1])
    mode = sys.argv[2]
    real = store.commit
    def slow(pending, **kwargs):
        print("writing", flush=True)
        time.sleep(float(sys.argv[3]))
        return real(pending, **kwargs)
    store.commit = slow
    state = {name: t.clone() for name, t in store.load(1).items()}
    ckpt = Checkpointer(store, every=1, check_outside_mask=False)
    ckpt.step(2, state)
    if mode == "exit":
        sys.exit(0)  # no close(): the interpreter must still let the pending save finish
    time.sleep(60)
    """
)


@pytest.mark.parametrize("mode", ["exit", "sigkill"])
def test_exit_during_a_pending_save_leaves_a_valid_store(setup, tmp_path: Path, mode: str) -> None:
    model, optimizer, store = setup
    _train(model, optimizer)
    store.save(model, 1)
    child = subprocess.Popen(
        [sys.executable, "-c", EXITER, str(tmp_path / "store"), mode, "0.5"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "writing\n"
        if mode == "sigkill":
            child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        child.kill()
        if child.stdout is not None:
            child.stdout.close()
    reopened = CheckpointStore.open(tmp_path / "store")
    assert reopened.steps == ([1, 2] if mode == "exit" else [1])
    reopened.verify()


# Exact resume through the manager ----------------------------------------------------------------------

TRAIN = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file
    from fishckpt import CheckpointStore, Checkpointer, Mask, SparseAdamW

    mode, store_path, out_path, stop_at, total = sys.argv[1:6]
    stop_at, total = int(stop_at), int(total)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 4))
    generator = torch.Generator().manual_seed(1)
    mask = Mask.from_bool({n: torch.rand(p.shape, generator=generator) < 0.1 for n, p in model.named_parameters()})
    optimizer = SparseAdamW(model, mask, lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    torch.manual_seed(42)
    if mode == "straight":
        store = None
    elif mode == "first":
        store = CheckpointStore.create(store_path, model, mask)
    else:
        torch.manual_seed(12345)  # wrong on purpose: the resume must put the saved RNG state back
        store = CheckpointStore.open(store_path)
    with Checkpointer(store, every=2, keep_last=2) if store is not None else open("/dev/null") as ckpt:
        start = (ckpt.resume(model, optimizer, scheduler) or 0) if mode == "resume" else 0
        for step in range(start + 1, total + 1):
            inputs, labels = torch.randn(8, 16), torch.randint(0, 4, (8,))
            loss = torch.nn.functional.cross_entropy(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            if store is not None:
                ckpt.step(step, model, optimizer, scheduler)
            if mode == "first" and step == stop_at:
                ckpt.close()
                sys.exit(0)  # as a crash would, right after the save of step stop_at
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out_path)
    """
)


def test_resume_through_the_manager_continues_bit_for_bit(tmp_path: Path) -> None:
    def run(*args: object) -> None:
        result = subprocess.run(
            [sys.executable, "-c", TRAIN, *map(str, args)], capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr

    from safetensors.torch import load_file

    run("straight", tmp_path / "s", tmp_path / "straight.safetensors", 0, 11)
    run("first", tmp_path / "s", tmp_path / "unused.safetensors", 6, 11)
    assert CheckpointStore.open(tmp_path / "s").steps == [4, 6]
    run("resume", tmp_path / "s", tmp_path / "resumed.safetensors", 0, 11)
    straight, resumed = load_file(tmp_path / "straight.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert_state_bits_equal(dict(sorted(resumed.items())), dict(sorted(straight.items())))


def test_a_damaged_step_is_not_resumed_silently(setup) -> None:
    model, optimizer, store = setup
    store.save(model, 1, optimizer=optimizer)
    path = Path(store.step_path(1))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with warnings.catch_warnings(), pytest.raises(IntegrityError):
        Checkpointer(CheckpointStore.open(store.path)).resume(model, optimizer)
