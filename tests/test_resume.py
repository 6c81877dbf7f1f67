"""Exact resume: N steps, save, restore in a new process, M more steps == N+M steps, bit for bit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_state_bits_equal
from safetensors.torch import load_file

from fishckpt import CheckpointStore, Mask, SparseAdamW, StateMismatchError

TRAIN = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file
    from fishckpt import CheckpointStore, Mask, SparseAdamW

    mode, store_path, out_path, steps_before, steps_after = sys.argv[1:6]
    steps_before, steps_after = int(steps_before), int(steps_after)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                   torch.nn.Linear(32, 4))

    def train(model, optimizer, scheduler, steps):
        for _ in range(steps):
            inputs = torch.randn(8, 16)              # data and dropout both draw from the global RNG
            labels = torch.randint(0, 4, (8,))
            loss = torch.nn.functional.cross_entropy(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()

    model = build()
    generator = torch.Generator().manual_seed(1)
    mask = Mask.from_bool({name: torch.rand(p.shape, generator=generator) < 0.1
                           for name, p in model.named_parameters()})

    def fresh_optimizer():
        optimizer = SparseAdamW(model, mask, lr=1e-2, weight_decay=0.1)
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)

    optimizer, scheduler = fresh_optimizer()
    torch.manual_seed(42)
    if mode == "straight":
        train(model, optimizer, scheduler, steps_before + steps_after)
    elif mode == "first":
        store = CheckpointStore.create(store_path, model, mask)
        train(model, optimizer, scheduler, steps_before)
        store.save(model, steps_before, optimizer=optimizer, scheduler=scheduler, rng=True)
        sys.exit(0)
    else:  # resume, in a process that never saw the first part
        torch.manual_seed(12345)                      # wrong on purpose: the restore must fix it
        store = CheckpointStore.open(store_path)
        store.load_into(model, steps_before)
        store.load_training_state(steps_before, optimizer, scheduler)
        train(model, optimizer, scheduler, steps_after)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out_path)
    """
)


def _run(*args: object) -> None:
    result = subprocess.run([sys.executable, "-c", TRAIN, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_resume_in_new_process_is_bitwise_equal(tmp_path: Path) -> None:
    store = tmp_path / "store"
    _run("straight", store, tmp_path / "straight.safetensors", 7, 5)
    _run("first", store, "-", 7, 5)
    _run("resume", store, tmp_path / "resumed.safetensors", 7, 5)
    straight = load_file(tmp_path / "straight.safetensors")
    resumed = load_file(tmp_path / "resumed.safetensors")
    assert_state_bits_equal(resumed, straight)
    torch.manual_seed(0)
    initial = torch.nn.Linear(16, 32).weight.detach()
    assert not torch.equal(straight["0.weight"], initial), "the run must really train"


def test_training_state_round_trip_and_refusals(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 3)
    mask = Mask.from_indices({"weight": [0, 5, 11]}, {"weight": (3, 4), "bias": (3,)})
    store = CheckpointStore.create(tmp_path / "s", model, mask)
    optimizer = SparseAdamW(model, mask, lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    store.save(model, 1, optimizer=optimizer)
    store.save(model, 2)
    other = SparseAdamW(model, mask, lr=0.5)
    store.load_training_state(1, other)
    assert other.param_groups[0]["lr"] == 0.1
    for key in ("exp_avg", "exp_avg_sq"):
        assert_state_bits_equal({key: other.state[model.weight][key]}, {key: optimizer.state[model.weight][key]})
    assert other.state[model.weight]["step"] == 1
    with pytest.raises(StateMismatchError, match="step 2 was saved without optimizer state; pass optimizer= to save"):
        store.load_training_state(2, other)
    scheduler = torch.optim.lr_scheduler.LambdaLR(other, lambda epoch: 1.0)
    with pytest.raises(StateMismatchError, match="without scheduler state"):
        store.load_training_state(1, other, scheduler)
