"""CLI commands that write (init, save, restore), the round trip, and the error boundary."""

from __future__ import annotations

import errno
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cli_support import Files, base_state, make_files, make_store, run, step_state
from conftest import assert_state_bits_equal, bits
from safetensors.torch import save_file

import fishckpt
from fishckpt import CheckpointStore, Mask, load_state_file
from fishckpt.store import native as _scan


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return make_files(tmp_path)


def _sorted(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors files list tensors in their own order; compare by name.
    return dict(sorted(state.items()))


# Round trip ---------------------------------------------------------------------------------------


def test_round_trip_restores_every_step_bit_for_bit(files: Files) -> None:
    store = make_store(files, saved=(1, 2, 3))
    originals = {step: load_state_file(path) for step, path in files.steps.items()}
    base = load_state_file(files.base)
    for original in originals.values():
        assert not torch.equal(bits(original["w"]), bits(base["w"])), "the steps must differ from the base"
    for step, original in originals.items():
        for suffix in (".safetensors", ".pt"):
            out = files.root / f"restored-{step}{suffix}"
            result = run("restore", store, step, "-o", out)
            assert result.exit_code == 0, result.output
            kind = "pt" if suffix == ".pt" else "safetensors"
            assert result.stdout.startswith(f"Restored step {step} of {store} (verified) to {out}: ")
            assert result.stdout.endswith(f", {kind}.\n")
            assert_state_bits_equal(_sorted(load_state_file(out)), _sorted(original))
    # the NaN payload and -0.0 of step 2 survive
    restored = load_state_file(files.root / "restored-2.pt")["w"].view(-1)
    assert bits(restored[:1]).item() == 0x7FC00001
    assert bits(restored[5:6]).item() == bits(torch.tensor([-0.0])).item()


def test_restore_format_option_overrides_the_suffix(files: Files) -> None:
    store = make_store(files, saved=(1,))
    out = files.root / "restored.safetensors"
    result = run("restore", store, 1, "-o", out, "--format", "pt")
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:2] == b"PK"
    assert_state_bits_equal(_sorted(load_state_file(out)), _sorted(load_state_file(files.steps[1])))


def test_tied_tensors_stay_tied_in_pt_and_are_copied_in_safetensors(tmp_path: Path) -> None:
    shared = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    tied_base = {"embed": shared, "head": shared, "bias": torch.zeros(3)}
    torch.save(tied_base, tmp_path / "base.pt")
    Mask.from_indices({"embed": [0, 7]}, {"embed": (4, 3), "head": (4, 3), "bias": (3,)}).save(tmp_path / "m.fishmask")
    trained = torch.load(tmp_path / "base.pt", weights_only=True)
    trained["embed"].view(-1)[7] = 5.0  # moves "head" too: same storage
    torch.save(trained, tmp_path / "step.pt")
    assert run("init", tmp_path / "s", "--base", tmp_path / "base.pt", "--mask", tmp_path / "m.fishmask").exit_code == 0
    assert run("save", tmp_path / "s", tmp_path / "step.pt", "--step", 1).exit_code == 0
    assert run("restore", tmp_path / "s", 1, "-o", tmp_path / "out.pt").exit_code == 0
    assert run("restore", tmp_path / "s", 1, "-o", tmp_path / "out.safetensors").exit_code == 0
    as_pt = load_state_file(tmp_path / "out.pt")
    assert as_pt["embed"].data_ptr() == as_pt["head"].data_ptr()
    as_safetensors = load_state_file(tmp_path / "out.safetensors")
    assert as_safetensors["head"].view(-1)[7].item() == 5.0
    assert_state_bits_equal(_sorted(as_safetensors), _sorted({k: v.clone() for k, v in trained.items()}))


# init ---------------------------------------------------------------------------------------------


def test_init_reports_the_store(files: Files) -> None:
    result = run("init", files.store, "--base", files.base, "--mask", files.mask)
    assert result.exit_code == 0
    assert result.stdout == (
        f"Created store {files.store}: 5 tensors, 2.1 KiB dense; the mask keeps 9 of 536 entries (1.68%).\n"
    )


def test_init_accepts_a_bool_safetensors_mask(files: Files) -> None:
    bool_mask = files.root / "mask.safetensors"
    save_file(Mask.load(files.mask).to_bool(), bool_mask)
    assert run("init", files.store, "--base", files.steps[2], "--mask", bool_mask).exit_code == 0
    assert CheckpointStore.open(files.store).mask == Mask.load(files.mask)


def test_init_refuses_an_existing_store_unless_forced(files: Files) -> None:
    store = make_store(files, saved=(1,))
    result = run("init", store, "--base", files.base, "--mask", files.mask)
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {store}: already a fishckpt store; pass --force to replace it (its checkpoints are deleted)\n"
    )
    assert CheckpointStore.open(store).steps == [1]
    assert run("init", store, "--base", files.base, "--mask", files.mask, "--force").exit_code == 0
    assert CheckpointStore.open(store).steps == []


def test_init_force_never_replaces_another_folder(files: Files) -> None:
    folder = files.root / "photos"
    folder.mkdir()
    (folder / "keep.jpg").write_bytes(b"precious")
    result = run("init", folder, "--base", files.base, "--mask", files.mask, "--force")
    assert result.exit_code == 1
    assert result.stderr == f"Error: {folder}: folder is not empty; choose a new path\n"
    assert [p.name for p in folder.iterdir()] == ["keep.jpg"]
    assert (folder / "keep.jpg").read_bytes() == b"precious"


def test_init_errors_name_the_file(files: Files) -> None:
    store, root = files.store, files.root
    result = run("init", store, "--base", root / "nope.safetensors", "--mask", files.mask)
    assert (result.exit_code, result.stderr) == (
        1,
        f"Error: {root / 'nope.safetensors'}: no such file or folder; check the path\n",
    )
    result = run("init", store, "--base", files.base, "--mask", root / "nope.fishmask")
    assert (result.exit_code, result.stderr) == (1, f"Error: {root / 'nope.fishmask'}: mask file not found\n")
    (root / "junk.bin").write_bytes(b"definitely not weights")
    result = run("init", store, "--base", root / "junk.bin", "--mask", files.mask)
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {root / 'junk.bin'}: not a safetensors or PyTorch weights file; save the state dict with "
        "safetensors.torch.save_file or torch.save(model.state_dict(), path)\n"
    )
    torch.save({"w": torch.zeros(3)}, root / "other.pt")
    result = run("init", store, "--base", root / "other.pt", "--mask", files.mask)
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {files.mask} does not fit the base {root / 'other.pt'}: "
        "mask tensor 'w' has shape (32, 16), the base has (3,)\n"
    )
    assert not store.exists()


def test_init_refuses_pickled_objects(files: Files) -> None:
    torch.save(torch.nn.Linear(2, 2), files.root / "module.pt")
    result = run("init", files.store, "--base", files.root / "module.pt", "--mask", files.mask)
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {files.root / 'module.pt'}: refused: the file holds pickled Python objects, not just tensors; "
        "re-save it as a plain dict of tensors (torch.save(model.state_dict(), path)) or as safetensors\n"
    )
    torch.save({**base_state(), "epoch": 3}, files.root / "with_epoch.pt")
    result = run("init", files.store, "--base", files.root / "with_epoch.pt", "--mask", files.mask)
    assert result.exit_code == 1
    assert "key 'epoch' holds a int, not a tensor; save only the model's state_dict" in result.stderr


# save ---------------------------------------------------------------------------------------------


def test_save_reports_bytes_ratio_and_no_outside_changes(files: Files) -> None:
    store = make_store(files)
    result = run("save", store, files.steps[1], "--step", 1, "-m", "first")
    assert result.exit_code == 0, result.output
    written = CheckpointStore.open(store).info(1).bytes
    lines = result.stdout.splitlines()
    assert re.match(
        rf"Saved step 1 to {re.escape(str(store))}: \S+ \S+ written \({written:,} bytes\) for 2.1 KiB dense \(",
        lines[0],
    )
    assert lines[1] == "Changes outside the mask: none."
    assert result.stderr == ""
    assert CheckpointStore.open(store).info(1).metadata == {"message": "first"}


def test_save_stores_and_reports_changes_outside_the_mask(files: Files) -> None:
    store = make_store(files)
    result = run("save", store, files.steps[3], "--step", 3)
    assert result.exit_code == 0
    assert result.stdout.splitlines()[1] == "Changes outside the mask: 1 entry in 1 tensor, stored too."
    assert result.stderr.startswith(
        "Warning: entries outside the mask changed and were stored too: 1 entry in 1 tensor, most in b (1)."
    )
    assert CheckpointStore.open(store).info(3).changed_outside_mask == {"b": 1}


def test_save_strict_refuses_outside_changes_and_writes_nothing(files: Files) -> None:
    store = make_store(files)
    result = run("save", store, files.steps[3], "--step", 3, "--strict")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: step 3 not saved: entries outside the mask changed: b (1 entries). ")
    assert CheckpointStore.open(store).steps == []
    assert [p.name for p in (store / "steps").iterdir()] == []
    assert run("save", store, files.steps[1], "--step", 1, "--strict").exit_code == 0


def test_save_fast_does_not_look_outside_the_mask(files: Files) -> None:
    store = make_store(files)
    result = run("save", store, files.steps[3], "--step", 3, "--fast")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[1] == (
        "Changes outside the mask: not checked (--fast); restoring gives the base's values there."
    )
    result = run("save", store, files.steps[3], "--step", 4, "--fast", "--strict")
    assert result.exit_code == 2
    assert result.stderr.endswith(
        "Error: --strict needs the check of entries outside the mask that --fast skips; drop one\n"
    )


def test_save_refuses_an_existing_step_unless_forced(files: Files) -> None:
    store = make_store(files, saved=(1,))
    result = run("save", store, files.steps[2], "--step", 1)
    assert (result.exit_code, result.stderr) == (
        1,
        f"Error: {store}: step 1 is already saved; pass --force to replace it\n",
    )
    assert run("save", store, files.steps[2], "--step", 1, "--force").exit_code == 0
    restored = CheckpointStore.open(store).load(1)
    assert_state_bits_equal(_sorted(restored), _sorted(step_state(2)))


def test_save_wrong_model_or_missing_store(files: Files) -> None:
    store = make_store(files)
    torch.save({"w": torch.zeros(32, 16)}, files.root / "other.pt")
    result = run("save", store, files.root / "other.pt", "--step", 1)
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {files.root / 'other.pt'}: does not fit the store: {store}: state does not match the store's base: "
        "missing key(s) ['count', 'b', 'h', 'flag']. Save the same model the store was created from\n"
    )
    result = run("save", files.root / "nowhere", files.steps[1], "--step", 1)
    assert (result.exit_code, result.stderr) == (
        1,
        f"Error: {files.root / 'nowhere'}: no such store folder; create one with `fishckpt init`\n",
    )


def test_save_usage_errors_exit_2(files: Files) -> None:
    store = make_store(files)
    result = run("save", store, files.steps[1])
    assert result.exit_code == 2
    assert result.stderr.endswith("Error: Missing option '--step'.\n")
    assert run("save", store, files.steps[1], "--step", "x").exit_code == 2
    assert run("frobnicate").exit_code == 2


# restore ------------------------------------------------------------------------------------------


def test_restore_never_overwrites_without_force(files: Files) -> None:
    store = make_store(files, saved=(1, 2))
    out = files.root / "out.pt"
    out.write_bytes(b"keep me")
    result = run("restore", store, 1, "-o", out)
    assert (result.exit_code, result.stderr) == (1, f"Error: {out}: already exists; pass --force to replace it\n")
    assert out.read_bytes() == b"keep me"
    assert run("restore", store, 1, "-o", out, "--force").exit_code == 0
    assert_state_bits_equal(_sorted(load_state_file(out)), _sorted(step_state(1)))


def test_restore_errors(files: Files) -> None:
    store = make_store(files, saved=(1, 2))
    result = run("restore", store, 9, "-o", files.root / "o.pt")
    assert (result.exit_code, result.stderr) == (1, f"Error: {store}: step 9 is not in the store (saved steps: 1, 2)\n")
    result = run("restore", store, 1, "-o", files.root / "missing" / "o.pt")
    assert (result.exit_code, result.stderr) == (
        1,
        f"Error: {files.root / 'missing'}: no such folder; create it first\n",
    )
    result = run("restore", store, 1, "-o", files.root)
    assert (result.exit_code, result.stderr) == (1, f"Error: {files.root}: is a folder; give a file name to write\n")
    assert run("restore", store, 1, "-o", files.root / "o.pt", "--format", "npz").exit_code == 2
    assert not (files.root / "o.pt").exists()


def test_restore_of_a_corrupted_step_fails_and_writes_nothing(files: Files) -> None:
    store = make_store(files, saved=(1,))
    step_file = CheckpointStore.open(store).step_path(1)
    data = bytearray(step_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    step_file.write_bytes(bytes(data))
    out = files.root / "o.safetensors"
    result = run("restore", store, 1, "-o", out)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {step_file}: ")
    assert "Traceback" not in result.output
    assert not out.exists()


def test_a_checkpoint_from_another_store_is_refused(files: Files) -> None:
    store = make_store(files, saved=(1,))
    other = files.root / "other"
    assert run("init", other, "--base", files.steps[2], "--mask", files.mask).exit_code == 0
    copied = CheckpointStore.open(other).step_path(1)
    copied.write_bytes(CheckpointStore.open(store).step_path(1).read_bytes())
    result = run("restore", other, 1, "-o", files.root / "o.pt")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {copied}: this step file belongs to another store (store id ")
    assert result.stderr.endswith("It cannot be restored here: restore it from the store that wrote it\n")


def test_disk_full_is_a_clear_error(files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    store = make_store(files, saved=(1,))

    def full_disk(path: Path, *_: object, **__: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    def fsync_full(fd: int) -> None:  # the kernel reports a full disk at fsync
        raise OSError(errno.ENOSPC, "No space left on device", str(out))

    monkeypatch.setattr("fishckpt.storage.local.os.fsync", fsync_full)
    for name in ("o.pt", "o.safetensors"):
        out = files.root / name
        result = run("restore", store, 1, "-o", out)
        assert result.exit_code == 1
        assert result.stderr == (
            f"Error: {out}: no space left on device; free some space or write elsewhere (nothing was half-written)\n"
        )
        assert not out.exists()
        assert [p.name for p in files.root.iterdir() if p.name.startswith(".tmp-")] == []
    monkeypatch.undo()
    monkeypatch.setattr(CheckpointStore, "save", lambda *_, **__: full_disk(store / "steps"))
    result = run("save", store, files.steps[2], "--step", 2)
    assert result.stderr == (
        f"Error: {store / 'steps'}: no space left on device; free some space or write elsewhere "
        "(nothing was half-written)\n"
    )


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fishckpt", "--version"], capture_output=True, text=True, check=False, timeout=120
    )
    scan = "C" if _scan.available() else "pure Python"
    assert (result.returncode, result.stdout) == (
        0,
        f"fishckpt, version {fishckpt.__version__} (exact-check scan: {scan})\n",
    )


def test_version_says_when_saves_run_the_pure_python_scan() -> None:
    script = "import sys; sys.modules['fishckpt.store._native'] = None; from fishckpt_cli.main import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", script, "--version"], capture_output=True, text=True, check=False, timeout=120
    )
    assert (result.returncode, result.stdout) == (
        0,
        f"fishckpt, version {fishckpt.__version__} (exact-check scan: pure Python)\n",
    )
