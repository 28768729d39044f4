"""The package's import graph: no circle (function-local imports count, so none can hide one), and the
model code reaches nothing distributed, Hydra or wandb."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "clip"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """{module: modules it names in any import statement, at module level or inside a function}.

    `from clip.models import CLIP` names `clip.models`; `from clip import clip` only the module `clip.clip`;
    imports under `if TYPE_CHECKING:` are skipped, since they never run.
    """
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        type_checking = {
            id(child)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
            for child in ast.walk(node)
        }
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(tree):
            if id(node) in type_checking:
                continue
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
                submodules = {f"{base}.{alias.name}" for alias in node.names} & modules.keys()
                if len(submodules) < len(node.names):  # `from pkg import sub` imports sub, not a name of pkg
                    edges.add(base)
                edges.update(submodules)
        graph[name] = edges
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for target in graph.get(stack.pop(), ()):
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def test_the_package_has_no_import_circle():
    graph = _import_graph()
    circles = sorted(name for name in graph if name in _reachable(graph, name))
    assert not circles, f"modules that import themselves through others: {circles}"


@pytest.mark.parametrize("module", ["clip.models.weights", "clip.tokenizer"])
def test_the_former_weights_tokenizer_circle_is_gone(module):
    # weights.py and tokenizer.py imported each other (hidden by a function-local import) until the
    # export format got its own module; a future edit that closes the circle again fails here and above.
    graph = _import_graph()
    other = {"clip.models.weights": "clip.tokenizer", "clip.tokenizer": "clip.models.weights"}[module]
    assert not ({module} & _reachable(graph, other) and {other} & _reachable(graph, module))


def test_models_import_nothing_distributed_hydra_or_wandb():
    graph = _import_graph()
    forbidden = ("clip.distributed", "clip.train", "hydra", "omegaconf", "wandb")
    for module in (name for name in graph if name.startswith("clip.models")):
        reached = _reachable(graph, module) | {module}
        bad = sorted(name for name in reached if name.split(".")[0] in forbidden or name.startswith(forbidden))
        assert not bad, f"{module} reaches {bad}"


def test_the_graph_sees_a_function_local_import(tmp_path, monkeypatch):
    """The check can fail: a circle through an import inside a function is found."""
    package = tmp_path / "clip"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from clip.b import g\n")
    (package / "b.py").write_text("def g():\n    from clip.a import f\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    graph = _import_graph()
    assert "clip.a" in _reachable(graph, "clip.a")
