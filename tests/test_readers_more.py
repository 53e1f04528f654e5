"""Readers (issues 21, 22): folders of shards, Arrow files, pipes read once, and strict JSON (duplicate keys,
lone surrogates, over-long integers) as skippable data errors naming file and line."""

from __future__ import annotations

import gzip
import json
import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from slapcli.errors import DataError, UsageError
from slapcli.io.readers import (
    ReadStats,
    SourceReader,
    file_fingerprint,
    is_stream,
    iter_examples,
    list_shards,
    record_value,
)

LAYOUT_DIR = Path(__file__).resolve().parent.parent / "sample_data" / "layouts"
ROW = {"instruction": "Name a colour.", "input": "", "output": "Blue."}


def read(path: str | Path, **kwargs) -> tuple[SourceReader, list]:
    with SourceReader(str(path), kwargs.pop("container", None)) as reader:
        rows = list(iter_examples(reader, **kwargs))
    return reader, rows


def line(row: dict) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode()


def rows_of_files(paths: list[Path]) -> list[dict]:
    """The rows of data files, read without slapcli: what a folder of them must read as."""
    out: list[dict] = []
    for path in paths:
        name = path.name
        if name.endswith(".parquet"):
            out += pq.read_table(path).to_pylist()
        elif name.endswith(".arrow"):
            with pa.memory_map(str(path)) as source:
                out += pa.ipc.open_stream(source).read_all().to_pylist()
        else:
            data = path.read_bytes()
            if name.endswith(".gz"):
                data = gzip.decompress(data)
            elif name.endswith(".zst"):
                data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
            out += [json.loads(x) for x in data.splitlines() if x.strip()]
    return out


# --- folders of shards ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("folder", "shards"), [
    ("hub_parquet", ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]),
    ("spark_jsonl", ["part-00000.jsonl.gz", "part-00001.jsonl.zst", "part-00002.jsonl"]),
    ("save_to_disk", ["data-00000-of-00001.arrow"]),
])
def test_a_folder_reads_as_one_dataset_in_sorted_order(folder: str, shards: list[str]) -> None:
    path = LAYOUT_DIR / folder
    assert list_shards(str(path)) == [str(path / s) for s in shards]  # README, _SUCCESS, .crc, state.json skipped
    reader, rows = read(path)
    assert [record_value(r.record) for r in rows] == rows_of_files([path / s for s in shards])
    assert [r.record.index for r in rows] == list(range(len(rows)))
    assert reader.shard_fingerprints == [{"path": s, **file_fingerprint(str(path / s)).to_dict()} for s in shards]
    assert reader.fingerprint == file_fingerprint(str(path))
    assert reader.bytes_read == reader.total_bytes == sum(os.path.getsize(path / s) for s in shards)


def test_lines_and_errors_name_the_shard(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_bytes(line(ROW) + b"\n" + line({"instruction": "i", "output": ""}) + b"\n")
    (tmp_path / "a.jsonl").write_bytes(line(ROW) + b"\n")
    with pytest.raises(DataError) as info:
        read(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'b.jsonl'}:2: field 'output': no response")
    stats = ReadStats()
    _, rows = read(tmp_path, on_bad_line="skip", stats=stats)
    assert [(r.record.file, r.record.line, r.record.index) for r in rows] == [
        (str(tmp_path / "a.jsonl"), 1, 0), (str(tmp_path / "b.jsonl"), 1, 1)]
    assert stats.bad_skipped == 1


def test_empty_shards_are_no_error_but_an_empty_folder_is(tmp_path: Path) -> None:
    (tmp_path / "part-0.jsonl").write_bytes(b"")
    (tmp_path / "part-1.jsonl").write_bytes(line(ROW) + b"\n")
    pq.write_table(pa.table({"instruction": pa.array([], pa.string()), "output": pa.array([], pa.string())}),
                   tmp_path / "part-2.parquet")
    assert len(read(tmp_path)[1]) == 1
    (tmp_path / "part-1.jsonl").write_bytes(b"\n")
    with pytest.raises(DataError, match="no usable rows"):
        read(tmp_path)


def test_a_folder_without_data_names_the_subfolders_that_have_some(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-0.parquet").write_bytes((LAYOUT_DIR / "alpaca.parquet").read_bytes())
    (tmp_path / "README.md").write_text("a dataset card")
    with pytest.raises(UsageError, match=r"no data files .*subfolders have some: data"):
        SourceReader(str(tmp_path))


def test_a_glob_pattern_is_a_dataset_too(tmp_path: Path) -> None:
    pattern = str(LAYOUT_DIR / "hub_parquet" / "train-*.parquet")
    assert read(pattern)[1] and file_fingerprint(pattern) == file_fingerprint(str(LAYOUT_DIR / "hub_parquet"))
    with pytest.raises(UsageError, match="no file matches"):
        SourceReader(str(tmp_path / "*.jsonl"))


def test_a_changed_shard_changes_the_fingerprint(tmp_path: Path) -> None:
    for i in range(2):
        (tmp_path / f"p{i}.jsonl").write_bytes(line(ROW) + b"\n")
    before = file_fingerprint(str(tmp_path))
    (tmp_path / "p1.jsonl").write_bytes(line(dict(ROW, output="Red.")) + b"\n")
    assert file_fingerprint(str(tmp_path)) != before
    (tmp_path / "p1.jsonl").rename(tmp_path / "p2.jsonl")  # same bytes, other name: another dataset
    assert file_fingerprint(str(tmp_path)) != before


def test_input_format_does_not_apply_to_a_folder() -> None:
    with pytest.raises(UsageError, match="does not apply to a folder"):
        SourceReader(str(LAYOUT_DIR / "hub_parquet"), "jsonl")
    assert SourceReader(str(LAYOUT_DIR / "hub_parquet"), "parquet").container == "parquet"
    assert SourceReader(str(LAYOUT_DIR / "spark_jsonl")).container == "jsonl"


# --- Arrow files ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "stream"])
def test_arrow_ipc_file_and_stream(tmp_path: Path, kind: str) -> None:
    table = pa.table({"instruction": ["a", "b", "c"], "output": ["x", "y", "z"], "score": [1, 2, 3]})
    path = tmp_path / "d.arrow"
    with pa.OSFile(str(path), "wb") as sink:
        writer = pa.ipc.new_file(sink, table.schema) if kind == "file" else pa.ipc.new_stream(sink, table.schema)
        writer.write_table(table, max_chunksize=2)
        writer.close()
    reader, rows = read(path)
    assert reader.container == "arrow"
    assert [record_value(r.record) for r in rows] == table.to_pylist()
    assert rows[0].record.raw == b'{"instruction":"a","output":"x","score":1}'
    assert reader.fingerprint == file_fingerprint(str(path))


def test_a_damaged_arrow_file_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "d.arrow"
    path.write_bytes(b"ARROW1\x00\x00garbage")
    with pytest.raises(DataError, match=r"not a readable Arrow file|cannot read"):
        read(path)


def test_a_corrupt_parquet_data_page_is_a_data_error(tmp_path: Path) -> None:
    table = pa.table({"instruction": [f"question {i} " * 20 for i in range(2000)],
                      "output": [f"answer {i} " * 20 for i in range(2000)]})
    path = tmp_path / "d.parquet"
    pq.write_table(table, path, compression="none")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 400] = os.urandom(400)
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as info:
        read(path)
    assert str(info.value).startswith(str(path))


# --- pipes ----------------------------------------------------------------------------------------------------------


def test_a_fifo_is_read_once_like_stdin(tmp_path: Path) -> None:
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    data = (LAYOUT_DIR / "alpaca.jsonl").read_bytes()

    def feed() -> None:
        with open(fifo, "wb") as f:  # blocks until the reader opens it; a second open would hang the test
            f.write(data)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    assert is_stream(str(fifo)) and not is_stream(str(LAYOUT_DIR / "alpaca.jsonl"))
    reader, rows = read(fifo)
    writer.join(timeout=10)
    assert len(rows) == 6 and reader.total_bytes is None
    assert reader.fingerprint == file_fingerprint(str(LAYOUT_DIR / "alpaca.jsonl"))


def test_parquet_through_a_fifo_is_spooled(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    data = (LAYOUT_DIR / "alpaca.parquet").read_bytes()
    writer = threading.Thread(target=lambda: Path(fifo).write_bytes(data), daemon=True)
    writer.start()
    reader, rows = read(fifo)
    writer.join(timeout=10)
    assert len(rows) == 6 and reader.container == "parquet"
    assert reader.fingerprint == file_fingerprint(str(LAYOUT_DIR / "alpaca.parquet"))


# --- strict JSON ----------------------------------------------------------------------------------------------------

BAD_ROWS = {
    "duplicate key": (b'{"instruction": "i", "output": "scored", "output": "trained"}', "field 'output'",
                      "appears twice"),
    "nested duplicate key": (b'{"instruction": "i", "output": "o", "meta": {"a": 1, "a": 2}}', "field 'a'",
                             "appears twice"),
    "lone surrogate in text": (b'{"instruction": "i\\ud800", "output": "o"}', "field 'instruction'",
                               "lone surrogate"),
    "lone surrogate in an extra field": (b'{"instruction": "i", "output": "o", "tags": ["x", "\\udfff"]}',
                                         "field 'tags[1]'", "lone surrogate"),
    "huge integer": (b'{"instruction": "i", "output": "o", "n": ' + b"7" * 5000 + b"}", "",
                     "integer too long to read (5000 digits)"),
}
GOOD = b'{"instruction": "i", "output": "o", "emoji": "\\ud83d\\ude00", "text": "a \\\\ud800 that is no escape"}'


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
@pytest.mark.parametrize("container", ["jsonl", "json"])
def test_strict_json_errors_name_file_and_line_and_skip(tmp_path: Path, case: str, container: str) -> None:
    bad, field, message = BAD_ROWS[case]
    if container == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_bytes(GOOD + b"\n" + bad + b"\n" + GOOD + b"\n")
    else:
        path = tmp_path / "d.json"
        path.write_bytes(b"[\n" + GOOD + b",\n" + bad + b",\n" + GOOD + b"\n]\n")
    with pytest.raises(DataError) as info:
        read(path)
    text = str(info.value)
    bad_line = 2 if container == "jsonl" else 3  # the array's "[" has a line of its own
    assert text.startswith(f"{path}:{bad_line}: {field + ': ' if field else ''}") and message in text, text
    assert "\n" not in text
    stats = ReadStats()
    _, rows = read(path, on_bad_line="skip", stats=stats)
    assert [r.record.index for r in rows] == [0, 2] and stats.bad_skipped == 1
    assert record_value(rows[0].record)["emoji"] == "\U0001F600"  # a valid surrogate pair is one character


def test_an_integer_under_the_limit_reads(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"instruction": "i", "output": "o", "n": ' + b"9" * 4000 + b"}\n")
    assert record_value(read(path)[1][0].record)["n"] == int("9" * 4000)


def test_a_hub_folder_with_several_splits_is_refused_with_the_pattern_to_pass(tmp_path: Path) -> None:
    for name in ("train-00000-of-00002.parquet", "train-00001-of-00002.parquet"):
        (tmp_path / name).write_bytes((LAYOUT_DIR / "hub_parquet" / name).read_bytes())
    (tmp_path / "test-00000-of-00001.parquet").write_bytes((LAYOUT_DIR / "alpaca.parquet").read_bytes())
    with pytest.raises(UsageError, match=r"holds the splits test, train, .*'.*/train-\*'"):
        SourceReader(str(tmp_path))
    assert len(read(str(tmp_path / "train-*"))[1]) == 10
    (tmp_path / "test-00000-of-00001.parquet").rename(tmp_path / "test_sft-00000-of-00001-5e2e4b3c.parquet")
    with pytest.raises(UsageError, match="holds the splits test_sft, train, "):
        SourceReader(str(tmp_path))


def test_a_folder_of_train_and_test_files_is_refused(tmp_path: Path) -> None:
    for name in ("train.jsonl", "test.jsonl"):
        (tmp_path / name).write_bytes(line(ROW) + b"\n")
    with pytest.raises(UsageError, match=r"holds the splits test, train, .*'.*/train\.\*'"):
        SourceReader(str(tmp_path))
    assert len(read(str(tmp_path / "train.*"))[1]) == 1
