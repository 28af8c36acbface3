"""The jobs API's decision modules stay pure: stdlib (no I/O, clocks, loops, randomness) and pydantic."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import jobs_api

# The one list of pure jobs_api modules; each may import only the others.
PURE_MODULES = ("attempts", "batches", "caching", "errors", "models", "openapi", "schemas", "webhooks")
ALLOWED_INTERNAL = frozenset(f"jobs_api.{m}" for m in PURE_MODULES)
# Third-party packages a pure module may use: data models only.
ALLOWED_THIRD_PARTY = frozenset({"pydantic"})
# Standard library modules that mean I/O, a clock, an event loop, the environment or global randomness.
FORBIDDEN_STDLIB = frozenset(
    {"asyncio", "os", "random", "selectors", "socket", "ssl", "subprocess", "threading", "time"}
)
PACKAGE_DIR = Path(jobs_api.__file__).parent


def imported_modules(source: str) -> list[tuple[str, int]]:
    """Every module named by an import statement anywhere in `source`, with its line."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative imports resolve inside the jobs_api package
                base = f"jobs_api.{base}".rstrip(".")
            if base == "jobs_api":  # `from jobs_api import x` may import a submodule
                found.extend((f"jobs_api.{alias.name}", node.lineno) for alias in node.names)
            else:
                found.append((base, node.lineno))
    return found


def impure_imports(source: str) -> list[str]:
    """The imports of `source` that a pure module may not have."""
    bad = []
    for name, line in imported_modules(source):
        top = name.split(".")[0]
        if top == "jobs_api":
            allowed = name in ALLOWED_INTERNAL
        elif top in sys.stdlib_module_names:
            allowed = top not in FORBIDDEN_STDLIB
        else:
            allowed = top in ALLOWED_THIRD_PARTY
        if not allowed:
            bad.append(f"{name} (line {line})")
    return bad


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_imports_only_the_stdlib_pydantic_and_pure_modules(module: str) -> None:
    source = (PACKAGE_DIR / f"{module}.py").read_text(encoding="utf-8")
    assert impure_imports(source) == [], f"jobs_api/{module}.py is not pure"


def test_purity_scan_catches_forbidden_imports() -> None:
    """The scan above would notice what it guards against."""
    sample = (
        "from __future__ import annotations\nimport random as r\nimport asyncio.events\n"
        "from time import monotonic\nimport aiohttp\nfrom redis.asyncio import Redis\n"
        "from . import runner\nfrom jobs_api import models\nfrom jobs_api.store.base import JobStore\n"
        "from pydantic import BaseModel\nimport dataclasses\n"
        "def f() -> None:\n    import prometheus_client\n"
    )
    assert impure_imports(sample) == [
        "random (line 2)",
        "asyncio.events (line 3)",
        "time (line 4)",
        "aiohttp (line 5)",
        "redis.asyncio (line 6)",
        "jobs_api.runner (line 7)",
        "jobs_api.store.base (line 9)",
        "prometheus_client (line 13)",
    ]
