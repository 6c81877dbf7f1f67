"""SparseAdamW and mask_gradients: agreement with AdamW, frozen entries stay bit-identical, exact resume."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_bits_equal, bits
from safetensors.torch import load_file
from torch import nn

from fishckpt import (
    GradientMask,
    Mask,
    MaskLeakWarning,
    MaskMismatchError,
    SparseAdamW,
    mask_gradients,
    random_mask,
)


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def _mask(model: nn.Module) -> Mask:
    """About 30% of each weight, all of the head bias, nothing of the first bias."""
    generator = torch.Generator().manual_seed(7)
    indices = {
        "0.weight": torch.randperm(60, generator=generator)[:18],
        "2.weight": torch.randperm(30, generator=generator)[:9],
        "2.bias": torch.arange(3),
    }
    return Mask.from_indices(indices, {name: tuple(p.shape) for name, p in model.named_parameters()})


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(5, 6, generator=generator), torch.randint(0, 3, (5,), generator=generator)


def _backward(model: nn.Module, step: int) -> None:
    x, y = _batch(step)
    nn.functional.cross_entropy(model(x), y).backward()


def _assert_outside_unchanged(model: nn.Module, initial: dict[str, torch.Tensor], mask: Mask) -> None:
    for name, param in model.named_parameters():
        outside = torch.ones(param.numel(), dtype=torch.bool)
        outside[mask[name]] = False
        assert torch.equal(bits(param)[outside], bits(initial[name])[outside]), f"{name} moved outside the mask"


def test_matches_torch_adamw_with_masked_gradients() -> None:
    model, reference = _model(), _model()
    mask = _mask(model)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    ours = SparseAdamW(model, mask, lr=1e-2, weight_decay=0.0)
    theirs = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    with mask_gradients(reference, mask):
        for step in range(25):
            for net, optimizer in ((model, ours), (reference, theirs)):
                optimizer.zero_grad()
                _backward(net, step)
                optimizer.step()
    for (name, mine), other in zip(model.named_parameters(), reference.parameters(), strict=True):
        index = mask[name]
        assert not torch.equal(mine.reshape(-1)[index], initial[name].reshape(-1)[index]) or index.numel() == 0
        # torch's foreach kernels may round the last ulp differently from the single-tensor path.
        torch.testing.assert_close(mine.reshape(-1)[index], other.reshape(-1)[index], rtol=1e-6, atol=1e-7)
    _assert_outside_unchanged(model, initial, mask)


def _reference_adamw(
    values: torch.Tensor,
    grads: list[torch.Tensor],
    lrs: list[float],
    *,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool = False,
    maximize: bool = False,
) -> torch.Tensor:
    """Textbook AdamW (Loshchilov & Hutter) in float64, written independently of the optimizer."""
    p = values.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    v_max = torch.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        g = -g.double() if maximize else g.double()
        p = p - lr * weight_decay * p
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        v_max = torch.maximum(v_max, v)
        m_hat = m / (1 - betas[0] ** t)
        v_hat = (v_max if amsgrad else v) / (1 - betas[1] ** t)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
    return p


@pytest.mark.parametrize(("amsgrad", "maximize"), [(False, False), (True, False), (False, True)])
def test_weight_decay_applies_to_trainable_values_only(amsgrad: bool, maximize: bool) -> None:
    model = _model()
    mask = _mask(model)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = SparseAdamW(
        model, mask, lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.5, amsgrad=amsgrad, maximize=maximize
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in initial}
    lrs = []
    for step in range(12):
        optimizer.zero_grad()
        _backward(model, step)  # gradients are nonzero everywhere, inside the mask or not
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
        for name, param in model.named_parameters():
            grads[name].append(param.grad.reshape(-1)[mask[name]].clone())  # type: ignore[union-attr]
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 3e-2 and lrs[-1] == 3e-2 / 4  # the scheduler drove the optimizer
    for name, param in model.named_parameters():
        index = mask[name]
        expected = _reference_adamw(
            initial[name].reshape(-1)[index],
            grads[name],
            lrs,
            betas=(0.8, 0.99),
            eps=1e-6,
            weight_decay=0.5,
            amsgrad=amsgrad,
            maximize=maximize,
        )
        torch.testing.assert_close(param.detach().reshape(-1)[index].double(), expected, rtol=1e-5, atol=1e-6)
    _assert_outside_unchanged(model, initial, mask)


def test_state_only_for_masked_values() -> None:
    model = _model()
    mask = _mask(model)
    optimizer = SparseAdamW(model, mask)
    _backward(model, 0)
    optimizer.step()
    state = optimizer.state_dict()["state"]
    # Parameter 1 ("0.bias") has no mask entries: no state at all.
    assert sorted(state) == [0, 2, 3]
    assert {pid: tuple(entry["exp_avg"].shape) for pid, entry in state.items()} == {0: (18,), 2: (9,), 3: (3,)}
    assert all(entry["step"] == 1 and isinstance(entry["step"], int) for entry in state.values())
    assert optimizer.state_bytes() == 2 * 4 * (18 + 9 + 3)
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())  # zero_grad covers unmasked parameters too


def _is_plain(value: object) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _is_plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    return isinstance(value, (torch.Tensor, int, float, bool, str)) or value is None


def test_state_dict_is_plain_and_round_trips_through_json() -> None:
    model = _model()
    mask = _mask(model)
    optimizer = SparseAdamW(model, mask, amsgrad=True)
    for step in range(3):
        optimizer.zero_grad()
        _backward(model, step)
        optimizer.step()
    state = optimizer.state_dict()
    assert _is_plain(state)
    tensors = {
        f"{pid}.{key}": value
        for pid, entry in state["state"].items()
        for key, value in entry.items()
        if isinstance(value, torch.Tensor)
    }
    rest = json.loads(
        json.dumps(
            {
                "param_groups": state["param_groups"],
                "state": {
                    pid: {k: v for k, v in entry.items() if not isinstance(v, torch.Tensor)}
                    for pid, entry in state["state"].items()
                },
            }
        )
    )
    for key, value in tensors.items():
        pid, name = key.split(".")
        rest["state"][pid][name] = value.clone()
    other = SparseAdamW(_model(), mask, amsgrad=True)
    other.load_state_dict(rest)
    assert other.state_dict()["param_groups"] == state["param_groups"]
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            loaded = other.state_dict()["state"][pid][key]
            if isinstance(value, torch.Tensor):
                assert_bits_equal(loaded, value, key=f"{pid}.{key}")
                assert loaded.data_ptr() != rest["state"][str(pid)][key].data_ptr()  # copied, not aliased
            else:
                assert loaded == value


def test_load_state_dict_rejects_another_mask() -> None:
    model = _model()
    optimizer = SparseAdamW(model, _mask(model))
    _backward(model, 0)
    optimizer.step()
    state = optimizer.state_dict()
    other_mask = random_mask(model, 0.3, seed=1)
    with pytest.raises(MaskMismatchError, match="saved with a different mask"):
        SparseAdamW(model, other_mask).load_state_dict(state)
    state["state"][0]["exp_avg"] = torch.zeros(5)
    with pytest.raises(
        MaskMismatchError, match=r"'exp_avg' of '0.weight' has shape \(5,\), but the mask has 18 entries"
    ):
        SparseAdamW(model, _mask(model)).load_state_dict(state)


def test_mask_must_match_trainable_parameters_by_name_and_shape() -> None:
    model = _model()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    with pytest.raises(MaskMismatchError, match="names 'head.weight', which is not a trainable parameter"):
        SparseAdamW(model, Mask.from_indices({}, {**shapes, "head.weight": (2,)}))
    with pytest.raises(MaskMismatchError, match=r"mask tensor '2.bias' has shape \(4,\) but the parameter has \(3,\)"):
        SparseAdamW(model, Mask.from_indices({}, {**shapes, "2.bias": (4,)}))
    model[0].weight.requires_grad_(False)
    with pytest.raises(MaskMismatchError, match="'0.weight', which is not a trainable parameter"):
        SparseAdamW(model.named_parameters(), Mask.from_indices({}, shapes))
    with pytest.raises(MaskMismatchError, match="'0.weight', which is not a trainable parameter"):
        mask_gradients(model, Mask.from_indices({}, shapes))


def test_named_parameters_and_non_contiguous_parameters() -> None:
    weight = nn.Parameter(torch.randn(5, 4).t())  # non-contiguous storage
    assert not weight.is_contiguous()
    initial = weight.detach().clone()
    mask = Mask.from_indices({"w": [0, 7, 19]}, {"w": (4, 5)})
    optimizer = SparseAdamW([("w", weight)], mask, lr=0.1)
    (weight * torch.arange(20.0).reshape(4, 5)).sum().backward()
    optimizer.step()
    changed = (bits(weight) != bits(initial)).nonzero().reshape(-1).tolist()
    assert changed == [0, 7, 19]  # flat indices of the logical (4, 5) shape, not of the storage
    # Entry 0 has a zero gradient, so only the (default 0.01) weight decay moved it.
    assert weight.reshape(-1)[0].item() == pytest.approx(initial.reshape(-1)[0].item() * (1 - 0.1 * 0.01), rel=1e-6)


def test_add_param_group_is_refused() -> None:
    model = _model()
    optimizer = SparseAdamW(model, _mask(model))
    with pytest.raises(NotImplementedError, match="takes all its parameters at construction"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


_RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file, save_file
    from torch import nn
    from fishckpt import Mask, SparseAdamW

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    phase, first, more, folder = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4))
    generator = torch.Generator().manual_seed(1)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    indices = {
        name: torch.randperm(p.numel(), generator=generator)[: p.numel() // 4] for name, p in model.named_parameters()
    }
    mask = Mask.from_indices(indices, shapes)
    optimizer = SparseAdamW(model, mask, lr=5e-2, weight_decay=0.1, amsgrad=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=first + more)

    def save(tag, step):
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(weights, folder / f"{tag}-model.safetensors")
        state = optimizer.state_dict()
        tensors = {
            f"{pid}/{key}": value
            for pid, entry in state["state"].items()
            for key, value in entry.items()
            if isinstance(value, torch.Tensor)
        }
        save_file(tensors, folder / f"{tag}-optim.safetensors")
        steps = {pid: entry["step"] for pid, entry in state["state"].items()}
        rest = {"param_groups": state["param_groups"], "steps": steps}
        rest.update(scheduler=scheduler.state_dict(), step=step)
        (folder / f"{tag}-meta.json").write_text(json.dumps(rest))

    def train(start, stop):
        for step in range(start, stop):
            batch = torch.Generator().manual_seed(1000 + step)
            x, y = torch.randn(7, 8, generator=batch), torch.randint(0, 4, (7,), generator=batch)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()

    if phase == "straight":
        train(0, first)
        save("middle", first)
        train(first, first + more)
        save("straight", first + more)
    else:
        model.load_state_dict(load_file(folder / "middle-model.safetensors"))
        meta = json.loads((folder / "middle-meta.json").read_text())
        tensors = load_file(folder / "middle-optim.safetensors")
        state = {pid: {"step": step} for pid, step in meta["steps"].items()}
        for key, value in tensors.items():
            pid, name = key.split("/")
            state[pid][name] = value
        optimizer.load_state_dict({"param_groups": meta["param_groups"], "state": state})
        scheduler.load_state_dict(meta["scheduler"])
        train(meta["step"], first + more)
        save("resumed", first + more)
    """
)


def test_resume_in_a_new_process_is_bit_exact(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(_RESUME_SCRIPT)
    for phase in ("straight", "resume"):
        subprocess.run([sys.executable, str(script), phase, "6", "5", str(tmp_path)], check=True, timeout=120)
    straight = load_file(tmp_path / "straight-model.safetensors")
    resumed = load_file(tmp_path / "resumed-model.safetensors")
    middle = load_file(tmp_path / "middle-model.safetensors")
    assert any(not torch.equal(bits(straight[k]), bits(middle[k])) for k in straight)  # training did move weights
    assert list(resumed) == list(straight)
    for key in straight:
        assert_bits_equal(resumed[key], straight[key], key=key)
    straight_optim = load_file(tmp_path / "straight-optim.safetensors")
    resumed_optim = load_file(tmp_path / "resumed-optim.safetensors")
    assert sorted(resumed_optim) == sorted(straight_optim)
    for key in straight_optim:
        assert_bits_equal(resumed_optim[key], straight_optim[key], key=key)
    assert json.loads((tmp_path / "resumed-meta.json").read_text()) == json.loads(
        (tmp_path / "straight-meta.json").read_text()
    )


def test_mask_gradients_zeroes_outside_and_can_be_removed() -> None:
    model = _model()
    mask = _mask(model)
    with mask_gradients(model, mask) as handle:
        assert isinstance(handle, GradientMask)
        _backward(model, 0)
        for name, param in model.named_parameters():
            grad = param.grad.reshape(-1)  # type: ignore[union-attr]
            outside = torch.ones_like(grad, dtype=torch.bool)
            outside[mask[name]] = False
            assert torch.equal(bits(grad[outside]), bits(torch.zeros(int(outside.sum()))))
            assert bool((grad[mask[name]] != 0).all())
    model.zero_grad()
    _backward(model, 0)  # hooks removed: full gradients again
    assert bool((model[0].bias.grad != 0).all())  # type: ignore[union-attr]


def test_mask_gradients_keeps_nan_outside_the_mask_out() -> None:
    weight = nn.Parameter(torch.ones(3))
    model = nn.Module()
    model.weight = weight
    handle = mask_gradients(model, Mask.from_indices({"weight": [1]}, {"weight": (3,)}))
    (weight * torch.tensor([math.nan, 2.0, math.inf])).sum().backward()
    assert weight.grad is not None and weight.grad.tolist() == [0.0, 2.0, 0.0]
    handle.remove()
    handle.remove()  # harmless twice


def test_mask_gradients_warns_about_optimizers_that_leak() -> None:
    model = _model()
    mask = _mask(model)
    with pytest.warns(
        MaskLeakWarning,
        match=r"AdamW will move weights outside the mask.*weight_decay > 0 on 3 parameter\(s\)"
        r".*Use fishckpt.SparseAdamW, or set weight_decay=0",
    ):
        mask_gradients(model, mask, optimizer=torch.optim.AdamW(model.parameters())).remove()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _backward(model, 0)  # unmasked gradients: momentum builds up everywhere
    sgd.step()
    with pytest.warns(
        MaskLeakWarning,
        match=r"nonzero momentum state outside the mask in 3 parameter\(s\) \('0.weight', '0.bias', '2.weight'\)",
    ):
        mask_gradients(model, mask, optimizer=sgd).remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mask_gradients(model, mask, optimizer=torch.optim.AdamW(model.parameters(), weight_decay=0.0)).remove()
        mask_gradients(model, mask, optimizer=SparseAdamW(model, mask)).remove()
