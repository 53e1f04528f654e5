"""The benchmarks' layout (issue 18): the scripts are commands over scripts/benchlib and import no other benchmark
script, and inside benchlib data flows one way (each module imports only the modules listed above it)."""

from __future__ import annotations

import ast
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
# as benchlib/__init__.py lists them
ORDER = ["common", "report", "data", "synthetic", "stages", "trainer", "influence"]


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_benchmark_commands_import_the_library_not_each_other() -> None:
    for name in ("benchmark_quality", "benchmark_bound", "benchmark_regimes", "benchmark_cost", "benchmark_ray",
                 "benchmark_perf", "compare_heldout"):
        mods = imported(SCRIPTS / f"{name}.py")
        assert not {m for m in mods if m.startswith("benchmark_")}, name
        assert any(m.startswith("benchlib") for m in mods), name


def test_benchlib_modules_import_only_those_above_them() -> None:
    assert sorted(p.stem for p in (SCRIPTS / "benchlib").glob("*.py") if p.stem != "__init__") == sorted(ORDER)
    for i, name in enumerate(ORDER):
        mods = imported(SCRIPTS / "benchlib" / f"{name}.py")
        used = {m.split(".")[1] for m in mods if m.startswith("benchlib.")}
        assert used <= set(ORDER[:i]), (name, used - set(ORDER[:i]))
        assert not {m for m in mods if m.startswith("benchmark_")}, name
