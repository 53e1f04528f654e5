"""Readers: containers (JSON Lines, JSON array, Parquet), compression, stdin, fingerprints and bad input."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import sys
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from slapcli.errors import EXIT_USAGE, DataError, SlapError, UsageError
from slapcli.io.readers import (
    _CHUNK,
    ReadStats,
    SourceReader,
    container_from_name,
    file_fingerprint,
    iter_examples,
    record_value,
)

ROOT = Path(__file__).resolve().parent.parent
LAYOUT_DIR = ROOT / "sample_data" / "layouts"
BAD_DIR = Path(__file__).resolve().parent / "data" / "bad"
BAD_EXPECTED = json.loads((BAD_DIR / "expected.json").read_text(encoding="utf-8"))
# Most bad files are errors; a few are not ("outcome": e.g. "truncated", a row over --max-tokens).
BAD_ERRORS = {name: e for name, e in BAD_EXPECTED.items() if e.get("outcome", "error") == "error"}

ALPACA_VARIANTS = ["alpaca.jsonl", "alpaca.json", "alpaca.jsonl.gz", "alpaca.jsonl.zst", "alpaca.parquet"]


def read_all(path: str | Path, **kwargs) -> tuple[SourceReader, list]:
    with SourceReader(str(path), kwargs.pop("container", None)) as reader:
        rows = list(iter_examples(reader, **kwargs))
    return reader, rows


def records(path: str | Path, container: str | None = None) -> tuple[SourceReader, list]:
    with SourceReader(str(path), container) as reader:
        recs = list(reader.records())
    return reader, recs


def texts(rows: list) -> list[tuple[str, str]]:
    return [(r.example.prompt_text, r.example.response_text) for r in rows]


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def blake(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class FakeStdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


ALPACA_LINE = b'{"instruction": "Name a fruit.", "input": "", "output": "Apple."}'


# --- sample data ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in LAYOUT_DIR.iterdir()))
def test_every_layout_sample_reads(name: str) -> None:
    fields = "prompt=ask,response=reply,system=persona" if name == "mapped.jsonl" else None
    reader, rows = read_all(LAYOUT_DIR / name, fields=fields)
    assert 5 <= len(rows) <= (10 if (LAYOUT_DIR / name).is_dir() else 8)
    assert reader.fingerprint == file_fingerprint(str(LAYOUT_DIR / name))
    assert all(r.example.response_text.strip() for r in rows)


def test_alpaca_variants_read_the_same() -> None:
    base_reader, base = read_all(LAYOUT_DIR / "alpaca.jsonl")
    assert base_reader.container == "jsonl" and base_reader.compression is None
    expected = {
        "alpaca.json": ("json", None),
        "alpaca.jsonl.gz": ("jsonl", "gzip"),
        "alpaca.jsonl.zst": ("jsonl", "zstd"),
        "alpaca.parquet": ("parquet", None),
    }
    for name, (container, compression) in expected.items():
        reader, rows = read_all(LAYOUT_DIR / name)
        assert (reader.container, reader.compression) == (container, compression), name
        assert texts(rows) == texts(base), name
        assert [r.record.index for r in rows] == list(range(len(base)))
        # Extra fields (id, source) are kept in the values.
        assert [record_value(r.record) for r in rows] == [record_value(r.record) for r in base], name
        if name != "alpaca.json":  # one row a line / a row number: the same line numbers
            assert [r.record.line for r in rows] == [r.record.line for r in base], name
    assert [r.record.line for r in base] == [1, 2, 3, 4, 5, 6]
    assert record_value(base[0].record)["id"] == "a1"
    assert record_value(base[0].record)["source"] == "handwritten"


def test_pretty_printed_json_array_lines_and_raw() -> None:
    _, rows = read_all(LAYOUT_DIR / "alpaca.json")
    text = (LAYOUT_DIR / "alpaca.json").read_text(encoding="utf-8").splitlines()
    for r in rows:
        assert text[r.record.line - 1].strip() == "{"  # the element's first line
        value = record_value(r.record)
        assert text[r.record.line].strip() == f'"id": "{value["id"]}",'
        assert r.record.raw == json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    assert [r.record.line for r in rows] == [2 + 7 * i for i in range(6)]


def test_parquet_raw_is_compact_json() -> None:
    _, rows = read_all(LAYOUT_DIR / "alpaca.parquet")
    for r in rows:
        assert json.loads(r.record.raw) == r.record.value
        assert list(r.record.value) == ["id", "source", "instruction", "input", "output"]


def test_jsonl_raw_is_the_line() -> None:
    _, rows = read_all(LAYOUT_DIR / "sharegpt.jsonl")
    lines = (LAYOUT_DIR / "sharegpt.jsonl").read_bytes().split(b"\n")
    assert [r.record.raw for r in rows] == lines[:-1]


def test_mixed_400_and_heldout() -> None:
    _, mixed = read_all(ROOT / "sample_data" / "mixed_400.jsonl")
    _, heldout = read_all(ROOT / "sample_data" / "heldout_dev_code.jsonl")
    assert len(mixed) == 400 and len(heldout) == 20
    assert len({r.record.raw for r in mixed}) == 400
    assert not {r.record.raw for r in mixed} & {r.record.raw for r in heldout}
    assert all(set(record_value(r.record)) == {"instruction", "input", "output"} for r in mixed + heldout)


# --- JSON Lines: raw bytes and line numbers ------------------------------------------------------------------------


def _row(i: int) -> bytes:
    return b'{"instruction": "Q%d", "input": "", "output": "A%d \xc3\xa9"}' % (i, i)


@pytest.mark.parametrize(
    ("data", "lines"),
    [
        (_row(1) + b"\n" + _row(2) + b"\n", [1, 2]),
        (_row(1) + b"\n" + _row(2), [1, 2]),  # no trailing newline
        (_row(1) + b"\r\n" + _row(2) + b"\r\n", [1, 2]),  # CRLF
        (b"\n\n" + _row(1) + b"\n\n  \t\n" + _row(2) + b"\n\n", [3, 6]),  # blank lines skipped, numbers kept
        (b"   \r\n" + _row(1) + b"\r\n\r\n" + _row(2), [2, 4]),
    ],
    ids=["lf", "no-final-newline", "crlf", "blank-lines", "crlf-blank-no-final"],
)
def test_jsonl_raw_bytes_and_line_numbers(tmp_path: Path, data: bytes, lines: list[int]) -> None:
    path = write(tmp_path, "d.jsonl", data)
    reader, rows = read_all(path)
    physical = data.split(b"\n")
    assert [r.record.line for r in rows] == lines
    assert [r.record.index for r in rows] == [0, 1]
    # raw is the physical line without its "\n" (a CRLF file keeps its "\r": raw + b"\n" rebuilds the file)
    assert [r.record.raw for r in rows] == [physical[n - 1] for n in lines]
    assert [r.example.response_text for r in rows] == ["A1 é", "A2 é"]
    assert reader.fingerprint == file_fingerprint(str(path))


def test_index_counts_bad_records(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", _row(1) + b"\n{oops\n\n" + _row(3) + b"\n")
    stats = ReadStats()
    _, rows = read_all(path, on_bad_line="skip", stats=stats)
    assert [(r.record.index, r.record.line) for r in rows] == [(0, 1), (2, 4)]


# --- fingerprints --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALPACA_VARIANTS)
def test_fingerprint_is_size_and_blake2b_of_stored_bytes(name: str) -> None:
    path = LAYOUT_DIR / name
    data = path.read_bytes()
    with SourceReader(str(path)) as reader:
        assert reader.fingerprint is None
        assert reader.total_bytes == len(data)
        list(iter_examples(reader))
    fp = reader.fingerprint
    assert fp is not None
    assert (fp.size, fp.blake2b) == (len(data), blake(data))
    assert fp == file_fingerprint(str(path))
    assert type(fp).from_dict(fp.to_dict()) == fp
    assert fp.to_dict() == {"size": len(data), "blake2b": blake(data)}


def test_fingerprint_of_a_multi_chunk_file(tmp_path: Path) -> None:
    data = b"".join(b'{"text": "%d %s"}\n' % (i, b"w" * 400) for i in range(6_000))  # > 2 chunks
    assert len(data) > 2 * _CHUNK
    path = write(tmp_path, "big.jsonl", data)
    for p, stored in ((path, data), (write(tmp_path, "big.jsonl.gz", gzip.compress(data)), None)):
        reader, recs = records(p)
        stored = stored if stored is not None else p.read_bytes()
        assert len(recs) == 6_000
        assert reader.fingerprint is not None
        assert (reader.fingerprint.size, reader.fingerprint.blake2b) == (len(stored), blake(stored))
        assert reader.bytes_read == len(stored)


def test_fingerprints_differ_for_different_bytes(tmp_path: Path) -> None:
    a = write(tmp_path, "a.jsonl", _row(1) + b"\n")
    b = write(tmp_path, "b.jsonl", _row(1) + b"\r\n")  # same rows, other bytes
    assert read_all(a)[0].fingerprint != read_all(b)[0].fingerprint


# --- stdin ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alpaca.jsonl", "alpaca.jsonl.gz", "alpaca.jsonl.zst", "alpaca.parquet",
                                  "alpaca.json"])
def test_stdin(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    data = (LAYOUT_DIR / name).read_bytes()
    monkeypatch.setattr(sys, "stdin", FakeStdin(data))
    reader, rows = read_all("-")
    assert reader.name == "<stdin>"
    assert reader.total_bytes is None
    assert texts(rows) == texts(read_all(LAYOUT_DIR / "alpaca.jsonl")[1])
    assert reader.fingerprint is not None
    assert (reader.fingerprint.size, reader.fingerprint.blake2b) == (len(data), blake(data))


def test_stdin_errors_name_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin(ALPACA_LINE + b"\n{bad\n"))
    with pytest.raises(DataError, match=r"^<stdin>:2: malformed JSON") as info:
        read_all("-")
    assert info.value.path == "<stdin>" and info.value.line == 2


def test_stdin_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin(b""))
    with pytest.raises(DataError, match="<stdin>: empty input"):
        read_all("-")


def test_stdin_with_requested_container(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin(ALPACA_LINE + b"\n"))
    with pytest.raises(DataError, match="--input-format jsonl"):
        read_all("-", container="json")


# --- containers ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "container"),
    [
        ("a.jsonl", "jsonl"), ("a.NDJSON", "jsonl"), ("a.jsonl.gz", "jsonl"), ("a.jsonl.zst", "jsonl"),
        ("a.jsonl.zstd", "jsonl"), ("a.json", "json"), ("a.json.gz", "json"), ("a.parquet", "parquet"),
        ("a.txt", None), ("a.gz", None), ("-", None), ("data", None),
    ],
)
def test_container_from_name(name: str, container: str | None) -> None:
    assert container_from_name(name) == container


@pytest.mark.parametrize(
    ("source", "name", "container", "message"),
    [
        ("alpaca.parquet", "rows.jsonl", None, "expected JSON Lines (one object per line) from the file name"),
        ("alpaca.parquet", "rows.json", None,
         "but the content is Parquet; rename the file or pass --input-format parquet"),
        ("alpaca.json", "rows.jsonl", None, "the content is a JSON array"),
        ("alpaca.jsonl", "rows.json", None, "the content is JSON Lines"),
        ("alpaca.jsonl", "rows.parquet", None, "expected Parquet"),
        ("alpaca.jsonl.gz", "rows.json.gz", None, "--input-format jsonl"),
        ("alpaca.jsonl", "rows.txt", "json", "expected a JSON array from the file name or --input-format"),
        ("alpaca.json", "rows.jsonl", "parquet", "expected Parquet"),
    ],
)
def test_container_mismatch(tmp_path: Path, source: str, name: str, container: str | None, message: str) -> None:
    path = write(tmp_path, name, (LAYOUT_DIR / source).read_bytes())
    with pytest.raises(DataError) as info:
        read_all(path, container=container)
    assert message in str(info.value)
    assert info.value.line == 1
    assert info.value.exit_code == EXIT_USAGE
    assert str(info.value).startswith(f"{path}:1: ")


def test_requested_container_overrides_the_name(tmp_path: Path) -> None:
    path = write(tmp_path, "rows.json", (LAYOUT_DIR / "alpaca.jsonl").read_bytes())
    reader, rows = read_all(path, container="jsonl")
    assert reader.container == "jsonl" and len(rows) == 6


def test_unnamed_file_is_sniffed(tmp_path: Path) -> None:
    for source in ("alpaca.jsonl", "alpaca.json", "alpaca.jsonl.gz", "alpaca.parquet"):
        path = write(tmp_path, "rows.data", (LAYOUT_DIR / source).read_bytes())
        assert len(read_all(path)[1]) == 6, source


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("{tmp}/missing.jsonl",), "no such file"),
        (("{tmp}/folder",), "a folder with no data files"),
        (("{tmp}/a.jsonl", "yaml"), "unknown input format 'yaml'"),
    ],
)
def test_usage_errors(tmp_path: Path, args: tuple, message: str) -> None:
    write(tmp_path, "a.jsonl", ALPACA_LINE + b"\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "README.md").write_text("not data")
    with pytest.raises(UsageError, match=message) as info:
        SourceReader(args[0].format(tmp=tmp_path), *args[1:])
    assert info.value.exit_code == EXIT_USAGE


@pytest.mark.parametrize(("kwargs", "message"), [({"layout": "yaml"}, "unknown layout 'yaml'"),
                                                 ({"on_bad_line": "warn"}, "--on-bad-line")])
def test_iter_examples_usage_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        read_all(LAYOUT_DIR / "alpaca.jsonl", **kwargs)


def test_explicit_layout(tmp_path: Path) -> None:
    # A row with prompt, response *and* text is detected as prompt_response; --format text reads the text field.
    path = write(tmp_path, "a.jsonl", b'{"prompt": "p", "response": "r", "text": "all of it"}\n')
    assert texts(read_all(path)[1]) == [("p", "r")]
    assert texts(read_all(path, layout="text")[1]) == [("", "all of it")]
    with pytest.raises(DataError, match="from line the --format option"):
        read_all(LAYOUT_DIR / "alpaca.jsonl", layout="sharegpt")


# --- the bad corpus ------------------------------------------------------------------------------------------------


def test_bad_corpus_is_complete() -> None:
    assert sorted(BAD_EXPECTED) == sorted(p.name for p in BAD_DIR.iterdir() if p.name != "expected.json")


@pytest.mark.parametrize("name", sorted(BAD_ERRORS))
def test_bad_corpus(name: str) -> None:
    expected = BAD_ERRORS[name]
    path = str(BAD_DIR / name)
    with pytest.raises(SlapError) as info:
        read_all(path)
    error = info.value
    message = str(error)
    assert isinstance(error, (DataError, UsageError)), type(error)
    assert error.exit_code == EXIT_USAGE == 2
    assert expected["message_contains"] in message
    assert "\n" not in message
    line, field = expected["line"], expected["field"]
    where = path if line is None else f"{path}:{line}"
    assert message.startswith(f"{where}: "), message
    if field is not None:
        assert f"field '{field}'" in message
    if isinstance(error, DataError):
        assert (error.path, error.line, error.field) == (path, line, field)


@pytest.mark.parametrize(
    ("name", "good", "skipped"),
    [
        ("malformed_json.jsonl", 3, 1),
        ("no_response.jsonl", 2, 1),
        ("empty_response.jsonl", 3, 1),
        ("non_utf8.jsonl", 2, 1),
        ("mixed_layouts.jsonl", 2, 1),
        ("sharegpt_bad_role.jsonl", 1, 1),
        ("not_object.jsonl", 2, 1),
        ("duplicate_ids.jsonl", 3, 1),
    ],
)
def test_skip_bad_lines(name: str, good: int, skipped: int) -> None:
    stats = ReadStats()
    _, rows = read_all(BAD_DIR / name, on_bad_line="skip", stats=stats)
    assert len(rows) == good
    assert stats.records == good + skipped
    assert stats.bad_skipped == skipped
    expected = BAD_EXPECTED[name]
    assert len(stats.bad_examples) == 1
    assert expected["message_contains"] in stats.bad_examples[0]
    assert f"{BAD_DIR / name}:{expected['line']}: " in stats.bad_examples[0]
    assert expected["line"] not in [r.record.line for r in rows]


def test_a_row_over_max_tokens_reads_like_any_other() -> None:
    # Truncation happens in embed (counted in its summary): the reader must not refuse a long row.
    expected = BAD_EXPECTED["over_max_tokens.jsonl"]
    _, rows = read_all(BAD_DIR / "over_max_tokens.jsonl")
    assert len(rows) == expected["rows"]
    assert len(rows[expected["line"] - 1].example.response_text) > 20_000


@pytest.mark.parametrize(
    ("ids", "duplicate_line"),
    [
        (["a", "b", "c"], None),
        ([1, "1", 1.5], None),  # ids compare as JSON values
        ([None, None, "x"], None),  # a null id is no id
        ([{"k": [1, 2]}, 3, {"k": [1, 2]}], 3),
        ([7, 8, 7], 3),
    ],
)
def test_duplicate_ids(tmp_path: Path, ids: list, duplicate_line: int | None) -> None:
    rows = [{"id": i, "instruction": f"q{n}", "output": f"a{n}"} for n, i in enumerate(ids)]
    path = write(tmp_path, "ids.jsonl", b"".join(json.dumps(r).encode() + b"\n" for r in rows))
    if duplicate_line is None:
        assert len(read_all(path)[1]) == len(ids)
        return
    with pytest.raises(DataError, match="duplicate id") as info:
        read_all(path)
    assert (info.value.line, info.value.field) == (duplicate_line, "id")


def test_duplicate_ids_in_one_line_of_a_json_array(tmp_path: Path) -> None:
    row = b'{"id": 5, "instruction": "q", "output": "a"}'
    with pytest.raises(DataError, match="duplicate id 5: the row at line 1"):
        read_all(write(tmp_path, "a.json", b"[" + row + b", " + row + b"]"))


def test_skip_keeps_five_examples_and_fails_when_nothing_is_left(tmp_path: Path) -> None:
    path = write(tmp_path, "a.jsonl", b"".join(b'{"instruction": "q", "output": ""}\n' for _ in range(8)))
    stats = ReadStats()
    with pytest.raises(DataError, match=r"no usable rows \(8 bad rows skipped\)"):
        read_all(path, on_bad_line="skip", stats=stats)
    assert stats.bad_skipped == 8 and len(stats.bad_examples) == 5


def test_skip_does_not_hide_unknown_layout() -> None:
    with pytest.raises(UsageError, match="unknown layout"):
        read_all(BAD_DIR / "unknown_layout.jsonl", on_bad_line="skip")


def test_skip_non_object_first_row(tmp_path: Path) -> None:
    path = write(tmp_path, "a.jsonl", b"42\n" + ALPACA_LINE + b"\n")
    stats = ReadStats()
    _, rows = read_all(path, on_bad_line="skip", stats=stats)
    assert len(rows) == 1 and stats.bad_skipped == 1


# --- robustness ----------------------------------------------------------------------------------------------------

_json_ish = st.lists(
    st.one_of(
        st.sampled_from([ALPACA_LINE, b"", b"   ", b"{", b"[1]", b"42", b'"x"', b"null", b'{"text": ""}',
                         b'{"conversations": [{"from": "human", "value": "hi"}]}', b'{"text": "\xff"}',
                         b'{"prompt": "p", "completion": 3}', b"\xef\xbb\xbf", b"PAR1", b"\r"]),
        st.binary(max_size=40),
    ),
    max_size=8,
).map(b"\n".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=200), _json_ish), on_bad_line=st.sampled_from(["error", "skip"]))
def test_arbitrary_bytes_never_crash(tmp_path: Path, data: bytes, on_bad_line: str) -> None:
    path = write(tmp_path, "fuzz.jsonl", data)
    try:
        _, rows = read_all(path, on_bad_line=on_bad_line)
    except SlapError as e:
        assert str(e)
    else:
        assert rows and all(r.example.response_text.strip() for r in rows)


def _outcome(path: Path) -> object:
    try:
        return texts(read_all(path, on_bad_line="skip")[1])
    except SlapError as e:
        return type(e), str(e).replace(str(path), "<file>")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=100), _json_ish))
def test_compressed_bytes_read_like_plain_bytes(tmp_path: Path, data: bytes) -> None:
    assume(not data.startswith((b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"PAR1", b"ARROW1")))
    plain = _outcome(write(tmp_path, "f.jsonl", data))
    assert _outcome(write(tmp_path, "f.jsonl.gz", gzip.compress(data))) == plain
    assert _outcome(write(tmp_path, "f.jsonl.zst", zstandard.ZstdCompressor().compress(data))) == plain


def test_json_array_across_many_chunks(tmp_path: Path) -> None:
    """3,000 elements, some with big strings (one over 1 MiB) and multi-byte characters, so elements straddle
    1 MiB chunk edges."""
    parts, lines, line = ["[\n"], [], 2
    for i in range(3000):
        size = 1_200_000 if i == 1500 else 7_000 if i % 7 == 0 else 300 + i % 50
        body = ("é€𝄞" * (i % 3 + 1) + "x" * size)[:size]
        row = {"i": i, "instruction": f"Question {i}\n?", "input": "", "output": body}
        text = json.dumps(row, ensure_ascii=False, indent=1 if i % 5 == 0 else None)
        lines.append(line)
        sep = ",\n" if i % 2 else " ,\n\n"
        chunk = text + (sep if i < 2999 else "\n]\n")
        parts.append(chunk)
        line += chunk.count("\n")
    data = "".join(parts).encode()
    assert len(data) > 5 * _CHUNK
    path = write(tmp_path, "big.json", data)
    reader, rows = read_all(path)
    assert [record_value(r.record)["i"] for r in rows] == list(range(3000))
    assert [r.record.line for r in rows] == lines
    assert rows[7].example.prompt_text == "Question 7\n?"
    assert len(rows[7].example.response_text) == 7_000
    assert reader.fingerprint == file_fingerprint(str(path))
    _, gz_rows = read_all(write(tmp_path, "big.json.gz", gzip.compress(data)))
    assert [r.record.line for r in gz_rows] == lines


def test_json_array_numbers_across_chunk_edges(tmp_path: Path) -> None:
    # A number cut by a chunk edge must not be read as two numbers.
    data = ("[" + " " * (_CHUNK - 4) + "12345678, 9]").encode()
    _, recs = records(write(tmp_path, "n.json", data))
    assert [r.value for r in recs] == [12345678, 9]


@pytest.mark.parametrize(
    ("data", "message", "line"),
    [
        (b"[]", "the JSON array has no rows", 1),
        (b"[\n\n]\n", "the JSON array has no rows", 3),
        (b"[" + ALPACA_LINE + b"] x", "unexpected data after the JSON array's closing ']'", 1),
        (b"[" + ALPACA_LINE + b";\n" + ALPACA_LINE + b"]", "expected ',' or ']', found ';'", 1),
        (b"[\n" + ALPACA_LINE + b",\n{oops}]", "malformed JSON array element", 3),
        (b'[\n{"text": "\xe9"}]', "not valid UTF-8", None),
    ],
)
def test_json_array_errors(tmp_path: Path, data: bytes, message: str, line: int | None) -> None:
    path = write(tmp_path, "a.json", data)
    with pytest.raises(DataError, match=message) as info:
        read_all(path)
    if line is not None:
        assert info.value.line == line


def test_corrupt_parquet(tmp_path: Path) -> None:
    path = write(tmp_path, "a.parquet", b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_all(path)


def test_truncated_large_gzip(tmp_path: Path) -> None:
    data = gzip.compress(b"".join(_row(i) + b"\n" for i in range(60_000)))
    path = write(tmp_path, "t.jsonl.gz", data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cannot decompress \(gzip\)"):
        read_all(path)


# --- damaged compression and long blank runs ------------------------------------------------------------------------

_GZ = gzip.compress(b"".join(_row(i) + b"\n" for i in range(50)), mtime=0)
_ZST = zstandard.ZstdCompressor().compress(b"".join(_row(i) + b"\n" for i in range(50)))


@pytest.mark.parametrize(
    "name, data",
    [
        ("header_then_garbage.jsonl.gz", _GZ[:10] + bytes(range(7, 200)) * 3),
        ("small_truncated.jsonl.gz", _GZ[: len(_GZ) // 2]),
        ("garbage.jsonl.zst", b"\x28\xb5\x2f\xfd" + bytes(range(7, 200)) * 3),
    ],
)
def test_corrupt_compressed_input_is_a_data_error(tmp_path: Path, name: str, data: bytes) -> None:
    with pytest.raises(DataError, match="cannot decompress"):
        read_all(write(tmp_path, name, data))


@pytest.mark.parametrize("cut", [5, len(_ZST) // 2, len(_ZST) - 1])
def test_truncated_zstd_is_reported(tmp_path: Path, cut: int) -> None:
    # zstandard's stream_reader ends quietly at a cut frame: small files read as 'empty input', big ones as
    # malformed JSON, and a cut at a line end would silently lose rows.
    with pytest.raises(DataError, match=r"cannot decompress \(zstd\): truncated stream"):
        read_all(write(tmp_path, "t.jsonl.zst", _ZST[:cut]))


def test_truncated_large_zstd_is_reported(tmp_path: Path) -> None:
    data = zstandard.ZstdCompressor().compress(b"".join(_row(i) + b"\n" for i in range(60_000)))
    with pytest.raises(DataError, match=r"cannot decompress \(zstd\): truncated stream"):
        read_all(write(tmp_path, "t.jsonl.zst", data[: len(data) // 2]))


def test_zstd_frames_read_as_one_stream(tmp_path: Path) -> None:
    # Several frames (as `cat a.zst b.zst` or a streaming writer makes), one of them skippable metadata.
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    compress = zstandard.ZstdCompressor().compress
    data = compress(_row(0) + b"\n" + _row(1)) + skippable + compress(b"\n" + _row(2) + b"\n")
    _, rows = read_all(write(tmp_path, "f.jsonl.zst", data))
    assert [r.record.line for r in rows] == [1, 2, 3]
    with pytest.raises(DataError, match=r"cannot decompress \(zstd\)"):
        read_all(write(tmp_path, "g.jsonl.zst", data + b"trailing garbage"))


@pytest.mark.parametrize("name, data", [("bom.jsonl", b"\xef\xbb\xbf" + ALPACA_LINE + b"\n" + ALPACA_LINE + b"\n"),
                                        ("bom.json", b"\xef\xbb\xbf[" + ALPACA_LINE + b",\n" + ALPACA_LINE + b"]")])
def test_utf8_bom(tmp_path: Path, name: str, data: bytes) -> None:
    _, rows = read_all(write(tmp_path, name, data))
    assert [r.record.line for r in rows] == [1, 2]
    assert texts(rows) == [("Name a fruit.", "Apple.")] * 2


@pytest.mark.parametrize("name, data", [("deep.jsonl", ALPACA_LINE + b'\n{"a": ' + b"[" * 100_000 + b"\n"),
                                        ("deep.json", b"[" + ALPACA_LINE + b"," + b"[" * 100_000 + b"]")])
def test_deeply_nested_json_is_a_data_error(tmp_path: Path, name: str, data: bytes) -> None:
    with pytest.raises(DataError):
        read_all(write(tmp_path, name, data))


@pytest.mark.parametrize("name", ["lead.jsonl", "lead.json", "lead.jsonl.gz", "lead.json.zst"])
@pytest.mark.parametrize("blank", [b"\n" * (_CHUNK + 5), b" \r\n" * (_CHUNK // 3 + 5)])
def test_line_numbers_after_a_megabyte_of_blank_lines(tmp_path: Path, name: str, blank: bytes) -> None:
    # Leading whitespace that fills whole read buffers is consumed before the row loop; its lines still count.
    second = ALPACA_LINE.replace(b"Apple", b"Pear")
    rows_text = ALPACA_LINE + b"\n" + second if ".jsonl" in name else b"[" + ALPACA_LINE + b",\n" + second + b"]"
    data = blank + rows_text + b"\n"
    if name.endswith(".gz"):
        data = gzip.compress(data)
    elif name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    _, rows = read_all(write(tmp_path, name, data))
    first = blank.count(b"\n") + 1
    assert [r.record.line for r in rows] == [first, first + 1]
    assert [r.example.response_text for r in rows] == ["Apple.", "Pear."]
