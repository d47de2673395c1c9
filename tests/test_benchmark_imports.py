"""The benchmarks are never run as tests (they take minutes each), and they import
flywheel inside their functions: a renamed or moved name would only show when someone
runs one. Every flywheel name a benchmark imports, anywhere in it, must resolve."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).parent.parent / "benchmarks").glob("*.py"))


def _flywheel_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name or None for `import module`) of every flywheel import."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flywheel"):
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, alias.name, None)
                for alias in node.names
                if alias.name.startswith("flywheel")
            ]
    return found


def test_the_benchmarks_are_found() -> None:
    # the parametrized test below would pass on an empty folder or a parser that finds nothing
    assert len(BENCHMARKS) >= 5
    assert sum(len(_flywheel_imports(p)) for p in BENCHMARKS) > 20


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_every_flywheel_name_a_benchmark_imports_exists(path: Path) -> None:
    missing = []
    for line, module_name, name in _flywheel_imports(path):
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            missing.append(f"{path.name}:{line}: {module_name} ({err})")
            continue
        if name is not None and not hasattr(module, name):
            try:  # a submodule imported by name: `from flywheel.x import y`
                importlib.import_module(f"{module_name}.{name}")
            except ImportError:
                missing.append(f"{path.name}:{line}: {module_name}.{name}")
    assert not missing, "\n".join(missing)
