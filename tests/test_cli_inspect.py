"""CLI commands that read or tidy a store: ls, diff, verify, report, mask, prune, rm; progress bars."""

from __future__ import annotations

import io
import json
import math
import re
import sys
from pathlib import Path

import click
import pytest
import torch
from _cli_support import Files, base_state, flip_byte, make_files, make_mask, make_store, run, safetensors_offset

from fishckpt import CheckpointStore, Mask
from fishckpt_cli._progress import progress
from fishckpt_cli.main import cli


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return make_files(tmp_path)


# ls -----------------------------------------------------------------------------------------------


def test_ls_lists_steps(files: Files) -> None:
    store = make_store(files, saved=(1, 3))
    result = run("ls", store)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["STEP", "TIME", "(UTC)", "BYTES", "RATIO", "OUTSIDE", "MASK", "MESSAGE"]
    assert [line.split()[0] for line in lines[1:]] == ["1", "3"]
    assert lines[2].endswith("  1  step 3")
    assert result.stderr == ""  # no progress bar off a terminal


def test_ls_json(files: Files) -> None:
    store = make_store(files, saved=(1, 3))
    document = json.loads(run("ls", store, "--json").stdout)
    opened = CheckpointStore.open(store)
    assert (document["store"], document["dense_bytes"], document["k"]) == (str(store), opened.dense_bytes, 9)
    first, third = document["checkpoints"]
    assert first["step"] == 1 and first["message"] == "step 1" and first["changed_outside_mask"] == 0
    assert third["changed_outside_mask_by_tensor"] == {"b": 1}
    assert third["bytes"] == opened.info(3).bytes
    assert third["ratio"] == pytest.approx(opened.dense_bytes / third["bytes"])
    assert third["created"].endswith("Z") and third["metadata"] == {"message": "step 3"}


def test_ls_empty_and_corrupted_stores(files: Files) -> None:
    store = make_store(files)
    assert run("ls", store).stdout == f"{store}: no checkpoints saved yet (add one with `fishckpt save`).\n"
    manifest = store / "manifest.safetensors"
    manifest.write_bytes(manifest.read_bytes().replace(b"chunk_bytes", b"chunk_bytez"))
    result = run("ls", store)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {manifest}: manifest file is corrupted or truncated (header checksum")


# diff ---------------------------------------------------------------------------------------------


def _diff_files(root: Path) -> tuple[Path, Path]:
    """A and B differing in known ways: see test_diff_compares_bits."""
    a = base_state()
    nan = torch.tensor([0x7FC00123], dtype=torch.int32).view(torch.float32)
    a["w"].view(-1)[[0, 1, 2, 5]] = torch.cat([nan, torch.tensor([0.0, 3.0, 1.0])])
    b = {name: tensor.clone() for name, tensor in a.items()}
    b["w"].view(-1)[1] = -0.0  # a change, outside the mask, of size 0
    b["w"].view(-1)[2] = 5.0  # outside the mask
    b["w"].view(-1)[5] = 1.5  # inside the mask
    b["count"] += 1
    b["flag"][0] = True
    b["h"] = b["h"].float()
    b["extra"] = torch.zeros(2)
    torch.save(a, root / "a.pt")
    torch.save(b, root / "b.pt")
    return root / "a.pt", root / "b.pt"


def test_diff_compares_bits(files: Files) -> None:
    store = make_store(files)
    a, b = _diff_files(files.root)
    document = json.loads(run("diff", store, a, b, "--json").stdout)
    by_name = {row["name"]: row for row in document["tensors"]}
    assert [row["name"] for row in document["tensors"]] == ["w", "count", "flag"]
    assert by_name["w"] == {
        "name": "w",
        "dtype": "float32",
        "shape": [32, 16],
        "numel": 512,
        "changed": 3,
        "outside_mask": 2,
        "max_abs_delta": 2.0,
        "l2": math.sqrt(4.25),
    }
    assert by_name["count"]["changed"] == 1 and by_name["count"]["max_abs_delta"] is None
    assert by_name["flag"]["outside_mask"] == 1 and by_name["flag"]["l2"] is None
    assert document["only_in_a"] == [] and document["only_in_b"] == ["extra"]
    assert document["mismatched"] == [{"name": "h", "a": "float16 (8,)", "b": "float32 (8,)"}]
    assert document["totals"] == {
        "tensors_compared": 4,
        "tensors_changed": 3,
        "entries_changed": 5,
        "outside_mask": 4,
        "max_abs_delta": 2.0,
        "l2": math.sqrt(4.25),
    }


def test_diff_text_of_steps_and_files(files: Files) -> None:
    store = make_store(files, saved=(1, 3))
    result = run("diff", store, 1, files.steps[3], "--top", 1)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == f"Comparing step 1 with {files.steps[3]} (mask of {store})"
    assert lines[1].split() == ["TENSOR", "CHANGED", "OF", "MAX", "|Δ|", "L2(Δ)", "OUTSIDE", "MASK"]
    assert lines[3] == "... and 2 more changed tensor(s) (see --top)."
    assert lines[4].startswith("Total: 10 entries changed in 3 of 5 tensor(s); 1 outside the mask; max |Δ| ")
    same = run("diff", store, 3, files.steps[3])
    assert same.stdout.splitlines()[1] == "No changes in the 5 tensor(s) both hold: identical bit for bit."


def test_diff_operand_errors(files: Files) -> None:
    store = make_store(files, saved=(1,))
    result = run("diff", store, "nofile", 1)
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: nofile: no such file, and not a step number; give a checkpoint file or a step of {store}\n"
    )
    result = run("diff", store, 1, 4)
    assert (result.exit_code, result.stderr) == (1, f"Error: {store}: step 4 is not in the store (saved steps: 1)\n")
    assert run("diff", store, 1, 1, "--top", 0).exit_code == 2


# verify -------------------------------------------------------------------------------------------


def test_verify_ok(files: Files) -> None:
    store = make_store(files, saved=(1, 2, 3))
    result = run("verify", store)
    assert (result.exit_code, result.stdout) == (0, f"OK: the base and 3 checkpoint(s) of {store} verified.\n")
    assert run("verify", store, 2, 3).stdout == f"OK: 2 checkpoint(s) of {store} verified.\n"
    document = json.loads(run("verify", store, "--json").stdout)
    assert document == {
        "store": str(store),
        "ok": True,
        "base_checked": True,
        "base_ok": True,
        "steps_checked": [1, 2, 3],
        "steps_gone": [],
        "failures": [],
    }


def test_verify_names_each_failing_file_and_tensor(files: Files) -> None:
    store = make_store(files, saved=(1, 2))
    base_file = store / "base.safetensors"
    flip_byte(base_file, safetensors_offset(base_file, "w") + 4)  # w[1], outside the mask
    step_file = CheckpointStore.open(store).step_path(2)
    flip_byte(step_file, step_file.stat().st_size // 2)
    result = run("verify", store)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0] == f"Error: {store}: 2 integrity problem(s)"
    assert lines[1] == f"  {base_file} (tensor 'w'): chunk 0 does not match its digest"
    assert lines[2].startswith(f"  {step_file}: ")
    assert lines[3] == f"The base file is damaged: restore {base_file} from a copy."
    assert lines[4] == "Restore the damaged step files from a copy, or delete them with `fishckpt rm STORE STEP`."
    assert run("verify", store, 1).exit_code == 0  # step 1's own file is intact, and the mask's base values too

    result = run("verify", store, "--json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["ok"] is False
    assert [(f["file"], f["tensor"]) for f in document["failures"]] == [(str(base_file), "w"), (str(step_file), None)]
    assert result.stderr.startswith(f"Error: {store}: 2 integrity problem(s)\nThe base file is damaged")


def test_a_truncated_base_fails_verify_restore_and_diff_but_not_ls(files: Files) -> None:
    store = make_store(files, saved=(1,))
    base_file = store / "base.safetensors"
    base_file.write_bytes(base_file.read_bytes()[:100])
    result = run("verify", store)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0] == f"Error: {store}: 1 integrity problem(s)"
    assert lines[1].startswith(f"  {base_file}: base file is corrupted or truncated: ")
    for args in (("restore", store, 1, "-o", files.root / "o.pt"), ("diff", store, 1, files.steps[1])):
        result = run(*args)
        assert result.exit_code == 1
        assert result.stderr.startswith(f"Error: {base_file}: base file is corrupted or truncated: ")
    assert not (files.root / "o.pt").exists()
    assert run("ls", store).exit_code == 0  # headers only: still lists what is there


# report -------------------------------------------------------------------------------------------


def test_report_json_adds_up(files: Files) -> None:
    store = make_store(files, saved=(1, 2, 3))
    document = json.loads(run("report", store, "--json").stdout)
    opened = CheckpointStore.open(store)
    on_disk = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    assert document["files"]["total_bytes"] == on_disk
    assert document["files"]["base_bytes"] == (store / "base.safetensors").stat().st_size
    assert document["files"]["checkpoint_bytes"] == sum(opened.info(s).bytes for s in (1, 2, 3))
    assert document["dense_equivalent_bytes"] == 3 * opened.dense_bytes
    assert document["bytes_per_masked_value"] == pytest.approx(document["files"]["checkpoint_bytes"] / (3 * 9))
    assert document["store_vs_dense_ratio"] == pytest.approx(3 * opened.dense_bytes / on_disk)
    assert document["mask"] == {"k": 9, "numel": 536, "density": 9 / 536}
    assert [row["step"] for row in document["checkpoints"]] == [1, 2, 3]
    assert document["outside_mask_top"] == [{"tensor": "b", "entries": 1, "steps": 1}]
    assert document["plot"] is None


def document_of(store: Path) -> dict:
    return json.loads(run("report", store, "--json").stdout)


def test_report_text(files: Files) -> None:
    store = make_store(files, saved=(1, 3))
    lines = run("report", store).stdout.splitlines()
    assert lines[0] == f"Store {store}: 5 tensors, 2.1 KiB dense"
    mask_bytes = (store / "mask.safetensors").stat().st_size
    assert re.fullmatch(r"  mask         \S+ \S+ \(k = 9 of 536 entries, 1\.68%\)", lines[2])
    assert document_of(store)["files"]["mask_bytes"] == mask_bytes
    assert lines[4].startswith("  total ") and "for the same 2 step(s) saved densely" in lines[4]
    assert lines[-3:-1] == ["Tensors with the most changes outside the mask:", "TENSOR  ENTRIES  STEPS"]
    (files.root / "other").mkdir()
    empty = make_store(make_files(files.root / "other"))
    assert run("report", empty).stdout.splitlines()[-1].endswith("; no checkpoints saved yet.")


def test_report_plot(files: Files) -> None:
    pytest.importorskip("matplotlib")
    store = make_store(files, saved=(1, 2))
    chart = files.root / "sizes.png"
    result = run("report", store, "--plot", chart)
    assert result.exit_code == 0
    assert result.stdout.endswith(f"Wrote the chart to {chart}.\n")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = run("report", store, "--plot", chart)
    assert (result.exit_code, result.stderr) == (1, f"Error: {chart}: already exists; pass --force to replace it\n")
    assert run("report", store, "--plot", chart, "--force").exit_code == 0


def test_report_plot_without_matplotlib(files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    store = make_store(files)
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    result = run("report", store, "--plot", files.root / "x.png")
    assert (result.exit_code, result.stderr) == (1, "Error: --plot needs matplotlib: pip install 'fishckpt[plot]'\n")
    assert not (files.root / "x.png").exists()


# mask ---------------------------------------------------------------------------------------------


def test_mask_info(files: Files) -> None:
    result = run("mask", "info", files.mask)
    assert result.stdout.splitlines() == [
        f"{files.mask}: k = 9 of 536 entries (1.6791%) in 3 tensor(s)",
        "TENSOR  SHAPE  K   OF  DENSITY",
        "w       32x16  6  512    1.17%",
        "b       16     2   16   12.50%",
        "h       8      1    8   12.50%",
    ]
    document = json.loads(run("mask", "info", files.mask, "--json").stdout)
    assert (document["k"], document["numel"], document["digest"]) == (9, 536, make_mask().digest)
    assert document["tensors"][1] == {"name": "b", "shape": [16], "k": 2, "numel": 16, "density": 0.125}
    store = make_store(files)
    assert json.loads(run("mask", "info", store, "--json").stdout)["digest"] == make_mask().digest
    result = run("mask", "info", files.root / "none.fishmask")
    assert (result.exit_code, result.stderr) == (1, f"Error: {files.root / 'none.fishmask'}: mask file not found\n")


def test_mask_random_is_seeded(files: Files) -> None:
    out = files.root / "random.fishmask"
    result = run("mask", "random", files.base, "--keep-ratio", 0.1, "--seed", 3, "-o", out)
    assert result.exit_code == 0
    made = Mask.load(out)
    assert made.k == 54 and set(made.names) == {"w", "b", "h"}
    assert result.stdout == f"Wrote {out} ({out.stat().st_size:,} bytes): random mask, k = 54 of 536 (10.0746%).\n"
    again = run("mask", "random", files.base, "--keep-ratio", 0.1, "--seed", 3, "-o", out)
    assert (again.exit_code, again.stderr) == (1, f"Error: {out}: already exists; pass --force to replace it\n")
    assert run("mask", "random", files.base, "--keep-ratio", 0.1, "--seed", 3, "-o", out, "--force").exit_code == 0
    assert Mask.load(out) == made
    assert run("mask", "random", files.base, "--keep-ratio", 0.1, "--seed", 4, "-o", out, "--force").exit_code == 0
    assert Mask.load(out) != made
    assert run("mask", "random", files.base, "--keep-ratio", 1.5, "--seed", 3, "-o", out).exit_code == 2


def test_mask_diff_finds_the_moved_entries(files: Files) -> None:
    out = files.root / "diff.fishmask"
    result = run("mask", "diff", files.base, files.steps[1], "--keep-ratio", 0.5, "-o", out)
    assert result.exit_code == 0, result.output
    assert Mask.load(out) == make_mask()  # step 1 moved exactly the masked entries, so k stops at 9
    assert result.stdout == f"Wrote {out} ({out.stat().st_size:,} bytes): diff mask, k = 9 of 536 (1.6791%).\n"


# prune and rm -------------------------------------------------------------------------------------


def test_prune_keeps_the_last_steps(files: Files) -> None:
    store = make_store(files, saved=(1, 2, 3))
    assert run("prune", store, "--keep-last", 1, "--dry-run").stdout == "Would delete step(s) 1, 2; would keep 3.\n"
    assert CheckpointStore.open(store).steps == [1, 2, 3]
    assert run("prune", store, "--keep-last", 1).stdout == "Deleted step(s) 1, 2; kept 3.\n"
    assert CheckpointStore.open(store).steps == [3]
    nothing = run("prune", store, "--keep-last", 5)
    assert nothing.stdout == f"Nothing to delete: {store} has 1 step(s), keeping the last 5.\n"
    assert run("prune", store, "--keep-last", 0).exit_code == 2
    assert run("verify", store).exit_code == 0


def test_rm_deletes_only_if_every_step_exists(files: Files) -> None:
    store = make_store(files, saved=(1, 2))
    result = run("rm", store, 2, 7)
    assert (result.exit_code, result.stderr) == (
        1,
        f"Error: {store}: step(s) 7 not in the store (saved: 1, 2); nothing was deleted\n",
    )
    assert CheckpointStore.open(store).steps == [1, 2]
    assert run("rm", store, 2).stdout == f"Deleted step(s) 2 from {store}.\n"
    assert CheckpointStore.open(store).steps == [1]
    assert run("rm", store).exit_code == 2


# progress bars ------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_unless_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert list(progress([1, 2], description="reading", unit="step", total=2)) == [1, 2]
    assert "reading" in terminal.getvalue()
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    with click.Context(cli) as context:
        context.params["quiet"] = True
        assert list(progress([1, 2], description="reading", unit="step", total=2)) == [1, 2]
    assert quiet.getvalue() == ""


def test_quiet_is_accepted(files: Files) -> None:
    store = make_store(files, saved=(1,))
    assert run("--quiet", "ls", store).exit_code == 0
