"""The code keeps the shape docs/architecture.md draws: layers import downward only, the CLI uses the public API."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "fishckpt"

# Lower numbers are lower layers. A module may import modules of lower layers, and modules of its
# own package (subpackage); never a higher layer, and never a sibling package of the same layer.
LAYERS = {
    "fishckpt.errors": 0,
    "fishckpt.format": 1,
    "fishckpt.storage": 1,
    "fishckpt.statefiles": 2,
    "fishckpt.mask": 3,
    "fishckpt.sharding": 3,
    "fishckpt.store": 4,
    "fishckpt.method": 4,
    "fishckpt.diff": 4,
    "fishckpt.distributed": 4,
    "fishckpt.train": 5,
    "fishckpt.hf": 6,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit(module: str) -> str | None:
    """The layered unit a module belongs to: its subpackage, or itself."""
    for unit in LAYERS:
        if module == unit or module.startswith(unit + "."):
            return unit
    return None


def _imports(path: Path) -> list[str]:
    """Absolute names of the fishckpt modules a file imports (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append(target)
            found.extend(f"{target}.{alias.name}" for alias in node.names)
    return [name for name in found if name == "fishckpt" or name.startswith("fishckpt.")]


LIBRARY_FILES = sorted(path for path in LIBRARY.rglob("*.py") if path.name != "__main__.py")


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_down_the_layers(path: Path) -> None:
    module = _module_name(path)
    unit = _unit(module)
    if unit is None:  # fishckpt/__init__.py: the public face may import anything
        assert module == "fishckpt", f"{module} is in no layer; add it to LAYERS and to docs/architecture.md"
        return
    for imported in _imports(path):
        target = _unit(imported)
        if target is None or target == unit:
            assert imported != "fishckpt", f"{module} imports the package's face; import the module itself"
            continue
        assert LAYERS[target] < LAYERS[unit], (
            f"{module} (layer {LAYERS[unit]}) imports {imported} (layer {LAYERS[target]}): imports must run down"
        )


@pytest.mark.parametrize("path", sorted((ROOT / "cli").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_cli_uses_only_the_public_api(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("fishckpt"):
            assert node.module == "fishckpt", f"{path.name} imports {node.module}: use `from fishckpt import ...`"
            assert all(not alias.name.startswith("_") for alias in node.names), f"{path.name}: private name"
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name == "fishckpt" or not alias.name.startswith("fishckpt"), path.name
    import fishckpt

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "fishckpt":
            for alias in node.names:
                assert alias.name in fishckpt.__all__, f"{path.name} imports {alias.name}, which __all__ does not name"


def test_every_package_is_shipped() -> None:
    """A subpackage missing from pyproject.toml would be missing from the wheel."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {_module_name(init) for init in LIBRARY.rglob("__init__.py")}
    assert packages <= listed, f"add {sorted(packages - listed)} to [tool.setuptools] packages"
