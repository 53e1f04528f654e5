"""scripts/stdlib_pool.py: the pool of unseen data built from a library's documented functions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import stdlib_pool as sp

LIBRARY = '''"""A module."""


def public(a, b=2):
    """Add two numbers and return the sum of both of them.

    More text that explains the details of the addition at length, for the docs answer.
    """
    total = a + b
    total = total * 1
    return total


def _private(x):
    """Private helper that nobody asks about in an instruction pool."""
    y = x
    y = y + 1
    return y


def short(x):
    """Too short a body."""
    return x


class Box:
    """A box."""

    def open(self, force=False):
        """Open the box, forcing the lid when asked to, and report whether it opened."""
        if force:
            self.lid = None
        self.opened = True
        return self.opened
'''


def write_library(root: Path) -> None:
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text(LIBRARY)
    (root / "test").mkdir()
    (root / "test" / "test_pkg.py").write_text(LIBRARY)  # a test suite: skipped
    (root / "_private.py").write_text(LIBRARY)  # a private module: skipped
    (root / "broken.py").write_text("def (:\n")  # not Python: skipped, not an error


def test_functions_are_public_documented_and_sized(tmp_path: Path) -> None:
    write_library(tmp_path)
    assert [p.name for p in sp.library_files(tmp_path)] == ["broken.py", "__init__.py"]
    fns = list(sp.functions_of(LIBRARY, "pkg", sp.PoolLimits()))
    assert [f.qualname for f in fns] == ["public", "Box.open"]
    public = fns[0]
    assert public.signature == "public(a, b=2)" and public.module == "pkg"
    # The answer is the function without its docstring; the docstring is cleaned of its indentation.
    assert public.body == "def public(a, b=2):\n    total = a + b\n    total = total * 1\n    return total"
    assert public.docstring.startswith("Add two numbers") and "\n    " not in public.docstring
    assert sp.summary(public.docstring) == "Add two numbers and return the sum of both of them."


def test_each_function_lands_in_one_domain_and_the_pool_is_the_same_every_time(tmp_path: Path) -> None:
    write_library(tmp_path)
    limits = sp.PoolLimits(min_doc_chars=10)
    rows = sp.build_pool(tmp_path, limits, "python3.11.7")
    assert sp.build_pool(tmp_path, limits, "python3.11.7") == rows
    fns = {f.qualname: f for f in sp.functions_of(LIBRARY, "pkg", limits)}
    assert len(rows) == 2 and {r["source"] for r in rows} == {f"python3.11.7/pkg:{f.line}" for f in fns.values()}
    for row in rows:
        fn = next(f for f in fns.values() if row["source"].endswith(f":{f.line}"))
        assert row["domain"] == sp.domain_of(fn)
        if row["domain"] == "code":
            assert row["output"] == fn.body and sp.summary(fn.docstring) in row["instruction"]
        else:
            assert row["output"] == fn.docstring and f"pkg.{fn.qualname}" in row["instruction"]


def test_main_writes_the_pool_and_refuses_a_folder_without_functions(tmp_path: Path) -> None:
    write_library(tmp_path / "lib")
    out = tmp_path / "out" / "pool.jsonl"
    assert sp.main(["-o", str(out), "--root", str(tmp_path / "lib")]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(set(r) == {"instruction", "input", "output", "domain", "source"} for r in rows)
    assert not (tmp_path / "out" / "pool.jsonl.tmp").exists()
    (tmp_path / "empty").mkdir()
    try:
        sp.main(["-o", str(tmp_path / "none.jsonl"), "--root", str(tmp_path / "empty")])
    except SystemExit as e:
        assert "no documented functions" in str(e)
    else:
        raise AssertionError("an empty library should stop the script")
    assert not (tmp_path / "none.jsonl").exists()


def test_a_package_root_names_its_modules_from_the_package(tmp_path: Path) -> None:
    write_library(tmp_path / "lib")
    assert sp.module_name(tmp_path / "lib", tmp_path / "lib" / "pkg" / "__init__.py") == "pkg"
    package = tmp_path / "lib" / "pkg"
    (package / "sub.py").write_text(LIBRARY)
    assert sp.module_name(package, package / "sub.py") == "pkg.sub"
    assert sp.module_name(package, package / "__init__.py") == "pkg"

