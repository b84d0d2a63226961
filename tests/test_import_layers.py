"""The package's layering: each folder of qtool/ imports only folders of lower layers (its own folder aside).
Every import counts, including those inside functions, so a cycle cannot hide in a late import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qtool"
# Bottom to top; folders that share a layer must not import each other.
LAYERS = (
    ("core",),
    ("formats",),
    ("config",),
    ("kernels",),
    ("checkpoints", "models", "data"),
    ("quant", "eval", "runtime", "validate", "finetune"),
    ("convert", "serve", "batch"),
    ("cli",),
)
LAYER_OF = {folder: rank for rank, folders in enumerate(LAYERS) for folder in folders}


def qtool_imports(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, dotted module) of every qtool module a file imports, relative imports resolved."""
    package = path.relative_to(root.parent).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ((node.module,) if node.module else ()))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # `from qtool import x` / `from qtool.kernels import y` name folders or modules in the names.
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names if module.count(".") < 1]
    return [(line, name) for line, name in found if name == "qtool" or name.startswith("qtool.")]


def layering_violations(root: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if len(parts) < 2:
            continue  # qtool/__init__.py
        folder = parts[0]
        if folder not in LAYER_OF:
            problems.append(f"{path.relative_to(root.parent)}: folder {folder!r} has no layer in LAYERS")
            continue
        for line, module in qtool_imports(path, root):
            target = module.split(".")[1] if "." in module else ""
            if target == folder or target == "":
                continue
            if target not in LAYER_OF:
                continue  # a module directly under qtool/ (none today) or a name that is not a folder
            if LAYER_OF[target] >= LAYER_OF[folder]:
                way = "sideways" if LAYER_OF[target] == LAYER_OF[folder] else "upward"
                problems.append(f"{path.relative_to(root.parent)}:{line} imports {module} ({way}: {folder} -> {target})")
    return problems


def test_every_import_points_down_the_layers():
    assert layering_violations() == []


def test_the_check_sees_upward_sideways_and_late_imports(tmp_path: Path):
    root = tmp_path / "qtool"
    for folder in ("core", "formats", "quant", "eval"):
        (root / folder).mkdir(parents=True)
    (root / "core" / "errors.py").write_text("from qtool.formats import gptq\n")
    (root / "quant" / "pipeline.py").write_text("def f():\n    from qtool.eval.perplexity import ppl\n")
    (root / "eval" / "ok.py").write_text("from qtool.core.errors import QtoolError\nfrom . import perplexity\n")
    (root / "formats" / "rel.py").write_text("from ..quant import pipeline\n")
    problems = layering_violations(root)
    assert len(problems) == 3
    assert any("core -> formats" in p and "upward" in p for p in problems)
    assert any("quant -> eval" in p and "sideways" in p for p in problems)
    assert any("formats -> quant" in p for p in problems)


@pytest.mark.parametrize("folder", sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"))
def test_every_folder_has_a_layer(folder: str):
    assert folder in LAYER_OF
