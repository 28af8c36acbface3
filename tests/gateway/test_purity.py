"""The decision modules stay pure: no I/O, clocks, event loops or global randomness.

Pure means every module under gateway/policy/ (found by scanning the folder, so a new module is
covered the day it is added), the header, target and proxy (egress) decisions of gateway/http/,
and the stream reading of gateway/stream/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gateway

PACKAGE_DIR = Path(gateway.__file__).parent
POLICY_DIR = PACKAGE_DIR / "policy"
# Dotted module names, e.g. "gateway.policy.retry".
PURE_MODULES = tuple(
    sorted(
        ".".join(("gateway", *p.relative_to(PACKAGE_DIR).with_suffix("").parts))
        for p in POLICY_DIR.glob("*.py")
        if p.name != "__init__.py"
    )
) + (
    "gateway.http.egress",
    "gateway.http.headers",
    "gateway.http.target",
    "gateway.stream.events",
    "gateway.stream.continuation",
    # the engine simulator's model (gateway/testing/engine/)
    "gateway.testing.engine.config",
    "gateway.testing.engine.kv_cache",
    "gateway.testing.engine.orca",
    "gateway.testing.engine.outputs",
    "gateway.testing.engine.protocol",
    "gateway.testing.engine.scheduler",
    "gateway.testing.engine.tokens",
)
FORBIDDEN = frozenset({"aiohttp", "asyncio", "time", "prometheus_client", "redis", "aiosqlite", "socket"})
# Gateway modules a pure module may import: the other pure ones, and config for settings types.
ALLOWED_INTERNAL = frozenset(PURE_MODULES) | {"gateway.config", "gateway.policy"}


def parse(module: str) -> ast.Module:
    path = PACKAGE_DIR.joinpath(*module.split(".")[1:]).with_suffix(".py")
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_policy_folder_is_scanned() -> None:
    """The scan finds the policy modules (a moved folder must not leave it scanning nothing)."""
    assert {"gateway.policy.retry", "gateway.policy.upstreams", "gateway.policy.budget"} <= set(PURE_MODULES)


def imported_modules(tree: ast.Module) -> list[tuple[str, int]]:
    """Every module named by an import statement anywhere in the file, with its line."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative imports: resolved as if from a module of the gateway package
                base = f"gateway.{base}".rstrip(".")
            if base == "gateway":  # `from gateway import x` may import a submodule
                found.extend((f"gateway.{alias.name}", node.lineno) for alias in node.names)
            else:
                found.append((base, node.lineno))
    return found


def random_aliases(tree: ast.Module) -> set[str]:
    """Local names bound to the `random` module itself."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "random":
                    names.add(alias.asname or "random")
    return names


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_imports_no_io_clock_or_loop(module: str) -> None:
    bad = [
        f"{name} (line {line})"
        for name, line in imported_modules(parse(module))
        if name.split(".")[0] in FORBIDDEN
    ]
    assert bad == [], f"{module} imports {bad}"


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_imports_only_pure_gateway_modules(module: str) -> None:
    bad = [
        f"{name} (line {line})"
        for name, line in imported_modules(parse(module))
        if name.split(".")[0] == "gateway" and name not in ALLOWED_INTERNAL
    ]
    assert bad == [], f"{module} imports impure gateway modules {bad}"


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_uses_random_only_for_random_type(module: str) -> None:
    tree = parse(module)
    aliases = random_aliases(tree)
    bad: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "random":
            bad.extend(
                f"from random import {a.name} (line {node.lineno})" for a in node.names if a.name != "Random"
            )
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr != "Random"
        ):
            bad.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
    assert bad == [], f"{module} uses module-level randomness: {bad}"


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_never_constructs_its_own_rng(module: str) -> None:
    """random.Random may appear in annotations, but a pure module never builds one itself."""
    tree = parse(module)
    aliases = random_aliases(tree)
    calls = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in aliases
    ] + [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in {"Random", "SystemRandom"}
    ]
    assert calls == [], f"{module} calls into random at lines {calls}"


def test_purity_scan_catches_forbidden_usage() -> None:
    """The scanners above would notice the things they guard against."""
    sample = ast.parse(
        "import random as r\nimport asyncio.events\nfrom time import monotonic\n"
        "from . import cli\nfrom gateway import proxy\nfrom .admin import x\n"
        "x = r.random()\ny: r.Random\n"
    )
    names = [n for n, _ in imported_modules(sample)]
    assert {"asyncio.events", "time", "gateway.cli", "gateway.proxy", "gateway.admin"} <= set(names)
    assert random_aliases(sample) == {"r"}
    attrs = [
        n.attr
        for n in ast.walk(sample)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "r"
    ]
    assert sorted(attrs) == ["Random", "random"]
