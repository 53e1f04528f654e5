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


# --- locks: two commands on one artifact, and the lock a killed command leaves ---------------------------------


def held(lock: Path, operation: int) -> object:
    """What another command holds while it runs: an open lock file with `operation` (LOCK_EX writes, LOCK_SH reads)."""
    f = open(lock, "a")  # closed with the test's `with`
    fcntl.flock(f, operation)
    return f


def test_a_stage_does_not_read_an_artifact_being_written(tmp_path, work, models):
    emb = work / "embeddings.parquet"
    with held(work / ".embeddings.parquet.lock", fcntl.LOCK_EX):  # an `embed -o` of it running
        line = one_line(invoke(["stratify", emb, "-o", tmp_path / "s.parquet", *models[2:], "-q"]))
    assert line.startswith(f"error: {emb}: another slap command is writing it")
    assert not (tmp_path / "s.parquet").exists() and hidden(tmp_path) == [".embeddings.parquet.lock"]


def test_an_artifact_being_read_is_not_replaced(tmp_path, data, work, models):
    emb = work / "embeddings.parquet"
    before = emb.read_bytes()
    with held(work / ".embeddings.parquet.lock", fcntl.LOCK_SH):  # a `stratify` reading it
        line = one_line(invoke(["embed", data, "-o", emb, "--force", *models, "-q"]))
        assert line.startswith(f"error: {emb}: another slap command is reading it")
        assert emb.read_bytes() == before
        # Readers share it: a second stage reads it meanwhile, and leaves the first reader's lock file alone.
        r = invoke(["stratify", emb, "-o", tmp_path / "s.parquet", "--clusters", "2", *models[2:], "-q"])
        assert r.exit_code == 0, r.stderr
        assert hidden(tmp_path) == [".embeddings.parquet.lock"]
    r = invoke(["select", work / "strata.parquet", "-o", tmp_path / "sel.parquet", "--method", "random", "-q"])
    assert r.exit_code == 0, r.stderr
    assert hidden(tmp_path) == [".embeddings.parquet.lock"]  # still there: nobody held it, nobody removed it
    r = invoke(["stratify", emb, "-o", tmp_path / "s.parquet", "--clusters", "2", "--force", *models[2:], "-q"])
    assert r.exit_code == 0, r.stderr
    assert hidden(tmp_path) == []  # the last reader out removes the lock file


@pytest.mark.parametrize("leftover", ["output", "input", "work-folder"])
def test_the_lock_file_of_a_killed_command_blocks_nothing(tmp_path, data, work, models, leftover):
    # A SIGKILLed command leaves its lock file; flock locks die with the process, so nobody holds it.
    lock = {"output": tmp_path / ".kept.jsonl.lock", "input": work / ".selection.parquet.lock",
            "work-folder": work / ".strata.parquet.lock"}[leftover]
    lock.write_bytes(b"")
    if leftover == "work-folder":
        r = invoke(["run", data, "-o", tmp_path / "kept.jsonl", "--workdir", work, "--method", "random", *models,
                    "-q"])
    else:
        r = invoke(["export", work / "selection.parquet", "-o", tmp_path / "kept.jsonl", "-q"])
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "kept.jsonl").exists() and hidden(tmp_path) == []  # taken over, then removed


# --- data a user may have: each works, or is one line naming file and line, before any model loads ------------


def no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model loads: a mistake in the data must be found before that."""
    from slapcli.stages import embed as embed_module

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model loaded before the data was checked")

    monkeypatch.setattr(embed_module, "load_encoder", refuse)


BAD_DATA = {
    # name: (file name, bytes, words of the one line)
    "row-is-an-array": ("d.jsonl", jsonl(rows(3)) + b"[1, 2]\n", ["d.jsonl:4", "expected a JSON object, got an array"]),
    "row-is-null": ("d.jsonl", jsonl(rows(3)) + b"null\n", ["d.jsonl:4", "got null"]),
    "row-is-a-string": ("d.jsonl", b'"just text"\n' + jsonl(rows(3)), ["d.jsonl:1", "got a string"]),
    "empty-messages": ("d.jsonl", b'{"messages": []}\n', ["d.jsonl:1", "field 'messages'", "empty conversation"]),
    "only-blank-lines": ("d.jsonl", b"\n \r\n\n", ["d.jsonl", "empty input"]),
    "an-image": ("d.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", ["d.jsonl:1", "not valid UTF-8"]),
    "utf-16": ("d.jsonl", jsonl(rows(2)).decode().encode("utf-16"), ["d.jsonl:1", "not valid UTF-8"]),
    "latin-1": ("d.jsonl", '{"instruction": "café", "output": "ok"}\n'.encode("latin-1"), ["d.jsonl:1", "UTF-8"]),
    "nested-too-deep": ("d.jsonl", b'{"instruction": "a", "output": "b", "x": ' + b"[" * 50_000 + b"]" * 50_000
                        + b"}\n", ["d.jsonl:1", "nested too deeply"]),
    "json-object-not-array": ("d.json", json.dumps({"data": rows(2)}).encode(), ["d.json", "JSON"]),
    "raw-control-character": ("d.jsonl", b'{"instruction": "a\x00b", "output": "c"}\n',
                              ["d.jsonl:1", "malformed JSON"]),
    "gzip-cut-short": ("d.jsonl.gz", gzip.compress(jsonl(rows()))[:-20], ["d.jsonl.gz", "decompress"]),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_one_line_before_any_model(tmp_path, models, monkeypatch, case):
    name, content, words = BAD_DATA[case]
    path = tmp_path / name
    path.write_bytes(content)
    no_models(monkeypatch)
    out = tmp_path / "e.parquet"
    line = one_line(invoke(["embed", path, "-o", out, *models, "-q"]))
    assert all(w in line for w in words), line
    assert sorted(p.name for p in tmp_path.iterdir()) == [name, "slap-cache"] or \
        sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing left behind


def test_an_artifact_given_as_data_is_one_line_before_any_model(tmp_path, work, models, monkeypatch):
    no_models(monkeypatch)
    strata = work / "strata.parquet"
    line = one_line(invoke(["embed", strata, "-o", tmp_path / "e.parquet", *models, "-q"]))
    assert line == (f"error: {strata}: a slapcli strata artifact, not data; give the data file it was made from "
                    f"(`slap inspect {strata}` shows it)")
    assert not (tmp_path / "e.parquet").exists() and hidden(tmp_path) == []


@pytest.mark.parametrize("case", ["bom", "crlf", "no-final-newline", "nan-and-infinity", "unicode-names"])
def test_odd_but_valid_data_runs_and_exports_its_own_lines(tmp_path, models, case):
    content = jsonl(rows())
    name, out = "data.jsonl", "kept.jsonl"
    if case == "bom":
        content = b"\xef\xbb\xbf" + content
    elif case == "crlf":
        content = content.replace(b"\n", b"\r\n")
    elif case == "no-final-newline":
        content = content.rstrip(b"\n")
    elif case == "nan-and-infinity":  # Python's json reads them; slap keeps the rows as they are
        content = content.replace(b'"id": 3}', b'"id": 3, "score": NaN}')
        content = content.replace(b'"id": 4}', b'"id": 4, "w": -Infinity}')
    else:
        name, out = "données ✓ 数据.jsonl", "结果 ✓.jsonl"
    data = tmp_path / name
    data.write_bytes(content)
    r = invoke(["run", data, "-o", tmp_path / out, "--workdir", tmp_path / "w", "--method", "random", "--keep", "0.5",
                *models, "-q"])
    assert r.exit_code == 0, r.stderr
    source_lines = set(content.splitlines())
    kept = (tmp_path / out).read_bytes().splitlines()
    assert len(kept) == ROWS // 2
    # Each kept row is its source line byte for byte (the BOM is no part of the row; CRLF rows keep their CR).
    assert all(line in source_lines or b"\xef\xbb\xbf" + line in source_lines for line in kept), kept
    assert not any(line.startswith(b"\xef\xbb\xbf") for line in kept)  # never a BOM inside the output
    assert data.read_bytes() == content and hidden(tmp_path) == []


# --- paths and options --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "words"), [
    ("keep-nan", "--keep nan: must be in (0, 1]"),
    ("keep-tiny", "--keep 1e-09 keeps no row of the 12 rows"),
    ("output-is-the-workdir", "w: is a directory; give a file name"),
    ("output-is-an-artifact-of-the-run", "w/embeddings.parquet: the output path is the input path"),
    ("output-is-the-stdin-copy", "w/input.stdin: the output path is the input path"),
    ("workdir-is-a-file", "not a directory"),
    ("chunk-rows-0", "--chunk-rows"),
    ("symlink-loop", "loop"),
    ("empty-folder", "a folder with no data files"),
])
def test_path_and_option_mistakes_are_one_line(tmp_path, data, work, models, monkeypatch, case, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w" / "input.stdin").write_bytes(b"")  # as a run from stdin leaves it
    (tmp_path / "empty").mkdir()
    os.symlink("loop", tmp_path / "loop")
    no_models(monkeypatch)
    run = ["run", data, "--workdir", "w", *models, "-q"]
    args = {"keep-nan": [*run, "-o", "x.jsonl", "--keep", "nan"],
            "keep-tiny": [*run, "-o", "x.jsonl", "--keep", "1e-9"],
            "output-is-the-workdir": [*run, "-o", "w"],
            "output-is-an-artifact-of-the-run": [*run, "-o", "w/embeddings.parquet", "--force"],
            "output-is-the-stdin-copy": [*run, "-o", "w/input.stdin", "--force"],
            "workdir-is-a-file": ["run", data, "--workdir", data, "-o", "x.jsonl", *models],
            "chunk-rows-0": ["embed", data, "-o", "e.parquet", "--chunk-rows", "0", *models],
            "symlink-loop": ["embed", "loop", "-o", "e.parquet", *models],
            "empty-folder": ["embed", "empty", "-o", "e.parquet", *models]}[case]
    before = {p: p.read_bytes() for p in [data, *sorted((tmp_path / "w").iterdir())] if p.is_file()}
    line = one_line(invoke(args))
    assert words in line, line
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "e.parquet").exists() and hidden(tmp_path) == []


def test_a_budget_beyond_any_integer_keeps_every_row_and_says_so(tmp_path, data, work, models):
    r = invoke(["run", data, "-o", tmp_path / "x.jsonl", "--workdir", work, "--method", "random",
                "--budget", str(10**20), *models, "-q"])
    assert r.exit_code == 0, r.stderr
    assert "every row is kept" in r.stderr
    assert (tmp_path / "x.jsonl").read_bytes() == data.read_bytes()


@pytest.mark.parametrize(("case", "words"), [
    ("png-is-a-file", "--png"),
    ("map-unknown", "--map 'tsne': expected one of auto, pca, umap"),
])
def test_report_options_are_one_line_before_any_work(tmp_path, work, case, words):
    (tmp_path / "afile").write_text("x")
    extra = {"png-is-a-file": ["--png", tmp_path / "afile"], "map-unknown": ["--map", "tsne"]}[case]
    line = one_line(invoke(["report", work, "-o", tmp_path / "r.html", *extra]))
    assert words in line and not (tmp_path / "r.html").exists() and hidden(tmp_path) == []
    assert (tmp_path / "afile").read_text() == "x"


# --- a folder that cannot be written ------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_read_only_output_folder_is_one_line_before_any_work(tmp_path, work):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        line = one_line(invoke(["export", work / "selection.parquet", "-o", locked / "kept.jsonl"]))
    finally:
        locked.chmod(0o755)
    assert line == f"error: {locked / 'kept.jsonl'}: cannot be written: no permission to write in {locked}"
    assert list(locked.iterdir()) == []


def test_a_read_only_file_system_is_one_line_and_leaves_nothing(tmp_path, work, monkeypatch):
    import errno
    import tempfile

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)  # where the output's temporary file is made
    out = tmp_path / "kept.jsonl"
    r = invoke(["export", work / "selection.parquet", "-o", out])
    assert r.exit_code == 1
    assert r.stderr.strip() == f"error: {out}: Read-only file system; nothing was written"
    assert not out.exists() and hidden(tmp_path) == []


# --- resume state that is not what slap left -----------------------------------------------------------------------


def test_a_file_where_embed_keeps_its_chunks_is_one_line(tmp_path, data, models, monkeypatch):
    (tmp_path / ".e.parquet.parts").write_text("not a folder")
    no_models(monkeypatch)
    line = one_line(invoke(["embed", data, "-o", tmp_path / "e.parquet", *models, "-q"]))
    assert line.startswith(f"error: {tmp_path / '.e.parquet.parts'}: not a folder")
    assert (tmp_path / ".e.parquet.parts").read_text() == "not a folder" and not (tmp_path / "e.parquet").exists()


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated"])
def test_a_damaged_select_checkpoint_starts_over(tmp_path, work, models, damage):
    out = tmp_path / "sel.parquet"
    args = ["select", work / "strata.parquet", "-o", out, "--checkpoint-minutes", "0", *models[2:], "-q"]
    whole = tmp_path / "whole.parquet"
    r = invoke(["select", work / "strata.parquet", "-o", whole, "--checkpoint-minutes", "0", *models[2:], "-q"])
    assert r.exit_code == 0, r.stderr
    ckpt = tmp_path / "sel.parquet.ckpt"
    ckpt.write_bytes({"garbage": b"\x80\x04not a checkpoint", "empty": b"",
                      "truncated": gzip.compress(b"x" * 1000)[:30]}[damage])
    r = invoke(args)
    assert r.exit_code == 0, r.stderr
    assert r.stderr.strip() == (f"warning: {ckpt} was written with other settings or data, or is damaged: "
                                "starting over")
    assert out.read_bytes() == whole.read_bytes() and not ckpt.exists()


def test_a_cache_that_is_not_a_folder_is_one_line_before_the_proxy_pass(tmp_path, work, models, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("SLAP_CACHE_DIR", str(tmp_path / "afile"))
    from slapcli.proxy import passes

    def no_pass(*args: object, **kwargs: object) -> None:
        raise AssertionError("the proxy pass ran before the cache was checked")

    monkeypatch.setattr(passes, "proxy_losses", no_pass)
    line = one_line(invoke(["stratify", work / "embeddings.parquet", "-o", tmp_path / "s.parquet", *models[2:], "-q"]))
    assert line == (f"error: {tmp_path / 'afile'}: the slapcli cache is not a folder; remove it, or set "
                    "SLAP_CACHE_DIR to a folder")
    assert not (tmp_path / "s.parquet").exists() and hidden(tmp_path) == []


@pytest.mark.parametrize("case", ["export-stdout", "run-stdout", "embed-stdin", "run-stdin", "inspect-stdout",
                                  "inspect-data-stdout"])
def test_a_closed_stdin_or_stdout_is_one_line_before_any_work(tmp_path, data, work, models, case):
    import subprocess
    import sys

    args, closed, message = {
        "export-stdout": (["export", work / "selection.parquet", "-o", "-"], ">&-", "-o -: stdout is closed"),
        "run-stdout": (["run", data, "--workdir", tmp_path / "w2", *models, "-o", "-"], ">&-",
                       "-o -: stdout is closed"),
        "embed-stdin": (["embed", "-", "-o", tmp_path / "e.parquet", *models], "<&-", "-: stdin is closed"),
        "run-stdin": (["run", "-", "--workdir", tmp_path / "w2", "-o", tmp_path / "x.jsonl", *models], "<&-",
                      "-: stdin is closed"),
        "inspect-stdout": (["inspect", work / "selection.parquet"], ">&-", "stdout is closed"),
        "inspect-data-stdout": (["inspect", data, *models[:2]], ">&-", "stdout is closed"),
    }[case]
    argv = " ".join(f"'{a}'" for a in [sys.executable, "-m", "slapcli", *args])
    # Started by a shell with the stream closed, as `slap ... >&-` (Python then has None for it).
    proc = subprocess.run(f"{argv} {closed}", shell=True, stderr=subprocess.PIPE, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert proc.stderr.decode().strip().startswith(f"error: {message}")
    assert len(proc.stderr.decode().strip().splitlines()) == 1
    assert not (tmp_path / "w2").exists() and not (tmp_path / "e.parquet").exists() and hidden(tmp_path) == []


@pytest.mark.parametrize("which", ["input", "output", "workdir"])
def test_a_name_that_is_not_utf8_is_one_line_before_any_work(tmp_path, data, models, monkeypatch, which):
    latin1 = os.fsdecode(b"caf\xe9")  # a Latin-1 name as Python holds it: with a surrogate
    monkeypatch.chdir(tmp_path)
    if which == "input":
        os.link(data, latin1 + ".jsonl")
    no_models(monkeypatch)
    args = {"input": ["run", latin1 + ".jsonl", "-o", "out.jsonl", "--workdir", "w"],
            "output": ["run", data, "-o", latin1 + ".jsonl", "--workdir", "w"],
            "workdir": ["run", data, "-o", "out.jsonl", "--workdir", latin1]}[which]
    line = one_line(invoke([*args, *models]))
    assert "caf\\xe9" in line and "not valid UTF-8" in line, line
    assert set(os.listdir(tmp_path)) - {"data.jsonl", latin1 + ".jsonl", "slap-cache"} == set()  # nothing made


@pytest.mark.parametrize("name", ["out.jsonl\r", "out\n.jsonl", "out\t.jsonl"])
def test_a_name_with_a_control_character_is_one_line(tmp_path, work, name):
    # `slap export ... -o out.jsonl` run from a script saved with Windows line endings passes "out.jsonl\r".
    line = one_line(invoke(["export", work / "selection.parquet", "-o", tmp_path / name]))
    assert "the name holds a control character" in line
    assert ("Windows line endings" in line) == name.endswith("\r")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")] and hidden(tmp_path) == []
