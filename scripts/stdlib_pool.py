"""An instruction pool this project never developed on, built from the Python standard library on this machine.

Every benchmark so far drew on ../shared/data (Alpaca, CodeAlpaca). To check a claim on other data, this writes a
two-domain JSON Lines file (Alpaca layout, a `domain` field) from the documented public functions and methods of
the standard library's own source:

- `code`: "Write `name(args)` ...: <the docstring's first paragraph>" -> the function's source without its docstring;
- `docs`: "Explain what `module.name` does." -> the function's docstring.

Each function lands in one domain only (by a hash of its qualified name), so no answer of one domain is the prompt
of the other. Functions too short, too long or with a docstring of a few words are skipped, and so are test
suites, demos and GUI packages. The output depends only on the library's release (written at the head of each
row's `source`; files are read in sorted path order), so the same interpreter or package gives the same bytes.

`--root` takes any other library's source folder instead (e.g. an installed package: `--root
.venv/lib/python3.11/site-packages/torch`), a second source of rows the project never developed on.

Usage:
    .venv/bin/python scripts/stdlib_pool.py -o work/stdlib_pool.jsonl
    .venv/bin/python scripts/benchmark_regimes.py noisy --train work/stdlib_pool.jsonl --workdir work/noisy_std_d0
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import json
import sys
import sysconfig
import textwrap
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Packages whose code is tests, demos, GUI glue or vendored data rather than library code a user would ask about.
SKIPPED_PARTS = frozenset({"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip",
                           "site-packages", "dist-packages", "__pycache__", "pydoc_data", "encodings", "venv"})


@dataclass(frozen=True)
class PoolLimits:
    """What makes a function a usable row: enough prose to ask about, an answer a small model can hold."""

    min_body_lines: int = 3
    max_body_lines: int = 30
    min_summary_chars: int = 25
    min_doc_chars: int = 80
    max_doc_chars: int = 1500


@dataclass(frozen=True)
class Function:
    module: str
    qualname: str
    signature: str
    docstring: str
    body: str
    line: int


def module_name(root: Path, path: Path) -> str:
    """The dotted module name; a root that is itself a package (an installed library) names the first part."""
    base = root.parent if (root / "__init__.py").exists() else root
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def library_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in SKIPPED_PARTS or (p.startswith(("test_", "_")) and p != "__init__.py") for p in rel):
            continue
        yield path


def functions_of(source: str, module: str, limits: PoolLimits) -> Iterator[Function]:
    """Public documented functions and methods of one module (nested functions aside)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines()
    scopes: list[tuple[str, list[ast.stmt]]] = [("", tree.body)]
    scopes += [(node.name + ".", node.body) for node in tree.body
               if isinstance(node, ast.ClassDef) and not node.name.startswith("_")]
    for prefix, body in scopes:
        for node in body:
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)  # already cleaned of its indentation (inspect.cleandoc)
            if not doc or len(node.body) < 2:
                continue
            # The function's lines without the docstring statement (and without decorators).
            start, doc_node = node.lineno - 1, node.body[0]
            kept = lines[start: doc_node.lineno - 1] + lines[doc_node.end_lineno: node.end_lineno]
            body_lines = [ln for ln in kept[1:] if ln.strip()]
            if not limits.min_body_lines <= len(body_lines) <= limits.max_body_lines:
                continue
            yield Function(module=module, qualname=prefix + node.name,
                           signature=f"{node.name}({ast.unparse(node.args)})", docstring=doc,
                           body=textwrap.dedent("\n".join(kept)).strip("\n"), line=node.lineno)


def summary(docstring: str) -> str:
    """The docstring's first paragraph on one line."""
    return " ".join(docstring.split("\n\n")[0].split())


def domain_of(fn: Function) -> str:
    digest = hashlib.sha256(f"{fn.module}:{fn.qualname}".encode()).digest()
    return "code" if digest[0] % 2 == 0 else "docs"


def row_of(fn: Function, limits: PoolLimits, release: str) -> dict[str, Any] | None:
    source = f"{release}/{fn.module}:{fn.line}"
    if domain_of(fn) == "code":
        text = summary(fn.docstring)
        if len(text) < limits.min_summary_chars:
            return None
        owner = f"the `{fn.qualname.rsplit('.', 1)[0]}` method" if "." in fn.qualname else "the function"
        instruction = f"Write {owner} `{fn.signature}` of Python's `{fn.module}` module. {text}"
        return {"instruction": instruction, "input": "", "output": fn.body, "domain": "code", "source": source}
    if not limits.min_doc_chars <= len(fn.docstring) <= limits.max_doc_chars:
        return None
    return {"instruction": f"Explain what `{fn.module}.{fn.qualname}` does in Python.", "input": "",
            "output": fn.docstring, "domain": "docs", "source": source}


def build_pool(root: Path, limits: PoolLimits, release: str) -> list[dict[str, Any]]:
    """Rows of every usable function under `root`; `release` (e.g. "python3.11.7") heads each row's `source`."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for path in library_files(root):
        module = module_name(root, path)
        for fn in functions_of(path.read_text(encoding="utf-8", errors="replace"), module, limits):
            row = row_of(fn, limits, release)
            # The same answer twice (an alias, a copied helper) would be an exact duplicate, which stratify drops.
            if row is not None and row["output"] not in seen:
                seen.add(row["output"])
                rows.append(row)
    return rows


def release_of(root: Path) -> str:
    """What the rows were read from: this Python's version, or an installed package's name and version."""
    if (root / "__init__.py").exists():
        try:
            return f"{root.name}{importlib.metadata.version(root.name)}"
        except importlib.metadata.PackageNotFoundError:
            return root.name
    return f"python{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--out", type=Path, required=True, help="the JSON Lines file to write")
    p.add_argument("--root", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                   help="the library's source folder (default: this interpreter's standard library)")
    args = p.parse_args(argv)
    rows = build_pool(args.root, PoolLimits(), release_of(args.root))
    if not rows:
        raise SystemExit(f"{args.root}: no documented functions found")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(args.out)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()[:16]
    print(f"{args.out}: {len(rows)} rows {dict(Counter(r['domain'] for r in rows))}, sha256 {digest}…",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
