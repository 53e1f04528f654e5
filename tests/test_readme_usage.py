"""The README's usage lines, run as written (tiny models, a 40-row slice of the sample data): no traceback, the
documented exit codes, and nothing lost: the data is untouched and every exported line is one of its lines.

The lines are read from the README's "## Use" block, so a usage line added there is run here too; one this test
cannot run fails it until it learns how.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from slapcli import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SAMPLE = ROOT / "sample_data" / "mixed_400.jsonl"
ROWS = 40

runner = CliRunner()


def usage_lines() -> list[str]:
    """The shell lines of the README's "## Use" block, comments dropped."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"^## Use\n+```sh\n(.*?)^```", text, re.S | re.M)
    assert block, "README.md has no ## Use block of sh lines"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def model_options(command: str, models: dict[str, str]) -> list[str]:
    """The tiny models, given to the commands that take them (read from the CLI itself, not listed here)."""
    params = {p.name for p in typer.main.get_command(cli.app).commands[command].params}
    return [arg for name, value in models.items() if name in params
            for arg in (f"--{name.replace('_', '-')}", value)]


def digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes()).hexdigest()


@pytest.fixture()
def models(tiny_encoder_dir: Path, tiny_proxy_dir: Path) -> dict[str, str]:
    return {"embed_model": str(tiny_encoder_dir), "proxy_model": str(tiny_proxy_dir)}


@pytest.fixture()
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working folder holding data.jsonl, the README's example file name."""
    monkeypatch.chdir(tmp_path)
    lines = SAMPLE.read_bytes().splitlines(keepends=True)[:ROWS]
    (tmp_path / "data.jsonl").write_bytes(b"".join(lines))
    return tmp_path


def run_line(line: str, models: dict[str, str], data: bytes) -> tuple[object, list[str]]:
    """One README line through the CLI (in process): `cat FILE | slap ...` feeds FILE on stdin, `slap ... | head`
    keeps the first ten lines of stdout. Returns the result and the argv it ran."""
    stdin = None
    if line.startswith("cat "):
        source, line = line.split("|", 1)
        stdin = Path(shlex.split(source)[1]).read_bytes()
    line = line.split("|", 1)[0].strip()  # `| head`: stdout is checked below, whole
    words = shlex.split(line)
    assert words[0] == "slap", line
    argv = [*words[1:], *model_options(words[1], models)]
    result = runner.invoke(cli.app, argv, input=stdin)
    output = (result.stdout or "") + (result.stderr or "")
    assert "Traceback" not in output, f"{line}\n{output}"
    # Anything but an exit (SystemExit) is an exception the CLI let through: a traceback for a user.
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{line}: {result.exception!r}\n{output}"
    return result, argv


def test_the_readme_usage_lines_run_as_written(folder, models):
    data = folder / "data.jsonl"
    before = digest(data)
    source_lines = set(data.read_bytes().splitlines())
    lines = usage_lines()
    assert len(lines) >= 8 and all("slap " in line for line in lines), lines
    ran = []
    for line in lines:
        result, argv = run_line(line, models, data.read_bytes())
        if argv[0] == "run" and Path("pruned.jsonl").exists():
            # The stage-by-stage lines above already wrote pruned.jsonl: run refuses to replace it unasked...
            assert result.exit_code == 2, result.stderr
            assert result.stderr.strip() == "error: pruned.jsonl: exists; pass --force to overwrite it"
            # ... and with --force reuses the artifacts those lines left in the same work folder. The selection
            # is made again, and run says why: `select --keep 0.7` recorded its own keep, run's select takes the
            # budget the strata recorded (keep None).
            result, _ = run_line(line + " --force", models, data.read_bytes())
            assert result.exit_code == 0, result.stderr
            for stage in ("embeddings", "strata"):
                assert f"reusing work/{stage}.parquet" in result.stderr, result.stderr
            assert "replacing work/selection.parquet: made with keep 0.7 -> None" in result.stderr
        assert result.exit_code == 0, f"{line}\n{result.stderr}"
        if "-o" in argv:  # a command that writes says so in a final line, in every mode but --quiet
            assert result.stderr.strip().splitlines()[-1].startswith("wrote "), f"{line}\n{result.stderr}"
        if argv[:1] == ["export"] and "-" in argv:
            kept = result.stdout_bytes.splitlines()
            assert kept and set(kept) <= source_lines  # rows exactly as they were
        if argv[:1] == ["inspect"] and "--json" in argv:
            assert json.loads(result.stdout)["kind"] == "strata"
        ran.append(argv[0])
        assert digest(data) == before, f"{line} changed the data"
    assert set(ran) == {"embed", "stratify", "select", "export", "run", "inspect", "report"}
    pruned = Path("pruned.jsonl").read_bytes().splitlines()
    assert 0 < len(pruned) < ROWS and set(pruned) <= source_lines
    assert Path("report.html").stat().st_size > 0 and any(Path("figures").glob("*.png"))
    # Nothing half-written or hidden left behind: no temporary file, no lock, no parts folder.
    assert not [p for p in folder.rglob(".*") if p.name != ".pytest_cache"]


def test_stdout_into_a_pipe_that_closes_early_is_no_traceback(folder, models):
    """`slap export SEL -o - | head`: head exits after its lines and the export's writes meet a closed pipe."""
    # Rows long enough that the export outgrows the pipe's buffer (64 KiB) while head has already gone.
    rows = [{"instruction": f"Describe item {i}.", "output": f"Item {i}: " + "words and more words " * 400}
            for i in range(ROWS)]
    data = folder / "big.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for line in (f"slap run {data} -o kept.jsonl --method random --keep 0.9 --workdir w -q",):
        result, _ = run_line(line, models, b"")
        assert result.exit_code == 0, result.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(f"{shlex.quote(sys.executable)} -m slapcli export w/selection.parquet -o - | head -n 2",
                          shell=True, capture_output=True, env=env, timeout=300)
    assert len(proc.stdout.splitlines()) == 2
    assert b"Traceback" not in proc.stderr and b"Exception" not in proc.stderr, proc.stderr.decode()
