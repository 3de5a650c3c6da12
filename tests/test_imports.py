"""The repository's modules import one another without circles, and stay a size a reader can hold.

The import graph is read from the source (every `import` statement, also inside functions), over
the modules of the tree: the top-level ones, `quickstart_lib`, `scripts` and the benchmarks (which
import one another by file name, their folder first on `sys.path`). Tests are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("quickstart_lib", "scripts")
MAX_MODULE_LINES = 600


def repo_modules() -> dict[str, Path]:
    """Dotted module name -> file, for the modules other code can import."""
    modules = {p.stem: p for p in (*REPO.glob("*.py"), *(REPO / "benchmarks").glob("*.py"))}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The repository modules that module `name` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                # `from package import module` imports that module; `from module import name` the module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = repo_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"b", "c"}}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a2"}, "a2": {"b"}, "b": {"a2"}}) == ["a2", "b", "a2"]


def test_the_graph_sees_the_imports_of_the_tree():
    graph = import_graph()
    assert {"optimization", "stop_signals", "step_plan", "losses"} <= graph["causal_distiller"]
    assert "quickstart_lib.recipes.base" in graph["quickstart_lib.recipes"]  # absolute import in a package
    assert "scripts.extraction" in graph["scripts.extract"]
    assert "causal_distiller" not in graph["checkpointing"]
    assert {"gpu_check_report", "gpu_check_workspace"} <= graph["gpu_check"]


def test_no_module_imports_one_that_imports_it_back():
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize("name", sorted(repo_modules()))
def test_modules_stay_under_the_size_limit(name):
    lines = len(repo_modules()[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name}: {lines} lines; split it by concept (README: Layout)"
