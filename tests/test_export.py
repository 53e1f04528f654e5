"""`slap export` to Parquet: streamed in bounded row groups, in source or selection order, one schema.

The chunk and spool sizes are made tiny here so that a 40-row file spans many row groups and spooled runs.
"""

from __future__ import annotations

import datetime
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from slapcli.cli import app
from slapcli.stages import export as export_module

ROWS = 40
runner = CliRunner()


def invoke(args: list) -> object:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def models(tiny_encoder_dir: Path, tiny_proxy_dir: Path) -> list[str]:
    return ["--embed-model", str(tiny_encoder_dir), "--proxy-model", str(tiny_proxy_dir)]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Row groups of 4 rows, runs read back 3 rows at a time, and a spool folder the test can look into."""
    monkeypatch.setattr(export_module, "ROW_GROUP_ROWS", 4)
    monkeypatch.setattr(export_module, "SPOOL_BATCH_ROWS", 3)
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    return spool


def json_rows() -> list[dict]:
    """Rows 0-3 (the first chunk) set the schema; later rows differ in ways that fit it."""
    rows = []
    for i in range(ROWS):
        row: dict = {"instruction": f"Explain topic {i} in {i % 5 + 1} words", "output": f"Topic {i} is simple.",
                     "score": i + 0.5, "meta": {"source": "web", "n": i}, "tags": ["a", str(i)], "input": "ctx"}
        if i >= 4:
            if i % 2:
                row["score"] = i  # an integer in a float column
            if i % 3:
                del row["meta"]["n"]  # a struct with fewer fields
            if i % 5 == 0:
                row["tags"] = []  # an empty list (inferred as list<null>)
            if i % 4 == 0:
                del row["input"]  # a missing field
            if i % 7 == 0:
                row["input"] = None
        rows.append(row)
    return rows


def as_written(row: dict) -> dict:
    """What a Parquet reader gives back for a JSON row: every field, absent ones as null."""
    return {"instruction": row["instruction"], "output": row["output"], "score": row["score"],
            "meta": {"source": row["meta"]["source"], "n": row["meta"].get("n")}, "tags": row["tags"],
            "input": row.get("input")}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def select_rows(tmp_path: Path, data: Path, models: list[str], keep: str) -> Path:
    """embed -> stratify -> select --method random (no proxy pass: fast); returns the selection artifact."""
    emb, strata, sel = tmp_path / "e.parquet", tmp_path / "s.parquet", tmp_path / "sel.parquet"
    for args in (["embed", data, "-o", emb, *models],
                 ["stratify", emb, "-o", strata, "--no-proxy-loss", "--clusters", "3", "--keep", keep],
                 ["select", strata, "-o", sel, "--method", "random", "--keep", keep]):
        r = invoke([*args, "-q"])
        assert r.exit_code == 0, r.stderr
    return sel


def kept_in_order(sel: Path, order: str) -> list[int]:
    table = pq.read_table(sel, columns=["row", "kept", "order"]).to_pylist()
    kept = [t for t in table if t["kept"]]
    return [t["row"] for t in (sorted(kept, key=lambda t: t["order"]) if order == "selection" else kept)]


def assert_row_groups_bounded(path: Path) -> None:
    meta = pq.ParquetFile(path).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert len(sizes) > 1 and max(sizes) <= 4, sizes


def leftovers(tmp_path: Path) -> list[str]:
    return [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.parent.name == "spool"]


@pytest.mark.parametrize("order", ["source", "selection"])
def test_json_rows_of_several_shapes_export_to_parquet(tmp_path, models, order):
    rows = json_rows()
    sel = select_rows(tmp_path, write_jsonl(tmp_path / "data.jsonl", rows), models, keep="1.0")
    expected_rows = kept_in_order(sel, order)
    assert len(expected_rows) == ROWS
    if order == "selection":
        assert expected_rows != sorted(expected_rows)  # else this test could not tell the orders apart

    out = tmp_path / "kept.parquet"
    r = invoke(["export", sel, "-o", out, "--order", order, "-q"])
    assert r.exit_code == 0, r.stderr
    table = pq.read_table(out)
    assert table.schema.field("score").type == pa.float64()
    assert table.to_pylist() == [as_written(rows[i]) for i in expected_rows]
    assert_row_groups_bounded(out)
    assert not leftovers(tmp_path)

    # The same rows, in the same order, as the JSON Lines export gives.
    jsonl = tmp_path / "kept.jsonl"
    assert invoke(["export", sel, "-o", jsonl, "--order", order, "-q"]).exit_code == 0
    assert [as_written(json.loads(line)) for line in jsonl.read_text().splitlines()] == table.to_pylist()


@pytest.mark.parametrize(("row", "change", "field", "reason"), [
    (10, {"score": "high"}, "score", "holds string, but the rows before it made this Parquet column double"),
    (2, {"score": "high"}, "score", "holds string, but the rows before it made this Parquet column double"),
    (9, {"score": 2.5, "extra": 1}, "extra", "not a field of the rows before it"),
    (9, {"meta": {"source": "web", "lang": "en"}}, "meta", "but the rows before it made this Parquet column struct"),
    (13, {"tags": [1, 2]}, "tags", "holds list<item: int64>, but the rows before it made"),
    (11, {"meta": {"source": "web", "n": 2.5}}, "meta", "n: double"),  # pyarrow alone would store 2
], ids=["later-chunk", "first-chunk", "new-field", "new-nested-field", "list-type", "float-into-int"])
def test_a_row_that_does_not_fit_the_schema_is_a_data_error(tmp_path, models, row, change, field, reason):
    rows = json_rows()
    rows[row].update(change)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    sel = select_rows(tmp_path, data, models, keep="1.0")
    out = tmp_path / "kept.parquet"
    for order in ("source", "selection"):
        r = invoke(["export", sel, "-o", out, "--order", order, "-q"])
        assert r.exit_code == 2, r.stderr
        lines = r.stderr.replace("\n", "").split("error: ")  # the console wraps long lines
        assert len(lines) == 2 and lines[0] == "", r.stderr
        assert lines[1].startswith(f"{data}:{row + 1}: field '{field}': "), lines[1]
        assert reason in lines[1] and "export to .jsonl" in lines[1]
        assert "Traceback" not in r.stderr
        assert not out.exists() and not leftovers(tmp_path)


def parquet_source(path: Path) -> pa.Table:
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    table = pa.table({
        "instruction": pa.array([f"Explain topic {i} in {i % 5 + 1} words" for i in range(ROWS)], pa.large_string()),
        "output": [f"Topic {i} is simple." for i in range(ROWS)],
        "weight": pa.array([i / 4 for i in range(ROWS)], pa.float32()),
        "count": pa.array(range(ROWS), pa.int16()),
        "created": pa.array([start + datetime.timedelta(hours=i) for i in range(ROWS)], pa.timestamp("ms", tz="UTC")),
        "labels": pa.array([[i, i + 1] for i in range(ROWS)], pa.list_(pa.int32())),
        "origin": pa.array(["web", "book"] * (ROWS // 2)).dictionary_encode(),
    }).replace_schema_metadata({"dataset": "test"})
    pq.write_table(table, path, row_group_size=16)
    return pq.read_table(path)


@pytest.mark.parametrize("order", ["source", "selection"])
def test_parquet_rows_keep_their_columns_and_types(tmp_path, models, order):
    data = tmp_path / "data.parquet"
    source = parquet_source(data)
    sel = select_rows(tmp_path, data, models, keep="0.5")
    expected_rows = kept_in_order(sel, order)
    assert 0 < len(expected_rows) < ROWS

    out = tmp_path / "kept.parquet"
    r = invoke(["export", sel, "-o", out, "--order", order, "-q"])
    assert r.exit_code == 0, r.stderr
    table = pq.read_table(out)
    assert table.schema.equals(source.schema, check_metadata=True), (table.schema, source.schema)
    assert table.to_pylist() == source.take(expected_rows).to_pylist()
    assert_row_groups_bounded(out)
    assert not leftovers(tmp_path)
