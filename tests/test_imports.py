"""The layout's import rules (README "Module map"): data flows one way, so each rule is checked on the source.

Every import counts, also one inside a function: a function-level import must not hide a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from slapcli.methods.registry import REGISTRY

PACKAGE = Path(__file__).resolve().parent.parent / "slapcli"
STAGES = ("slapcli.stages", "slapcli.replay", "slapcli.methods", "slapcli.proxy", "slapcli.report", "slapcli.pipeline")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The slapcli modules `name` imports anywhere in its source (a package's own __init__, which Python runs
    before any of its modules, counts only where it is imported by name: `from slapcli.proxy import ...`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from slapcli import io` names a module
    return {m for m in found if m in MODULES and m not in ("slapcli", name)}


GRAPH = {name: imports_of(name) for name in MODULES}
# The registry imports each method's module by name when it runs: edges all the same.
GRAPH["slapcli.methods.registry"] |= {e.implementation.partition(":")[0] for e in REGISTRY}


def under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_graph_sees_the_imports():
    # The checks below are only as good as the parsing: a few imports known to exist must be found.
    assert "slapcli.methods.registry" in GRAPH["slapcli.stages.select"]
    assert "slapcli.proxy.split" in GRAPH["slapcli.replay"]
    assert "slapcli.proxy.chat" in GRAPH["slapcli.proxy"]  # the package's re-exports
    assert "slapcli.stages.embed" in GRAPH["slapcli.cli"]  # inside a command
    assert "slapcli.methods.slap" in GRAPH["slapcli.methods.registry"]  # by name


def test_no_module_but_the_entry_point_imports_the_cli():
    assert sorted(m for m, deps in GRAPH.items() if "slapcli.cli" in deps) == ["slapcli.__main__"]


def test_io_imports_neither_models_nor_stages():
    for name, deps in GRAPH.items():
        if under(name, ("slapcli.io",)):
            bad = sorted(d for d in deps if under(d, ("slapcli.models", "slapcli.cli", *STAGES)))
            assert not bad, f"{name} imports {bad}"


def test_select_and_the_replay_do_not_import_each_other():
    assert "slapcli.replay" not in GRAPH["slapcli.stages.select"]
    assert "slapcli.stages.select" not in GRAPH["slapcli.replay"]


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep):], dep] if dep in path else [name, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("module", ["slapcli.cli", "slapcli.config", "slapcli.methods.registry", "slapcli.budgets"])
def test_light_modules_load_no_numeric_library(module):
    # `slap --help` imports the CLI alone: the stages (torch, numpy, pyarrow) load when a command runs.
    heavy = ("torch", "numpy", "pyarrow", "transformers")
    code = f"import sys, {module}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
