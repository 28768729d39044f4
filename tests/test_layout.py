"""The package's structure: model code stays pure, no import cycles, scripts stand alone.

Static checks over the source (every `import` statement, function-local ones included, since a
cycle hidden inside a function is still a cycle), plus one fresh interpreter per models/ module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
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


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            # `import clip.data.loader` also runs clip/__init__ and clip/data/__init__, but an edge to
            # a package's __init__ from inside that package is the normal way of importing siblings.
            if imported in modules and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done, on_path = set(), []

    def visit(node: str) -> list[str] | None:
        if node in on_path:
            return on_path[on_path.index(node):] + [node]
        if node in done:
            return None
        on_path.append(node)
        for target in sorted(graph[node]):
            # A module importing its own package's __init__ (or an ancestor's) is not a cycle of modules.
            if node.startswith(target + "."):
                continue
            cycle = visit(target)
            if cycle:
                return cycle
        on_path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def test_no_import_cycle_between_modules_of_the_package():
    graph = {name: {t for t in targets if not t.endswith("__init__")} for name, targets in _graph().items()}
    # Package __init__ files re-export their members; edges into them are edges into those members.
    packages = {name for name in graph if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()}
    for name in graph:
        graph[name] = {t for t in graph[name] if t not in packages}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_model_code_imports_nothing_distributed_hydra_or_wandb():
    modules = sorted(_module_name(p) for p in (PACKAGE / "models").glob("*.py"))
    forbidden = ("clip.distributed", "clip.train", "clip.parallelize", "hydra", "omegaconf", "wandb")
    code = (f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; "
            f"print(sorted(m for m in sys.modules if m.startswith({forbidden!r})))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]", f"clip.models imports {result.stdout.strip()}"


def test_no_module_of_the_package_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"split these by responsibility: {long}"


def test_scripts_never_import_the_tests():
    offenders = {p.name for p in (ROOT / "scripts").rglob("*.py") if any(i.split(".")[0] == "tests" for i in _imports(p))}
    assert not offenders, f"scripts importing tests/: {sorted(offenders)}"
