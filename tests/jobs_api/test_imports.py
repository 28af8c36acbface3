"""How jobs_api's modules import each other: at the top of the module only, and never in a circle."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import jobs_api

PACKAGE_DIR = Path(jobs_api.__file__).parent
TESTS_DIR = Path(__file__).parent
# Optional dependencies: importing them inside the function that can do without them is the point.
OPTIONAL = frozenset({"uvloop"})


def module_name(path: Path) -> str:
    """`jobs_api/store/redis.py` -> `jobs_api.store.redis`; a package's __init__ is the package."""
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(*roots: Path) -> Iterator[tuple[Path, ast.Module]]:
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imports_in_functions(tree: ast.Module) -> list[tuple[str, int]]:
    """Modules imported inside a function body (at any depth), with their lines."""
    in_functions = {
        node
        for func in ast.walk(tree)
        if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(func)
        if isinstance(node, ast.Import | ast.ImportFrom)
    }
    found: list[tuple[str, int]] = []
    for node in sorted(in_functions, key=lambda n: (n.lineno, n.col_offset)):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        else:
            found.append(("." * node.level + (node.module or ""), node.lineno))
    return found


def jobs_api_imports(name: str, is_package: bool, tree: ast.Module, modules: set[str]) -> set[str]:
    """The jobs_api modules the module `name` imports (a `from a import b` of a submodule is b)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}".rstrip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    """jobs_api module -> the jobs_api modules it imports.

    A submodule's import also runs its package's __init__ first; that is no edge here, because
    Python completes such an import as long as the submodule takes nothing from the package's
    __init__ itself, and that would be an edge.
    """
    parsed = {module_name(path): (path.name == "__init__.py", tree) for path, tree in sources(PACKAGE_DIR)}
    modules = set(parsed)
    return {
        name: jobs_api_imports(name, is_package, tree, modules) - {name}
        for name, (is_package, tree) in parsed.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path that ends where it starts, or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph[node]):
            cycle = visit(target)
            if cycle is not None:
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle is not None:
            return cycle
    return None


def test_no_import_inside_a_function_except_optional_dependencies() -> None:
    bad = [
        f"{path.relative_to(PACKAGE_DIR.parent)}:{line} imports {name}"
        for path, tree in sources(PACKAGE_DIR, TESTS_DIR)
        for name, line in imports_in_functions(tree)
        if name.split(".")[0] not in OPTIONAL
    ]
    assert bad == []


def test_jobs_api_modules_import_each_other_without_a_circle() -> None:
    graph = import_graph()
    assert {"jobs_api.app", "jobs_api.routes", "jobs_api.keys", "jobs_api.store.redis"} <= set(graph)
    assert find_cycle(graph) is None


def test_import_scans_catch_what_they_guard_against() -> None:
    """The scans above would notice a function-level import and a circle."""
    tree = ast.parse(
        "import os\n"
        "def f():\n"
        "    import json\n"
        "    class C:\n"
        "        def g(self):\n"
        "            from . import x\n"
    )
    assert imports_in_functions(tree) == [("json", 3), (".", 6)]
    sample = ast.parse("from . import keys\nfrom jobs_api.store import base\nimport jobs_api.models\n")
    modules = {"jobs_api.keys", "jobs_api.store", "jobs_api.store.base", "jobs_api.models"}
    assert jobs_api_imports("jobs_api.routes", False, sample, modules) == modules
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
