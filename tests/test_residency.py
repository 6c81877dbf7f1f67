"""store/switch.py's Residency: what each target tensor holds, for the O(k) switch."""

from __future__ import annotations

import gc

import torch

from fishckpt.store.switch import Residency


def test_residency_holds_only_untouched_tensors_with_one_step() -> None:
    first, second = object(), object()
    tensors = [torch.zeros(3), torch.zeros(2)]
    residency = Residency()
    assert residency.held(tensors) is None
    residency.remember(tensors, first)  # type: ignore[arg-type]
    assert residency.held(tensors) is first
    residency.remember(tensors[:1], second)  # type: ignore[arg-type]
    assert residency.held(tensors) is None  # the two tensors hold different steps
    residency.remember(tensors, second)  # type: ignore[arg-type]
    tensors[1].add_(1)  # a write the store did not make
    assert residency.held(tensors) is None
    assert residency.held(tensors[:1]) is second


def test_a_record_vouches_only_for_its_own_live_tensor() -> None:
    residency = Residency()
    decoded = object()
    tensor = torch.zeros(4)
    residency.remember([tensor], decoded)  # type: ignore[arg-type]
    # A record found under another tensor's id (ids are reused once a tensor dies) vouches for nothing.
    stranger = torch.zeros(4)
    residency._resident[id(stranger)] = residency._resident[id(tensor)]
    assert residency.held([stranger]) is None
    assert residency.held([tensor]) is decoded


def test_records_of_dead_tensors_are_swept_and_live_ones_kept() -> None:
    residency = Residency()
    keep = [torch.zeros(1) for _ in range(10)]
    kept = object()
    residency.remember(keep, kept)  # type: ignore[arg-type]
    for _ in range(50):  # 50 loads of 100 tensors each, dropped at once, as a sweep over checkpoints does
        residency.remember([torch.zeros(1) for _ in range(100)], object())  # type: ignore[arg-type]
    gc.collect()
    residency.remember([torch.zeros(1)], object())  # type: ignore[arg-type]
    assert len(residency._resident) <= 2 * 111 + 100  # twice the live ones at most, not the 5,011 remembered
    assert residency.held(keep) is kept
