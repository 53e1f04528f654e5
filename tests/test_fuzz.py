"""Property-based tests of the readers and layout detection: whatever the input, a clean slapcli error or rows.

"Clean" means a DataError or UsageError (exit code 2) whose one-line message starts with the file name and,
when it names a line, names one that exists. Valid rows written in any of the containers read back as they
were written.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slapcli.errors import EXIT_USAGE, DataError, SlapError, UsageError
from slapcli.io.layouts import LAYOUTS, FieldError, detect_layout, has_text, parse_example
from slapcli.io.readers import ReadStats, SourceReader, iter_examples, record_value

# derandomize: CI must not fail on an example no one has seen locally; explore with --hypothesis-seed=N.
FAST = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

LAYOUT_KEYS = ["instruction", "input", "output", "conversations", "messages", "prompt", "completion", "response",
               "text", "from", "value", "role", "content", "id", "chosen", "rejected", "system", "tools", "functions",
               "history"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=12))
keys = st.one_of(st.sampled_from(LAYOUT_KEYS), st.text(max_size=6))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=15,
)
# Objects that look like rows more often than not, so that the layout code is reached, not just the JSON parser.
row_like = st.one_of(st.dictionaries(keys, json_values, max_size=5), json_values)


def read(path: Path, on_bad_line: str = "error") -> list:
    with SourceReader(str(path)) as reader:
        return list(iter_examples(reader, on_bad_line=on_bad_line, stats=ReadStats()))


def assert_clean(error: SlapError, path: Path, data: bytes) -> None:
    assert isinstance(error, (DataError, UsageError)), type(error)
    assert error.exit_code == EXIT_USAGE
    message = str(error)
    assert message.startswith(f"{path}"), message
    assert "\n" not in message
    if isinstance(error, DataError) and error.line is not None:
        assert 1 <= error.line <= max(1, data.count(b"\n") + 1), (error.line, message)


def outcome(path: Path, data: bytes, on_bad_line: str, text: bytes | None = None) -> list | None:
    """The rows read from `data`, or None after checking that the error is clean.

    `text` is what the reader sees after decompression (line numbers count its lines); default `data`.
    """
    path.write_bytes(data)
    try:
        rows = read(path, on_bad_line)
    except SlapError as e:
        assert_clean(e, path, data if text is None else text)
        return None
    assert rows and all(r.example.response_text.strip() for r in rows)
    return rows


@FAST
@given(values=st.lists(row_like, max_size=6), on_bad_line=st.sampled_from(["error", "skip"]),
       indent=st.sampled_from([None, 1]))
def test_arbitrary_json_values_read_or_fail_cleanly(tmp_path: Path, values: list, on_bad_line: str,
                                                    indent: int | None) -> None:
    lines = b"".join(json.dumps(v).encode() + b"\n" for v in values)
    outcome(tmp_path / "v.jsonl", lines, on_bad_line)
    outcome(tmp_path / "v.json", json.dumps(values, indent=indent).encode(), on_bad_line)


@FAST
@given(data=st.binary(max_size=300), name=st.sampled_from(["b.jsonl", "b.json", "b.jsonl.gz", "b.json.zst"]),
       compress=st.booleans())
def test_arbitrary_bytes_read_or_fail_cleanly(tmp_path: Path, data: bytes, name: str, compress: bool) -> None:
    # Raw bytes under a compressed name are a damaged stream; compressed bytes test the text path behind it.
    text = data
    if compress and name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    elif compress and name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    # A damaged stream's errors name no line; a good one's lines are those of the decompressed text.
    outcome(tmp_path / name, data, "error", text if compress else None)


def flushed_per_line(lines: list[bytes], kind: str) -> bytes:
    if kind == "gz":
        buffer = io.BytesIO()
        with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as f:
            for line in lines:
                f.write(line)
                f.flush()
        return buffer.getvalue()
    compressor = zstandard.ZstdCompressor().compressobj()
    blocks = [compressor.compress(line) + compressor.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) for line in lines]
    return b"".join(blocks) + compressor.flush()


# --- valid rows round-trip -------------------------------------------------------------------------------------------

texts = st.text(max_size=30)
answers = st.text(min_size=1, max_size=30).filter(has_text)  # a response needs some visible text
extras = st.dictionaries(st.text(max_size=6).filter(lambda k: k not in LAYOUT_KEYS), scalars, max_size=3)


@st.composite
def valid_row(draw: st.DrawFn, layout: str) -> tuple[dict[str, Any], str, str]:
    """A row in `layout`, with the prompt and response text it must parse to."""
    if layout == "alpaca":
        instruction, extra, output = draw(texts), draw(texts), draw(answers)
        row: dict[str, Any] = {"instruction": instruction, "input": extra, "output": output}
        return row, instruction if not extra.strip() else f"{instruction}\n\n{extra}", output
    if layout in ("sharegpt", "openai"):
        turns = draw(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), texts), max_size=4))
        turns.append(("assistant", draw(answers)))
        names = {"user": "human", "assistant": "gpt", "system": "system"} if layout == "sharegpt" else {}
        role_key, text_key, field = (("from", "value", "conversations") if layout == "sharegpt"
                                     else ("role", "content", "messages"))
        row = {field: [{role_key: names.get(role, role), text_key: text} for role, text in turns]}
        prompt = "\n\n".join(t for r, t in turns if r != "assistant")
        return row, prompt, "\n\n".join(t for r, t in turns if r == "assistant")
    if layout == "preference":
        prompt, answer = draw(texts.filter(str.strip)), draw(answers)
        return {"prompt": prompt, "chosen": answer, "rejected": draw(texts)}, prompt, answer
    if layout in ("prompt_completion", "prompt_response"):
        prompt, answer = draw(texts), draw(answers)
        return {"prompt": prompt, layout.split("_")[1]: answer}, prompt, answer
    text = draw(answers)
    return {"text": text}, "", text


@st.composite
def valid_file(draw: st.DrawFn) -> tuple[str, list[tuple[dict[str, Any], str, str]]]:
    layout = draw(st.sampled_from(LAYOUTS))
    rows = draw(st.lists(valid_row(layout), min_size=1, max_size=5))
    for n, (row, _, _) in enumerate(rows):
        row.update(draw(extras))
        if draw(st.booleans()):
            row["id"] = n  # unique ids are fine
    return layout, rows


@FAST
@given(file=valid_file(), ascii_only=st.booleans(), separators=st.sampled_from([None, (",", ":"), (" , ", " :  ")]))
def test_valid_jsonl_rows_round_trip(tmp_path: Path, file: tuple, ascii_only: bool, separators: Any) -> None:
    layout, rows = file
    lines = [json.dumps(row, ensure_ascii=ascii_only, separators=separators).encode() for row, _, _ in rows]
    path = tmp_path / "ok.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    parsed = read(path)
    assert [p.record.raw for p in parsed] == lines  # export copies these bytes
    assert [p.record.line for p in parsed] == list(range(1, len(rows) + 1))
    assert [record_value(p.record) for p in parsed] == [row for row, _, _ in rows]
    assert [(p.example.prompt_text, p.example.response_text) for p in parsed] == [(a, b) for _, a, b in rows]
    assert all(detect_layout(row) == layout for row, _, _ in rows)


@FAST
@given(file=valid_file(), indent=st.sampled_from([None, 2]), kind=st.sampled_from(["", ".gz", ".zst"]))
def test_valid_json_array_rows_round_trip(tmp_path: Path, file: tuple, indent: int | None, kind: str) -> None:
    _, rows = file
    data = json.dumps([row for row, _, _ in rows], indent=indent, ensure_ascii=False).encode()
    if kind == ".gz":
        data = gzip.compress(data, mtime=0)
    elif kind == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    path = tmp_path / f"ok.json{kind}"
    path.write_bytes(data)
    parsed = read(path)
    assert [record_value(p.record) for p in parsed] == [row for row, _, _ in rows]
    assert [(p.example.prompt_text, p.example.response_text) for p in parsed] == [(a, b) for _, a, b in rows]
    if indent is None:
        assert {p.record.line for p in parsed} == {1}


@FAST
@given(file=valid_file(), cut=st.floats(0.0, 1.0, exclude_max=True), kind=st.sampled_from(["gz", "zst"]))
def test_cut_compressed_streams_fail_cleanly(tmp_path: Path, file: tuple, cut: float, kind: str) -> None:
    # Valid rows, each flushed as its own block (as a streaming writer does), so that a reader that ends
    # quietly at the cut would return the rows before it.
    packed = flushed_per_line([json.dumps(row).encode() + b"\n" for row, _, _ in file[1]], kind)
    rows = outcome(tmp_path / f"c.jsonl.{kind}", packed[: int(len(packed) * cut)], "skip")
    assert rows is None  # a cut stream must never read as a shorter file


# --- layout detection ------------------------------------------------------------------------------------------------


@FAST
@given(row=row_like)
def test_a_detected_layout_parses_or_names_the_field(row: Any) -> None:
    layout = detect_layout(row)
    if layout is None:
        return
    assert layout in LAYOUTS
    try:
        example = parse_example(row, layout)
    except FieldError as e:
        top = e.field.split("[")[0].split(".")[0]
        assert top in row, (e.field, row)  # the error names a field the row has (or was required to have)
    else:
        assert any(t.role == "assistant" and t.text.strip() for t in example.turns)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_generated_row_is_detected_as_its_layout(layout: str) -> None:
    @FAST
    @given(row=valid_row(layout), extra=extras)
    def check(row: tuple, extra: dict) -> None:
        value = {**row[0], **extra}
        assert detect_layout(value) == layout
        assert parse_example(value, layout).response_text == row[2]

    check()
