"""The methods know nothing of the embedded world: nothing under synthesis/,
reward_models/, alignment/, selectors/ or decoders/ imports flywheel.world, at module
level or inside a function. The world implements the methods' protocols in
flywheel/world/, and flows/ binds it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import flywheel

METHOD_PACKAGES = ("synthesis", "reward_models", "alignment", "selectors", "decoders")
ROOT = Path(flywheel.__file__).parent


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
            if node.module == "flywheel":
                found += [(node.lineno, f"flywheel.{a.name}") for a in node.names]
    return found


def test_no_method_module_imports_the_world():
    modules = [p for pkg in METHOD_PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(modules) >= 20  # the rule looks at the real tree
    offending = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in modules
        for line, name in _imports(path)
        if name == "flywheel.world" or name.startswith("flywheel.world.")
    ]
    assert not offending, "\n".join(offending)


def test_importing_every_method_loads_no_world_module():
    packages = ", ".join(f"flywheel.{p}" for p in METHOD_PACKAGES)
    code = (
        "import importlib, pkgutil, sys\n"
        f"import {packages}\n"
        f"for pkg in ({packages},):\n"
        "    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('flywheel.world')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# The store's modules in the order they build on each other: each imports only those
# before it (anywhere in the file), so there is no import circle and none is hidden in
# a function; `publish` is the one module that writes.
STORE_LAYERS = (
    "locks",
    "naming",
    "lake",
    "catalog",
    "datasets",
    "models",
    "publish",
    "importing",
    "migrate",
    "checkpoint",
)


def _store_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "flywheel.store":
            found |= {alias.name for alias in node.names}  # `from flywheel.store import lake`
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flywheel.store."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {
                a.name.split(".")[2] for a in node.names if a.name.startswith("flywheel.store.")
            }
    return found


def test_store_modules_import_only_the_layers_below_them():
    modules = {p.stem for p in (ROOT / "store").glob("*.py")} - {"__init__"}
    assert modules == set(STORE_LAYERS), "add the new store module to STORE_LAYERS"
    offending = [
        f"store/{module}.py imports {imported}"
        for rank, module in enumerate(STORE_LAYERS)
        for imported in _store_imports(ROOT / "store" / f"{module}.py")
        if imported not in STORE_LAYERS[:rank]
    ]
    assert not offending, "\n".join(offending)


def test_store_modules_never_list_the_lakes_tables():
    """A listing makes DuckLake load every table of the snapshot (about 1 ms a table), so
    a store that lists on each write slows down with every version it holds; the store
    looks tables up by name and lists versions from `versions`."""
    listings = ("duckdb_tables(", "information_schema.tables", "show tables")
    offending = [
        f"store/{path.name}: {listing}"
        for path in sorted((ROOT / "store").glob("*.py"))
        for listing in listings
        if listing in path.read_text().lower()
    ]
    assert not offending, "\n".join(offending)
