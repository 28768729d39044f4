"""The package's structure: modules small enough to read, scripts that stand alone.

(Import cycles and the purity of clip/models/ are tests/test_imports.py's.)
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "clip"
MAX_MODULE_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module an `import` in `path` names (absolute and relative, anywhere in the file)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from clip.data import loader`
    return names


def test_no_module_of_the_package_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"split these by responsibility: {long}"


def test_scripts_never_import_the_tests():
    offenders = {p.name for p in (ROOT / "scripts").rglob("*.py") if any(i.split(".")[0] == "tests" for i in _imports(p))}
    assert not offenders, f"scripts importing tests/: {sorted(offenders)}"
