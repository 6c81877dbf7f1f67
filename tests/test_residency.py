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


def test_residency_forgets_a_dead_tensor_and_is_not_fooled_by_its_id() -> None:
    residency = Residency()
    decoded = object()
    tensor = torch.zeros(4)
    key = id(tensor)
    residency.remember([tensor], decoded)  # type: ignore[arg-type]
    del tensor
    gc.collect()
    assert key not in residency._resident
    # A record found under another tensor's id (ids are reused once a tensor dies) vouches for nothing.
    other = torch.zeros(4)
    residency.remember([other], decoded)  # type: ignore[arg-type]
    stranger = torch.zeros(4)
    residency._resident[id(stranger)] = residency._resident[id(other)]
    assert residency.held([stranger]) is None


def test_a_late_callback_never_removes_the_record_that_replaced_it() -> None:
    residency = Residency()
    tensor = torch.zeros(2)
    residency.remember([tensor], object())  # type: ignore[arg-type]
    stale = residency._resident[id(tensor)]
    residency.remember([tensor], object())  # type: ignore[arg-type]
    replacement = residency._resident[id(tensor)]
    residency._forget(stale)
    assert residency._resident[id(tensor)] is replacement
    residency._forget(replacement)
    assert id(tensor) not in residency._resident
