"""Issue 22: never lose or corrupt data, and every mistake is one line.

Each test drives the real CLI (typer's runner, tiny random models) and checks the exit code, the one line on
stderr and that nothing is left behind: the cases of the issue, worst first.
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import json
import os
import signal
import stat
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from typer.testing import CliRunner

from slapcli import cli
from slapcli.artifacts import META_KEY, read_meta
from slapcli.errors import Stopped
from slapcli.progress import Reporter

runner = CliRunner()
ROWS = 24


def invoke(args: list) -> object:
    return runner.invoke(cli.app, [str(a) for a in args], catch_exceptions=False)


def one_line(result: object) -> str:
    """The whole stderr of a refused command: exactly one line, which is returned."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def make_rows(n: int) -> list[dict]:
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma"]
    return [{"instruction": f"Explain topic {i} with {words[i % 7]}", "input": "",
             "output": f"Topic {i} is {' '.join(words[(i + k) % 7] for k in range(3 + i % 5))}.", "id": f"r{i}"}
            for i in range(n)]


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in make_rows(ROWS)))
    return path


@pytest.fixture()
def models(tiny_encoder_dir: Path, tiny_proxy_dir: Path) -> list[str]:
    return ["--embed-model", str(tiny_encoder_dir), "--proxy-model", str(tiny_proxy_dir)]


def proxy(models: list[str]) -> list[str]:
    return models[2:]


def chain(tmp_path: Path, data: Path, models: list[str], method: str = "random") -> tuple[Path, Path, Path]:
    """embed -> stratify -> select in tmp_path/work, cheap settings."""
    work = tmp_path / "work"
    emb, strata, sel = work / "e.parquet", work / "s.parquet", work / "sel.parquet"
    assert invoke(["embed", data, "-o", emb, *models, "-q"]).exit_code == 0
    r = invoke(["stratify", emb, "-o", strata, "--clusters", "2", *proxy(models), "-q"])
    assert r.exit_code == 0, r.stderr
    r = invoke(["select", strata, "-o", sel, "--method", method, "--keep", "0.5", *proxy(models), "-q"])
    assert r.exit_code == 0, r.stderr
    return emb, strata, sel


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def rewrite(path: Path, table: pa.Table | None = None, meta: bytes | None = None, **changes: object) -> None:
    """Tamper with an artifact: new rows and/or metadata (whole, or `changes` merged into its stats)."""
    original = pq.read_table(path)
    raw = pq.read_metadata(path).metadata[META_KEY]
    if changes:
        doc = json.loads(raw)
        doc["stats"].update(changes)
        raw = json.dumps(doc).encode()
    table = original if table is None else table
    pq.write_table(table.replace_schema_metadata({META_KEY: meta if meta is not None else raw}), path)


# --- 1. no output over a file recorded as a source or upstream -------------------------------------------------


@pytest.mark.parametrize("case", ["export-source", "export-symlink", "export-relative", "export-upstream",
                                  "stratify-source", "select-upstream", "run-input", "run-workdir-artifact"])
def test_no_command_writes_over_its_source_or_upstream(tmp_path, data, models, monkeypatch, case):
    emb, strata, sel = chain(tmp_path, data, models)
    before = {p: p.read_bytes() for p in (data, emb, strata, sel)}
    link = tmp_path / "link.jsonl"
    link.symlink_to(data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = {
        "export-source": ["export", sel, "-o", data, "--force"],
        "export-symlink": ["export", sel, "-o", link, "--force"],
        "export-relative": ["export", sel, "-o", "../data.jsonl", "--force"],
        "export-upstream": ["export", sel, "-o", emb, "--force"],
        "stratify-source": ["stratify", emb, "-o", data, "--force", *proxy(models)],
        "select-upstream": ["select", strata, "-o", emb, "--force", *proxy(models)],
        "run-input": ["run", link, "-o", data, "--force", "--workdir", tmp_path / "w2", *models],
        "run-workdir-artifact": ["run", data, "-o", tmp_path / "w3" / "embeddings.parquet", "--force",
                                 "--workdir", tmp_path / "w3", *models],
    }[case]
    monkeypatch.chdir(elsewhere)
    r = invoke(args)
    assert r.exit_code == 2
    assert "the output path is the input path" in one_line(r)
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "w2").exists() and not (tmp_path / "w3").exists()
    assert listing(tmp_path / "work") == ["e.parquet", "s.parquet", "sel.parquet"]


@pytest.mark.parametrize("target", ["a-shard", "inside-the-folder", "matching-the-pattern"])
def test_no_output_over_or_among_the_shards_of_a_folder_input(tmp_path, models, target):
    shards = tmp_path / "shards"
    shards.mkdir()
    rows = [json.dumps(r).encode() + b"\n" for r in make_rows(ROWS)]
    (shards / "part-0.jsonl").write_bytes(b"".join(rows[:12]))
    (shards / "part-1.jsonl").write_bytes(b"".join(rows[12:]))
    before = {p.name: p.read_bytes() for p in shards.iterdir()}
    data = str(shards / "part-*.jsonl") if target == "matching-the-pattern" else shards
    out = {"a-shard": shards / "part-1.jsonl", "inside-the-folder": shards / "pruned.jsonl",
           "matching-the-pattern": shards / "part-9.jsonl"}[target]
    r = invoke(["run", data, "-o", out, "--force", "--workdir", tmp_path / "w", *models])
    assert r.exit_code == 2
    line = one_line(r)
    assert ("the output path is the input path" in line) if target == "a-shard" else ("one more shard" in line)
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before and not (tmp_path / "w").exists()


# --- 2. a missing input: one line before any model loads, and no work folder ----------------------------------


@pytest.mark.parametrize("command", ["embed", "run", "stratify", "export"])
def test_a_missing_input_is_one_line_before_any_model(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    nosuch = "nosuch.parquet" if command in ("stratify", "export") else "nosuch.jsonl"
    models = ["--proxy-model", "no-such-model-folder"]
    args = {"embed": ["embed", nosuch, "-o", "e.parquet", "--embed-model", "no-such-model-folder", *models],
            "run": ["run", nosuch, "-o", "out.jsonl", "--workdir", "wn", *models],
            "stratify": ["stratify", nosuch, "-o", "s.parquet", *models],
            "export": ["export", nosuch, "-o", "out.jsonl"]}[command]
    r = invoke(args)
    assert r.exit_code == 2
    assert one_line(r) == f"error: {nosuch}: no such file"  # not the model, which would fail if it were loaded
    assert set(listing(tmp_path)) <= {"slap-cache"}


def test_run_on_bad_stdin_leaves_no_work_folder(tmp_path, models):
    bad = b'{"instruction": "a", "output": "b"}\n{"instruction": "a"\n'
    r = runner.invoke(cli.app, ["run", "-", "-o", str(tmp_path / "out.jsonl"), "--workdir", str(tmp_path / "w"),
                                *models, "-q"], input=bad, catch_exceptions=False)
    assert r.exit_code == 2
    assert "input.stdin:2: malformed JSON" in one_line(r)
    assert set(listing(tmp_path)) <= {"slap-cache"}  # neither the copy of stdin nor the folder stays


# --- 3. artifacts record the absolute source path -----------------------------------------------------------------


def test_artifacts_record_the_absolute_source_and_a_moved_source_is_one_line(tmp_path, models, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "data.jsonl").write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in make_rows(ROWS)))
    monkeypatch.chdir(project)
    _emb, _strata, sel = chain(project, Path("data.jsonl"), models)
    source = read_meta(str(sel), "selection").source
    assert source["path"] == str(project / "data.jsonl") and source["given"] == "data.jsonl"

    monkeypatch.chdir(tmp_path)  # another folder: the recorded path still finds the data
    r = invoke(["export", project / sel, "-o", "kept.jsonl"])
    assert r.exit_code == 0, r.stderr
    assert len((tmp_path / "kept.jsonl").read_bytes().splitlines()) == ROWS // 2

    (project / "data.jsonl").rename(project / "moved.jsonl")
    r = invoke(["export", project / sel, "-o", "again.jsonl"])
    assert r.exit_code == 2
    line = one_line(r)
    assert str(project / "data.jsonl") in line and "--input" in line
    assert not (tmp_path / "again.jsonl").exists()
    r = invoke(["export", project / sel, "-o", "again.jsonl", "--input", project / "moved.jsonl"])
    assert r.exit_code == 0, r.stderr

    # An artifact written before absolute paths recorded the path as given, relative to where it ran: still read.
    (project / "moved.jsonl").rename(project / "data.jsonl")
    doc = json.loads(pq.read_metadata(project / sel).metadata[META_KEY])
    doc["source"] = {k: v for k, v in doc["source"].items() if k != "given"} | {"path": "data.jsonl"}
    rewrite(project / sel, meta=json.dumps(doc).encode())
    monkeypatch.chdir(project)
    r = invoke(["export", sel, "-o", tmp_path / "old.jsonl"])
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "old.jsonl").read_bytes() == (tmp_path / "kept.jsonl").read_bytes()


# --- 4. options checked before any work ---------------------------------------------------------------------------


OPTION_CASES = [
    (["embed", "{data}", "-o", "{out}.parquet", "--max-tokens", "0"], "--max-tokens"),
    (["embed", "{data}", "-o", "{out}.parquet", "--max-tokens", "-5"], "--max-tokens"),
    (["embed", "{data}", "-o", "{out}.parquet", "--batch-size", "0"], "--batch-size"),
    (["embed", "{data}", "-o", "{out}.parquet", "--format", "csv"], "--format"),
    (["embed", "{data}", "-o", "{out}.parquet", "--on-bad-line", "ignore"], "--on-bad-line"),
    (["embed", "{data}", "-o", "{out}.parquet", "--input-format", "xml"], "--input-format"),
    (["embed", "{data}", "-o", "{out}.parquet", "--device", "nosuch"], "unknown device 'nosuch'"),
    (["stratify", "{fake}", "-o", "{out}.parquet", "--keep", "1.5"], "--keep"),
    (["stratify", "{fake}", "-o", "{out}.parquet", "--keep", "0"], "--keep"),
    (["stratify", "{fake}", "-o", "{out}.parquet", "--keep", "nan"], "--keep"),
    (["stratify", "{fake}", "-o", "{out}.parquet", "--budget", "0"], "--budget"),
    (["stratify", "{fake}", "-o", "{out}.parquet", "--clusters", "0"], "--clusters"),
    (["stratify", "{fake}", "-o", "{out}.parquet", "--loss-bins", "0"], "--loss-bins"),
    (["stratify", "{fake}", "-o", "{out}.parquet", "--prune-hardest", "1"], "--prune-hardest"),
    (["stratify", "{fake}", "-o", "{out}.parquet", "--allocation", "even"], "--allocation"),
    (["select", "{fake}", "-o", "{out}.parquet", "--method", "foo"], "--method"),
    (["select", "{fake}", "-o", "{out}.parquet", "--batch-size", "0"], "--batch-size"),
    (["select", "{fake}", "-o", "{out}.parquet", "--max-tokens", "0"], "--max-tokens"),
    (["select", "{fake}", "-o", "{out}.parquet", "--keep", "-0.1"], "--keep"),
    (["select", "{fake}", "-o", "{out}.parquet", "--lr", "inf"], "--lr inf: must be a finite number > 0"),
    (["select", "{fake}", "-o", "{out}.parquet", "--diversity", "nan"], "--diversity"),
    (["select", "{fake}", "-o", "{out}.parquet", "--seed", "-1"], "--seed"),
    (["stratify", "{fake}", "-o", "{out}.parquet", "--seed", "99999999999"], "--seed"),
    (["export", "{fake}", "-o", "{out}.jsonl", "--order", "random"], "--order"),
    (["run", "{data}", "-o", "{out}.jsonl", "--method", "foo"], "--method"),
    (["run", "{data}", "-o", "{out}.jsonl", "--keep", "0"], "--keep"),
    (["run", "{data}", "-o", "{out}.jsonl", "--budget", "0"], "--budget"),
    (["run", "{data}", "-o", "{out}.jsonl", "--order", "random"], "--order"),
    (["run", "{data}", "-o", "{out}.jsonl", "--on-bad-line", "ignore"], "--on-bad-line"),
    (["run", "{data}", "-o", "{out}.jsonl", "--max-tokens", "0"], "--max-tokens"),
]


@pytest.mark.parametrize(("template", "option"), OPTION_CASES,
                         ids=[" ".join(case[0][:1] + case[0][4:]) for case in OPTION_CASES])
def test_bad_options_are_one_line_before_any_model(tmp_path, data, monkeypatch, template, option):
    monkeypatch.chdir(tmp_path)
    fake = tmp_path / "artifact.parquet"
    fake.write_bytes(b"not read: the options are checked first")
    args = [a.format(data=data, fake=fake, out="out") for a in template]
    command = args[0]
    # Models that do not exist: a command that got as far as loading one would fail on that instead.
    if command != "export":
        args += ["--proxy-model", "no-such-model"]
    if command in ("embed", "run"):
        args += ["--embed-model", "no-such-model"]
    if command == "run":
        args += ["--workdir", "wk"]
    r = invoke(args)
    assert r.exit_code == 2
    line = one_line(r)
    assert line.startswith("error: ") and option in line
    assert sorted(set(os.listdir(tmp_path)) - {"slap-cache"}) == ["artifact.parquet", "data.jsonl"]


@pytest.mark.parametrize(("args", "words"), [
    (["run", "{data}"], "Missing option '--output'"),
    (["run", "{data}", "-o", "out.jsonl", "--keep", "abc"], "Invalid value for '--keep'"),
    (["export", "sel.parquet", "-o", "out.jsonl", "--oder", "source"], "No such option: --oder"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_parser_mistakes_are_one_line_too(tmp_path, data, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    r = invoke([a.format(data=data) for a in args])
    assert r.exit_code == 2
    line = one_line(r)
    assert line.startswith("error: ") and words in line and line.endswith("--help)")
    assert set(os.listdir(tmp_path)) - {"slap-cache"} == {"data.jsonl"}


def test_a_budget_above_the_rows_warns_and_a_share_of_no_row_is_refused(tmp_path, data, models):
    emb = tmp_path / "e.parquet"
    assert invoke(["embed", data, "-o", emb, *models, "-q"]).exit_code == 0
    r = invoke(["stratify", emb, "-o", tmp_path / "s.parquet", "--budget", "1000", "--no-proxy-loss", "-q"])
    assert r.exit_code == 0, r.stderr
    assert "--budget 1,000 is more than the 24 rows" in r.stderr and "every row is kept" in r.stderr
    r = invoke(["stratify", emb, "-o", tmp_path / "s2.parquet", "--keep", "0.01", "--no-proxy-loss", "-q"])
    assert r.exit_code == 2
    assert "--keep 0.01 keeps no row" in one_line(r)
    assert not (tmp_path / "s2.parquet").exists()


# --- 5. the output's extension decides its container ----------------------------------------------------------


@pytest.mark.parametrize("name", ["pruned.json", "pruned.jsonl", "pruned.ndjson", "pruned.parquet", "pruned.arrow",
                                  "pruned.jsonl.gz", "pruned.json.zst"])
def test_what_slap_writes_slap_reads(tmp_path, models, name):
    array = tmp_path / "arr.json"
    array.write_text(json.dumps(make_rows(ROWS), indent=1))
    out = tmp_path / name
    r = invoke(["run", array, "-o", out, "--input-format", "json", "--method", "random", "--keep", "0.5",
                "--workdir", tmp_path / "w", *models, "-q"])
    assert r.exit_code == 0, r.stderr
    raw = out.read_bytes()
    if name.endswith(".gz"):
        raw = gzip.decompress(raw)
    elif name.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    if ".json." in name or name.endswith(".json"):
        rows = json.loads(raw)
    elif name.endswith(".parquet"):
        rows = pq.read_table(out).to_pylist()
    elif name.endswith(".arrow"):
        rows = pa.ipc.open_file(out).read_all().to_pylist()
    else:
        rows = [json.loads(line) for line in raw.splitlines()]
    assert len(rows) == ROWS // 2 and all(row in make_rows(ROWS) for row in rows)
    # ... and slap reads it back as it is named.
    r = invoke(["embed", out, "-o", tmp_path / "again.parquet", *models, "-q"])
    assert r.exit_code == 0, r.stderr
    assert read_meta(str(tmp_path / "again.parquet")).stats["rows"] == ROWS // 2


def test_json_lines_rows_exported_to_a_json_array_keep_their_bytes(tmp_path, data, models):
    _emb, _strata, sel = chain(tmp_path, data, models)
    for order in ("source", "selection"):
        out = tmp_path / f"{order}.json"
        assert invoke(["export", sel, "-o", out, "--order", order]).exit_code == 0
        assert invoke(["export", sel, "-o", tmp_path / f"{order}.jsonl", "--order", order]).exit_code == 0
        lines = (tmp_path / f"{order}.jsonl").read_bytes().splitlines()
        assert out.read_bytes() == b"[\n" + b",\n".join(lines) + b"\n]\n"


# --- 6. nothing but regular files is ever replaced ----------------------------------------------------------------


def test_a_character_device_or_fifo_is_written_to_not_replaced(tmp_path, data, models):
    _emb, _strata, sel = chain(tmp_path, data, models)
    r = invoke(["export", sel, "-o", os.devnull])  # no --force needed: nothing is replaced
    assert r.exit_code == 0, r.stderr
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert invoke(["export", sel, "-o", tmp_path / "kept.jsonl"]).exit_code == 0
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    r = invoke(["export", sel, "-o", fifo])
    reader.join(timeout=60)
    assert r.exit_code == 0, r.stderr
    assert got == [(tmp_path / "kept.jsonl").read_bytes()]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "nowhere.jsonl")  # a link to nothing is still there: replaced only with --force
    r = invoke(["export", sel, "-o", dangling])
    assert r.exit_code == 2 and "exists; pass --force" in one_line(r)
    assert dangling.is_symlink()


@pytest.mark.parametrize("case", ["artifact-to-device", "artifact-to-stdout", "directory", "parent-is-a-file",
                                  "name-too-long", "checkpoint-name-too-long", "parquet-gz"])
def test_outputs_that_cannot_be_written_are_one_line(tmp_path, data, models, case):
    _emb, strata, sel = chain(tmp_path, data, models)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    args, words = {
        "artifact-to-device": (["select", strata, "-o", os.devnull, "--force", *proxy(models)], "not a regular file"),
        "artifact-to-stdout": (["embed", data, "-o", "-", *models], "not a stream"),
        "directory": (["export", sel, "-o", tmp_path / "adir", "--force"], "is a directory"),
        "parent-is-a-file": (["export", sel, "-o", tmp_path / "afile" / "out.jsonl"], "Not a directory"),
        "name-too-long": (["export", sel, "-o", tmp_path / ("n" * 300 + ".jsonl")], "file name too long"),
        "checkpoint-name-too-long": (["select", strata, "-o", tmp_path / ("s" * 244 + ".parquet"), *proxy(models)],
                                     "too long for its resume checkpoint"),
        "parquet-gz": (["export", sel, "-o", tmp_path / "out.parquet.gz"], "drop the compression suffix"),
    }[case]
    before = listing(tmp_path)
    r = invoke(args)
    assert r.exit_code == 2
    assert words in one_line(r)
    assert listing(tmp_path) == before and stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_a_long_legal_output_name_works(tmp_path, data, models):
    emb, _strata, sel = chain(tmp_path, data, models)
    long = tmp_path / ("k" * 244 + ".parquet")  # 252 bytes: legal, but not with ".NAME.parts" around it
    r = invoke(["embed", data, "-o", long, *models, "-q"])
    assert r.exit_code == 0, r.stderr
    assert long.read_bytes() == emb.read_bytes()
    out = tmp_path / ("x" * 244 + ".jsonl")
    assert invoke(["export", sel, "-o", out, "-q"]).exit_code == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_is_one_line(tmp_path, data, models):
    _emb, _strata, sel = chain(tmp_path, data, models)
    r = invoke(["export", sel, "-o", "/dev/full"])  # every write fails with ENOSPC
    assert r.exit_code == 1
    assert one_line(r) == "error: /dev/full: No space left on device; nothing was written"


# --- 7. a damaged selection or artifact is refused ----------------------------------------------------------------


@pytest.mark.parametrize("damage", ["duplicate-row", "negative-row", "row-out-of-range", "huge-row", "row-deleted",
                                    "kept-null", "kept-miscounted", "metadata-not-json", "no-kept-column",
                                    "null-in-kept"])
def test_a_damaged_selection_is_refused(tmp_path, data, models, damage):
    _emb, _strata, sel = chain(tmp_path, data, models)
    table = pq.read_table(sel)
    rows = table["row"].to_pylist()
    kept_rows = [i for i, k in enumerate(table["kept"].to_pylist()) if k]

    def with_rows(new_rows: list[int]) -> pa.Table:
        return table.set_column(0, "row", pa.array(new_rows, pa.int64()))

    if damage == "duplicate-row":
        rewrite(sel, with_rows([rows[kept_rows[1]] if i == kept_rows[0] else r for i, r in enumerate(rows)]))
    elif damage == "negative-row":
        rewrite(sel, with_rows([-1 if i == kept_rows[0] else r for i, r in enumerate(rows)]))
    elif damage == "row-out-of-range":
        rewrite(sel, with_rows([1000 if i == kept_rows[0] else r for i, r in enumerate(rows)]))
    elif damage == "huge-row":
        rewrite(sel, with_rows([10**15 if i == kept_rows[0] else r for i, r in enumerate(rows)]))
    elif damage == "row-deleted":
        rewrite(sel, table.slice(1) if table["kept"][0].as_py() else table.filter(pa.array(
            [i != kept_rows[0] for i in range(len(rows))])), kept=len(kept_rows) - 1)
    elif damage == "kept-null":
        rewrite(sel, kept=None)
    elif damage == "kept-miscounted":
        rewrite(sel, kept=len(kept_rows) + 1)
    elif damage == "metadata-not-json":
        rewrite(sel, meta=b"{not json")
    elif damage == "no-kept-column":
        rewrite(sel, table.drop_columns(["kept"]))
    elif damage == "null-in-kept":
        schema = table.schema.set(table.schema.get_field_index("kept"), pa.field("kept", pa.bool_()))
        kept = pa.array([None if i == kept_rows[0] else k for i, k in enumerate(table["kept"].to_pylist())])
        rewrite(sel, table.cast(schema).set_column(table.schema.get_field_index("kept"), "kept", kept))
    out = tmp_path / "kept.jsonl"
    r = invoke(["export", sel, "-o", out])
    assert r.exit_code == 2
    line = one_line(r)
    assert str(sel) in line and ("damaged" in line or "not made from this data" in line)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- 8. one writer per output -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["embed", "export", "run"])
def test_a_second_writer_of_the_same_output_is_refused(tmp_path, data, models, command):
    _emb, _strata, sel = chain(tmp_path, data, models)
    out = tmp_path / ("e2.parquet" if command == "embed" else "kept.jsonl")
    lock = tmp_path / f".{out.name}.lock"
    args = {"embed": ["embed", data, "-o", out, *models],
            "export": ["export", sel, "-o", out],
            "run": ["run", data, "-o", out, "--workdir", tmp_path / "w", *models]}[command]
    with open(lock, "w") as held:  # what the first command holds while it runs
        fcntl.flock(held, fcntl.LOCK_EX)
        r = invoke(args)
        assert r.exit_code == 2
        assert "another slap command is writing it" in one_line(r)
        assert not out.exists() and not (tmp_path / f".{out.name}.parts").exists()
    os.unlink(lock)
    r = invoke([*args, "-q"])  # once it is gone, the command runs, and leaves no lock behind
    assert r.exit_code == 0, r.stderr
    assert not [p for p in tmp_path.rglob(".*.lock")]


def test_a_file_system_without_locks_still_gets_its_output(tmp_path, data, models, monkeypatch):
    _emb, _strata, sel = chain(tmp_path, data, models)

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)  # as on some NFS mounts
    r = invoke(["export", sel, "-o", tmp_path / "kept.jsonl"])
    assert r.exit_code == 0, r.stderr
    assert len((tmp_path / "kept.jsonl").read_bytes().splitlines()) == ROWS // 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_run_holds_its_work_folder(tmp_path, data, models):
    work = tmp_path / "w"
    work.mkdir()
    with open(work / ".strata.parquet.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        r = invoke(["run", data, "-o", tmp_path / "out.jsonl", "--workdir", work, *models])
    assert r.exit_code == 2
    assert "strata.parquet: another slap command is writing it" in one_line(r)
    assert listing(work) == [".strata.parquet.lock"] and not (tmp_path / "out.jsonl").exists()


# --- 9. a signal after the final rename is success --------------------------------------------------------------


@pytest.mark.parametrize("when", ["after-rename", "before-rename"])
def test_a_signal_after_the_final_rename_reports_success(tmp_path, data, models, monkeypatch, when):
    _emb, _strata, sel = chain(tmp_path, data, models)
    import slapcli.stages.export as export_module  # the export command imports its stage when it runs

    real_export = export_module.export

    def export_then_signal(*args: object, **kwargs: object) -> object:
        if when == "before-rename":
            raise Stopped(signal.SIGTERM)
        real_export(*args, **kwargs)
        raise Stopped(signal.SIGTERM)  # as if SIGTERM landed in the few lines after os.replace

    monkeypatch.setattr(export_module, "export", export_then_signal)
    out = tmp_path / "kept.jsonl"
    r = invoke(["export", sel, "-o", out])
    if when == "after-rename":
        assert r.exit_code == 0
        assert one_line(r) == f"wrote {out} (stopped by SIGTERM after it was complete)"
        assert len(out.read_bytes().splitlines()) == ROWS // 2
    else:
        assert r.exit_code == 143
        assert one_line(r) == "terminated: no output was written; rerun the same command to continue"
        assert not out.exists()


# --- 10. permissions, the work folder, replaced artifacts -------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_get_the_umask_permissions(tmp_path, data, models, umask):
    old = os.umask(umask)
    try:
        from slapcli.io.writers import output_mode

        output_mode.cache_clear()
        emb, _strata, sel = chain(tmp_path, data, models)
        r = invoke(["export", sel, "-o", tmp_path / "kept.jsonl"])
        assert r.exit_code == 0, r.stderr
    finally:
        os.umask(old)
        output_mode.cache_clear()
    for path in (emb, sel, tmp_path / "kept.jsonl"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    # A file replaced with --force keeps the mode it was given.
    os.chmod(tmp_path / "kept.jsonl", 0o640)
    assert invoke(["export", sel, "-o", tmp_path / "kept.jsonl", "--force"]).exit_code == 0
    assert stat.S_IMODE(os.stat(tmp_path / "kept.jsonl").st_mode) == 0o640
    os.chmod(emb, 0o600)
    assert invoke(["embed", data, "-o", emb, "--force", *models, "-q"]).exit_code == 0
    assert stat.S_IMODE(os.stat(emb).st_mode) == 0o600


def test_run_says_where_its_work_folder_is_and_what_it_replaces(tmp_path, data, models, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke(["run", data, "-o", "a.jsonl", "--method", "loss", *models])
    assert r.exit_code == 0, r.stderr
    assert f"work folder: {tmp_path / 'slap_work'}" in r.stderr
    r = invoke(["run", data, "-o", "b.jsonl", "--method", "embedding", *models])
    assert r.exit_code == 0, r.stderr
    replaced = [line for line in r.stderr.splitlines() if line.startswith("replacing")]
    assert replaced and "strata.parquet: made with proxy_loss True -> False" in replaced[0]
    assert "reusing slap_work/embeddings.parquet" in r.stderr


# --- 11. proxy losses are cached across budgets ---------------------------------------------------------------


def test_a_new_budget_reuses_the_proxy_losses(tmp_path, data, models, monkeypatch):
    from slapcli.proxy import passes  # the loss pass stratify's cached_proxy_losses runs

    calls: list[int] = []
    real = passes.proxy_losses

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(passes, "proxy_losses", counted)
    emb = tmp_path / "e.parquet"
    assert invoke(["embed", data, "-o", emb, *models, "-q"]).exit_code == 0
    strata = tmp_path / "s.parquet"
    assert invoke(["stratify", emb, "-o", strata, *proxy(models), "-q"]).exit_code == 0
    first = len(calls)
    assert first >= 1
    r = invoke(["stratify", emb, "-o", tmp_path / "s2.parquet", "--keep", "0.4", "--allocation", "sqrt",
                *proxy(models), "-q"])
    assert r.exit_code == 0, r.stderr
    assert len(calls) == first  # no new pass
    assert pq.read_table(strata)["loss"] == pq.read_table(tmp_path / "s2.parquet")["loss"]

    args = ["run", data, "-o", tmp_path / "a.jsonl", "--workdir", tmp_path / "w", "--method", "loss", *models, "-q"]
    assert invoke(args).exit_code == 0
    calls.clear()
    r = invoke([*args[:3], tmp_path / "b.jsonl", *args[4:], "--keep", "0.3"])
    assert r.exit_code == 0, r.stderr
    assert calls == []


# --- 12. progress ---------------------------------------------------------------------------------------------------


def test_embed_from_stdin_prints_a_final_line_and_quiet_prints_nothing(tmp_path, data, models):
    r = runner.invoke(cli.app, ["embed", "-", "-o", str(tmp_path / "e.parquet"), *models],
                      input=data.read_bytes(), catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"wrote {tmp_path / 'e.parquet'}: {ROWS} rows"
    r = runner.invoke(cli.app, ["embed", "-", "-o", str(tmp_path / "q.parquet"), *models, "-q"],
                      input=data.read_bytes(), catch_exceptions=False)
    assert r.exit_code == 0 and r.stderr == ""


def test_bars_leave_the_screen_and_the_proxy_loss_bar_moves_per_batch(tmp_path, data, models, monkeypatch):
    assert not Reporter().bars  # stderr is not a terminal here: a bar in a log file is a stale line
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then takes stderr for a terminal
    reporter = Reporter()
    with reporter.progress("phase", 10) as task:
        assert task._progress is not None and task._progress.live.transient
    assert Reporter(bars=False).console.quiet is False

    from slapcli.progress import ProgressTask

    advances: list[float] = []
    real_update = ProgressTask.update

    def update(self: ProgressTask, **kwargs: object) -> None:
        if kwargs.get("advance"):
            advances.append(float(kwargs["advance"]))
        real_update(self, **kwargs)

    monkeypatch.setattr(ProgressTask, "update", update)
    emb = tmp_path / "e.parquet"
    assert invoke(["embed", data, "-o", emb, *models, "-q"]).exit_code == 0
    r = invoke(["stratify", emb, "-o", tmp_path / "s.parquet", *proxy(models)])
    assert r.exit_code == 0, r.stderr
    assert len(advances) >= 2 and max(advances) <= 16  # one step per loss batch (16 rows), not one at the end
