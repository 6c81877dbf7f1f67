"""The small things of issue 9, each held by a test named after it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cli_support import Files, make_files, make_store, run

from fishckpt import CheckpointStore, Mask


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return make_files(tmp_path)


@pytest.mark.parametrize("step", ["\uff11\uff12", "12 ", " 12", "+12", "1_2", "\u0663"])  # full-width 12, Arabic 3
def test_steps_are_ascii_digits_only(files: Files, step: str) -> None:
    store = make_store(files, saved=(1,))
    result = run("restore", store, step, "-o", files.root / "out.safetensors")
    assert result.exit_code == 2
    assert "is not a step number (a non-negative integer in ASCII digits)" in result.stderr
    assert not (files.root / "out.safetensors").exists()


def test_ls_on_a_file_says_it_is_a_file_not_a_store(files: Files) -> None:
    result = run("ls", files.base)
    message = f"Error: {files.base}: is a file, not a store; give the store's folder\n"
    assert (result.exit_code, result.stderr) == (1, message)


def test_ls_on_a_missing_folder_says_to_run_fishckpt_init(files: Files) -> None:
    missing = files.root / "nowhere"
    result = run("ls", missing)
    assert result.exit_code == 1
    assert result.stderr == f"Error: {missing}: no such store folder; create one with `fishckpt init`\n"


def test_init_of_the_current_folder(files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    here = files.root / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    result = run("init", ".", "--base", files.base, "--mask", files.mask)
    assert result.exit_code == 0, result.output
    assert (here / "manifest.safetensors").is_file()
    assert sorted(CheckpointStore.open(here).tensor_names) == ["b", "count", "flag", "h", "w"]


def test_report_plot_of_an_empty_store_says_where_it_wrote(files: Files) -> None:
    pytest.importorskip("matplotlib")
    store = make_store(files)
    chart = files.root / "empty.png"
    result = run("report", store, "--plot", chart)
    assert result.exit_code == 0
    assert result.stdout.endswith(f"Wrote the chart to {chart}.\n")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_plot_labels_major_ticks_only(files: Files) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from fishckpt_cli.commands import report

    store = make_store(files, saved=(1, 2, 3))
    made: list[Figure] = []
    original = Figure.savefig

    def keep(self: Figure, *args: object, **kwargs: object) -> None:
        made.append(self)
        original(self, *args, **kwargs)

    Figure.savefig = keep  # type: ignore[method-assign]
    try:
        report._chart_png(CheckpointStore.open(store).report())
    finally:
        Figure.savefig = original  # type: ignore[method-assign]
    [figure] = made
    figure.canvas.draw()
    axis = figure.axes[0].yaxis
    minor = [label.get_text() for label in axis.get_ticklabels(minor=True)]
    major = [label.get_text() for label in axis.get_ticklabels() if label.get_text()]
    assert minor and not any(minor), "minor ticks carry no labels"
    assert major and all(text.endswith("B") for text in major), major


def test_a_store_with_complex32_prints_no_experimental_warning(tmp_path: Path) -> None:
    """torch warns "ComplexHalf support is experimental" on first use of complex32; the CLI must not pass it on."""
    base = {"z": torch.zeros(4, dtype=torch.complex32), "w": torch.zeros(4)}
    store = CheckpointStore.create(tmp_path / "store", base, Mask.from_indices({"w": [1]}, {"w": (4,)}))
    store.save({name: tensor.clone() for name, tensor in base.items()}, 0)
    for command in (["ls"], ["verify"], ["restore", "0", "-o", str(tmp_path / "x.pt"), "--format", "pt"]):
        result = subprocess.run(
            [sys.executable, "-m", "fishckpt", command[0], str(tmp_path / "store"), *command[1:]],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONWARNINGS": "default"},
        )
        assert result.returncode == 0, result.stderr
        assert "experimental" not in result.stderr, result.stderr


NO_TORCH = """
import sys
class Block:
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
from fishckpt_cli.main import cli
cli(sys.argv[1:], prog_name="fishckpt", standalone_mode=False)
assert "torch" not in sys.modules
"""


@pytest.mark.parametrize("command", [["--version"], ["ls"], ["report"], ["ls", "--json"]])
def test_ls_report_and_version_run_without_torch(files: Files, command: list[str]) -> None:
    store = make_store(files, saved=(1,))
    arguments = command if command == ["--version"] else [command[0], str(store), *command[1:]]
    result = subprocess.run([sys.executable, "-c", NO_TORCH, *arguments], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    if command == ["--version"]:
        assert result.stdout.startswith("fishckpt, version ")
    else:
        assert "1" in result.stdout


def test_the_outside_mask_warning_is_short_on_many_tensors(tmp_path: Path) -> None:
    base = {f"layer.{i}.weight": torch.zeros(8) for i in range(300)}
    mask = Mask.from_indices({"layer.0.weight": [0]}, {"layer.0.weight": (8,)})
    store = CheckpointStore.create(tmp_path / "store", base, mask)
    moved = {name: tensor + 1.0 for name, tensor in base.items()}
    with pytest.warns(UserWarning) as caught:
        info = store.save(moved, 1)
    [warning] = [w for w in caught if "outside the mask" in str(w.message)]
    text = str(warning.message)
    assert len(text) < 600, len(text)
    assert "300 tensors" in text and "and 297 more" in text and "SaveInfo.changed_outside_mask" in text
    assert len(info.changed_outside_mask) == 300
