"""benchmark_ray's comparison of an engine's artifact with the local engine's (scripts/benchmark_ray.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from benchmark_ray import same_table


def write(path: Path, values: list[float], commit: str, row_group_size: int = 2) -> Path:
    table = pa.table({"row": pa.array(range(len(values)), pa.int64()), "x": pa.array(values, pa.float32())})
    pq.write_table(table.replace_schema_metadata({"commit": commit}), path, row_group_size=row_group_size)
    return path


def test_same_rows_under_other_metadata_and_row_groups_are_the_same_table(tmp_path):
    values = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5]  # row groups of 2 and of 3: batches must not follow them
    a = write(tmp_path / "a.parquet", values, "abc")
    b = write(tmp_path / "b.parquet", values, "def", row_group_size=3)
    assert a.read_bytes() != b.read_bytes()
    assert same_table(a, b, batch_rows=2)


def test_a_changed_value_a_missing_row_or_another_type_is_not(tmp_path):
    a = write(tmp_path / "a.parquet", [0.5, 1.5, 2.5], "abc")
    assert not same_table(a, write(tmp_path / "value.parquet", [0.5, 1.5, 2.25], "abc"), batch_rows=2)
    assert not same_table(a, write(tmp_path / "short.parquet", [0.5, 1.5], "abc"), batch_rows=2)
    wide = pa.table({"row": pa.array(range(3), pa.int64()), "x": pa.array([0.5, 1.5, 2.5], pa.float64())})
    pq.write_table(wide, tmp_path / "type.parquet")
    assert not same_table(a, tmp_path / "type.parquet", batch_rows=2)
