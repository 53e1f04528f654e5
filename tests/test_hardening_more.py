"""Issue 22, second round: attacks that are not in the issue's list, each kept here so that it stays fixed.

Every case drives the real CLI (typer's runner, tiny random models) and checks the exit code, the one line on
stderr, that the data is untouched and that nothing is left behind.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slapcli import cli

runner = CliRunner()
ROWS = 12


def invoke(args: list, input: bytes | None = None) -> object:
    result = runner.invoke(cli.app, [str(a) for a in args], input=input)
    # Anything but an exit is an exception the CLI let through: a traceback for a user.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in (result.stderr or "")
    return result


def one_line(result: object) -> str:
    """The whole stderr of a refused command (exit 2): exactly one line, which is returned."""
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def rows(n: int = ROWS) -> list[dict]:
    return [{"instruction": f"Explain topic {i} with care", "input": "", "output": f"Topic {i} is simple, {i} times.",
             "id": i} for i in range(n)]


def jsonl(items: list) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in items)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


@pytest.fixture()
def models(tiny_encoder_dir: Path, tiny_proxy_dir: Path) -> list[str]:
    return ["--embed-model", str(tiny_encoder_dir), "--proxy-model", str(tiny_proxy_dir)]


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl(rows()))
    return path


@pytest.fixture()
def work(tmp_path: Path, data: Path, models: list[str]) -> Path:
    """A finished run's work folder (random method: cheap)."""
    r = invoke(["run", data, "-o", tmp_path / "pruned.jsonl", "--workdir", tmp_path / "w", "--method", "random",
                *models, "-q"])
    assert r.exit_code == 0, r.stderr
    return tmp_path / "w"


# --- the report never replaces what it is made from -----------------------------------------------------------


@pytest.mark.parametrize("target", ["data", "strata", "selection"])
def test_report_never_writes_over_its_data_or_artifacts(tmp_path, data, work, target):
    output = {"data": data, "strata": work / "strata.parquet", "selection": work / "selection.parquet"}[target]
    before = output.read_bytes()
    line = one_line(invoke(["report", work, "-o", output, "--force"]))
    assert "the output path is the input path" in line
    assert output.read_bytes() == before and hidden(tmp_path) == []


def test_report_may_go_inside_the_work_folder(tmp_path, work):
    r = invoke(["report", work, "-o", work / "report.html", "-q"])
    assert r.exit_code == 0, r.stderr
    assert (work / "report.html").read_bytes().startswith(b"<!DOCTYPE html>") and hidden(tmp_path) == []
