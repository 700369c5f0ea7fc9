"""One direction of flow: io -> engines -> api / cli -> gui. Read from the source, so a new import that runs up
the layers (or a dock reaching into an engine) fails here rather than in a code review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "spatial_deconv_gui"
LAYER = {"io": 0, "engines": 1, "api": 2, "perturb_api": 2, "cli": 2, "perturb_cli": 2, "gui": 3}


def _layer_of(module: str) -> int | None:
    return LAYER.get(module.split(".")[0])


def _imports(path: Path) -> list[str]:
    """Every spatial_deconv_gui module a file imports, at any depth (lazy imports included), as a dotted name
    relative to the package."""
    rel = path.relative_to(PACKAGE).with_suffix("").parts
    package = list(rel[:-1]) if rel[-1] != "__init__" else list(rel[:-1])
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {  # `if TYPE_CHECKING:` imports name types for annotations and never run
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
        for n in ast.walk(block)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                names = [name] if node.module else [".".join(base + [a.name]) for a in node.names]
                found += names
            elif node.module and node.module.startswith("spatial_deconv_gui"):
                found.append(node.module.removeprefix("spatial_deconv_gui").lstrip("."))
        elif isinstance(node, ast.Import):
            found += [
                a.name.removeprefix("spatial_deconv_gui").lstrip(".")
                for a in node.names
                if a.name.startswith("spatial_deconv_gui")
            ]
    return [f for f in found if f]


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if _layer_of(".".join(p.relative_to(PACKAGE).parts)) is not None)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_runs_up_the_layers(path):
    own = _layer_of(".".join(path.relative_to(PACKAGE).parts))
    upward = [m for m in _imports(path) if (_layer_of(m) or 0) > own]
    assert not upward, f"{path.relative_to(PACKAGE)} imports {upward} from a layer above it"


def test_the_gui_imports_no_engine():
    for path in (PACKAGE / "gui").rglob("*.py"):
        engines = [m for m in _imports(path) if m.startswith("engines")]
        assert not engines, f"{path.relative_to(PACKAGE)} imports {engines}: the GUI goes through the API"


def test_the_scan_sees_imports_of_every_kind():
    assert "gui.demo" not in _imports(PACKAGE / "cli.py")
    assert "io.errors" in _imports(PACKAGE / "cli.py")
    assert any(m.startswith("engines.perturb") for m in _imports(PACKAGE / "perturb_api.py"))
    assert "api" in _imports(PACKAGE / "gui" / "docks" / "deconvolution.py")
