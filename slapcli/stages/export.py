"""Stage 4, export: write the kept rows exactly as they were in the input.

The output's name decides its container, as it does for inputs, so a file slap writes is a file slap reads:
`.parquet` Parquet, `.arrow` an Arrow IPC file, `.json` a JSON array, anything else (`.jsonl`, `.ndjson`,
stdout) JSON Lines; `.gz` / `.zst` compress it. JSON Lines input gives the same bytes, line for line (as
array elements in a `.json`); other inputs give each row's compact JSON. `order="selection"` writes rows in the
order `select` chose them.

The selection is checked against its own metadata first (rows unique and in range, the kept count), and every
kept row must be found in the source: a damaged selection is refused, never exported short.

Memory stays flat in the input size: rows stream through in chunks, Parquet is written row group by row group,
and selection order spools kept rows to a temporary file and reads them back (JSON Lines by offset, Parquet by
merging rank-sorted runs).

A Parquet file has one schema. Parquet input keeps its own (columns, types, metadata). For JSON input it is
inferred from the first chunk of kept rows; a later row that does not fit it is a DataError naming the file,
line and field, never a value silently dropped or changed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from slapcli.artifacts import check_source, read_meta, read_table
from slapcli.config import ORDERS, ExportConfig
from slapcli.errors import DataError, UsageError
from slapcli.io.readers import SourceReader, container_from_name, record_value
from slapcli.io.shards import export_shards, is_folder_output
from slapcli.io.writers import STDOUT, atomic_path, compressed, compression_from_name, open_output
from slapcli.progress import ProgressTask, Reporter
from slapcli.source import source_path, verify_source

TABLE_CONTAINERS = ("parquet", "arrow")  # outputs written as typed columns (the rest are JSON text)
ROW_GROUP_ROWS = 4096  # kept rows per Parquet row group, and at most per chunk held in memory
CHUNK_BYTES = 32 << 20  # a chunk of long JSON rows closes early, at this many input bytes
SPOOL_BATCH_ROWS = 256  # selection order reads each spooled run back this many rows at a time
_TO_JSONL = "export to .jsonl to keep every row as it is"
# A kept row's index must be below this (plus 64 per selection row): a tampered index of 10**15 would otherwise
# ask for an array of that size before the source is read. Real sources stay far below it unless they hold over
# 64 skipped bad rows per good one.
_ROW_SLACK = 10_000_000

# Kept rows in source order as one Arrow table, and each row's position in selection order.
Chunk = tuple[pa.Table, np.ndarray]


@dataclass
class ExportResult:
    rows_written: int
    rows_in_source: int


def export(selection_path: str, output: str, config: ExportConfig, reporter: Reporter) -> ExportResult:
    if config.order not in ORDERS:
        raise UsageError(f"--order must be one of {', '.join(ORDERS)}")
    container_out, compression = output_format(output)
    meta = read_meta(selection_path, "selection")
    table = read_table(selection_path, ["row", "kept", "order"])
    ranks = selection_ranks(table, meta.stats, selection_path)
    n_kept = int((ranks >= 0).sum())
    src = source_path(meta, config.input, selection_path)
    verify_source(meta, src, selection_path)
    container = meta.source.get("container")

    def all_found(found: int) -> None:
        if found != n_kept:
            raise DataError(f"the selection keeps {n_kept:,} rows but only {found:,} of them are in the source "
                            f"{src}: the selection is damaged or was not made from this data", selection_path)

    if is_folder_output(output):  # -o DIR/: one file per shard of a folder input (slapcli.io.shards)
        if config.order != "source":
            raise UsageError(f"{output}: --order selection needs one output file; a folder keeps each shard's order")
        with SourceReader(src, container) as reader, \
                reporter.progress(f"export {reader.name}", reader.total_bytes, unit="bytes") as bar:
            written = export_shards(reader, ranks, output, all_found,
                                    lambda done, rows: bar.update(completed=done, rows_done=rows))
        return ExportResult(written, int(meta.stats.get("rows", len(table))))
    with SourceReader(src, container) as reader, \
            reporter.progress(f"export {reader.name}", reader.total_bytes, unit="bytes") as bar:
        if container_out in TABLE_CONTAINERS:
            chunks = _parquet_chunks(reader, ranks, bar) if container == "parquet" and not reader.stream \
                else _json_chunks(reader, ranks, bar)
            written = _export_table(chunks, n_kept, output, config.order, reader.name, all_found, container_out)
        else:
            with open_output(output) as sink, compressed(sink, compression) as stream:
                rows = _JsonRows(stream, array=container_out == "json")
                written = _export_jsonl(reader, ranks, n_kept, rows, config.order, bar, all_found)
                rows.close()
        if reader.stream:  # stdin or a pipe: only known once read
            assert reader.fingerprint is not None
            check_source(meta, reader.fingerprint, reader.name, selection_path)
        bar.update(completed=reader.total_bytes or reader.bytes_read, rows_done=written)  # all read by now
    return ExportResult(written, int(meta.stats.get("rows", len(table))))


def output_format(output: str) -> tuple[str, str | None]:
    """The container (jsonl, json, parquet, arrow) and compression an output name asks for; stdout is JSON Lines."""
    if output == STDOUT:
        return "jsonl", None
    container, compression = container_from_name(output) or "jsonl", compression_from_name(output)
    if container in TABLE_CONTAINERS and compression is not None:
        raise UsageError(f"{output}: a {container} file is not compressed as a whole; drop the compression suffix")
    return container, compression


class _JsonRows:
    """Writes rows (each one JSON value's bytes) as JSON Lines, or as the elements of one JSON array."""

    def __init__(self, stream: BinaryIO, array: bool) -> None:
        self.stream, self.array, self.count = stream, array, 0

    def write(self, raw: bytes) -> None:
        if self.array:
            self.stream.write((b"[\n" if self.count == 0 else b",\n") + raw)
        else:
            self.stream.write(raw + b"\n")
        self.count += 1

    def close(self) -> None:
        if self.array:
            self.stream.write(b"\n]\n" if self.count else b"[]\n")


def selection_ranks(table: pa.Table, stats: dict[str, Any], name: str) -> np.ndarray:
    """ranks[row] = the position of kept source row `row` in selection order; -1 for a row not kept.

    An array indexed by source row rather than a dict: 8 bytes a row, so a large selection stays cheap to hold.
    The selection must agree with its own metadata: one entry per row (unique, non-negative indices), as many
    rows and kept rows as its stats say, and a distinct selection order for every kept row.
    """
    kept = table["kept"].to_numpy().astype(bool)
    rows = table["row"].to_numpy()
    if len(rows) != stats.get("rows"):
        raise DataError(f"damaged selection: {len(rows):,} rows, but its metadata says {stats.get('rows')}", name)
    if not isinstance(stats.get("kept"), int) or int(kept.sum()) != stats["kept"]:
        raise DataError(f"damaged selection: {int(kept.sum()):,} rows are marked kept, but its metadata says "
                        f"{stats.get('kept')}", name)
    if len(rows) and (rows.min() < 0 or rows.max() >= 64 * len(rows) + _ROW_SLACK):
        bad = int(rows.min()) if rows.min() < 0 else int(rows.max())
        raise DataError(f"damaged selection: row index {bad} is out of range", name)
    if len(np.unique(rows)) != len(rows):
        raise DataError("damaged selection: a source row appears more than once", name)
    order = table["order"]
    kept_order = order.filter(pa.array(kept))
    if kept_order.null_count or len(np.unique(kept_order.to_numpy())) != len(kept_order):
        raise DataError("damaged selection: kept rows without a distinct selection order", name)
    ranks = np.full(int(rows[kept].max()) + 1 if kept.any() else 0, -1, dtype=np.int64)
    ranks[rows[kept]] = np.argsort(np.argsort(kept_order.to_numpy(), kind="stable"), kind="stable")
    return ranks


def _rank(ranks: np.ndarray, index: int) -> int:
    return int(ranks[index]) if index < len(ranks) else -1


def _export_jsonl(reader: SourceReader, ranks: np.ndarray, n_kept: int, sink: _JsonRows, order: str,
                  bar: ProgressTask, all_found: Callable[[int], None]) -> int:
    written = 0
    if order == "source":
        for record in reader.records():
            if _rank(ranks, record.index) >= 0:
                sink.write(record.raw)
                written += 1
                if written % 4096 == 0:
                    bar.update(completed=reader.bytes_read, rows_done=written)
        all_found(written)
        return written
    # Selection order: spool kept rows (source order) to disk, then emit them by rank via seeks.
    offsets = np.zeros((n_kept, 2), dtype=np.int64)
    with tempfile.TemporaryFile() as spool:
        for record in reader.records():
            rank = _rank(ranks, record.index)
            if rank >= 0:
                offsets[rank] = (spool.tell(), len(record.raw))
                spool.write(record.raw)
                written += 1
        all_found(written)
        for start, length in offsets:
            spool.seek(int(start))
            sink.write(spool.read(int(length)))
    return written


def _export_table(chunks: Iterator[Chunk], n_kept: int, output: str, order: str, name: str,
                  all_found: Callable[[int], None], container: str) -> int:
    with atomic_path(output) as tmp, _TableSink(tmp, name, container) as sink:
        if order == "source":
            for table, _ in chunks:
                sink.write(table)
        else:
            _write_in_rank_order(chunks, n_kept, sink, all_found)
        all_found(sink.rows)
    return sink.rows


class _TableSink:
    """A Parquet or Arrow IPC file writer opened on the first table, whose schema it keeps, writing bounded row
    groups (record batches)."""

    def __init__(self, path: str, name: str, container: str = "parquet") -> None:
        self.path, self.name, self.container = path, name, container
        self.rows = 0
        self._writer: pq.ParquetWriter | ipc.RecordBatchFileWriter | None = None

    def __enter__(self) -> _TableSink:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._writer is None:
            if exc_type is not None:
                return
            self._open(pa.schema([]))  # nothing kept: still a valid (empty) file
        assert self._writer is not None
        self._writer.close()

    def _open(self, schema: pa.Schema) -> None:
        try:
            self._writer = ipc.new_file(self.path, schema) if self.container == "arrow" \
                else pq.ParquetWriter(self.path, schema)
        except pa.ArrowNotImplementedError as e:  # e.g. a field that is always {}: Parquet has no empty struct
            raise DataError(f"the rows cannot be stored as Parquet ({e}); {_TO_JSONL}", self.name) from None

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self._open(table.schema)
        assert self._writer is not None
        if isinstance(self._writer, pq.ParquetWriter):
            self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        else:
            self._writer.write_table(table, max_chunksize=ROW_GROUP_ROWS)
        self.rows += table.num_rows


def _parquet_chunks(reader: SourceReader, ranks: np.ndarray, bar: ProgressTask) -> Iterator[Chunk]:
    """Kept rows of a Parquet file (or a folder of them) straight from its Arrow batches: columns, types and
    metadata stay as they are.

    (Rows that became Python values, as SourceReader yields them, would come back with inferred types.)
    """
    schema: pa.Schema | None = None
    start = done_bytes = 0
    for path in reader.files:  # a folder's shards in order: record indices run on across them
        with pq.ParquetFile(path) as source:
            if schema is None:
                schema = source.schema_arrow
            elif not source.schema_arrow.equals(schema):
                raise DataError(f"its columns differ from those of {reader.files[0]}, so the shards cannot be one "
                                f"Parquet file; {_TO_JSONL}", path)
            for batch in source.iter_batches(batch_size=ROW_GROUP_ROWS):
                batch_ranks = np.full(batch.num_rows, -1, dtype=np.int64)
                known = ranks[start:start + batch.num_rows]  # a record index is the row's position in the data
                batch_ranks[:len(known)] = known
                start += batch.num_rows
                keep = batch_ranks >= 0
                if keep.any():
                    yield pa.Table.from_batches([batch.filter(pa.array(keep))], schema=schema), batch_ranks[keep]
        done_bytes += os.path.getsize(path)
        bar.update(completed=done_bytes)


def _json_chunks(reader: SourceReader, ranks: np.ndarray, bar: ProgressTask) -> Iterator[Chunk]:
    """Kept rows of a JSON (or stdin) source, in chunks bounded in rows and bytes, as tables of one schema."""
    builder = _TableBuilder(reader.name)
    rows: list[Any] = []
    lines: list[int] = []
    chunk_ranks: list[int] = []
    size = 0
    for record in reader.records():
        rank = _rank(ranks, record.index)
        if rank < 0:
            continue
        rows.append(record_value(record))
        lines.append(record.line)
        chunk_ranks.append(rank)
        size += len(record.raw)
        if len(rows) >= ROW_GROUP_ROWS or size >= CHUNK_BYTES:
            yield builder.table(rows, lines), np.array(chunk_ranks, dtype=np.int64)
            bar.update(completed=reader.bytes_read)
            rows, lines, chunk_ranks, size = [], [], [], 0
    if rows:
        yield builder.table(rows, lines), np.array(chunk_ranks, dtype=np.int64)


class _Misfit(Exception):
    """Values whose own type does not fit the column type they must go into."""


class _TableBuilder:
    """Arrow tables of one schema from chunks of JSON rows: the first chunk's, inferred from its values.

    A later chunk must fit it: no new field, and values that convert without loss (null into any type, an integer
    into a float column). Anything else is a DataError naming the file, line and field: a Parquet file has one
    schema, and dropping or retyping a value would not be exporting the row as it was.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.schema: pa.Schema | None = None

    def table(self, rows: list[Any], lines: list[int]) -> pa.Table:
        columns = self._columns(rows, lines)
        if self.schema is None:
            table = pa.table({name: self._array(name, values, lines, None) for name, values in columns.items()})
            self.schema = table.schema
            return table
        for name in columns:
            if self.schema.get_field_index(name) < 0:
                line = next(line for row, line in zip(rows, lines, strict=True) if name in row)
                raise DataError(f"not a field of the rows before it, which set the Parquet columns; {_TO_JSONL}",
                                self.name, line, name)
        arrays = [self._array(field.name, columns.get(field.name, [None] * len(rows)), lines, field.type)
                  for field in self.schema]
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def _columns(self, rows: list[Any], lines: list[int]) -> dict[str, list[Any]]:
        """Values by field over all rows (None where a row lacks the field), fields in order of appearance."""
        names: dict[str, None] = {}
        for row, line in zip(rows, lines, strict=True):
            if not isinstance(row, dict):
                raise DataError(f"not a JSON object, so not a Parquet row; {_TO_JSONL}", self.name, line)
            names.update(dict.fromkeys(row))
        return {name: [row.get(name) for row in rows] for name in names}

    def _array(self, name: str, values: list[Any], lines: list[int], want: pa.DataType | None) -> pa.Array:
        try:
            return _convert(values, want)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, _Misfit):
            pass
        bad = _first_bad_value(values, want)
        value = values[bad]
        try:
            own = pa.array([value]).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
            reason = f"cannot be stored in a Parquet column ({e})"
        else:
            column = pa.array(values[:bad]).type if want is None else want
            reason = f"holds {own}, but the rows before it made this Parquet column {column}"
        raise DataError(f"{reason}; {_TO_JSONL}", self.name, lines[bad], name)


def _convert(values: list[Any], want: pa.DataType | None) -> pa.Array:
    """The values as one Arrow array: inferred, or of type `want` when what they hold fits it without loss."""
    array = pa.array(values)
    if want is None or array.type == want:
        return array
    if not _fits(array.type, want):
        raise _Misfit
    return pa.array(values, type=want)  # fills a struct's missing fields with nulls; checks integer ranges


def _first_bad_value(values: list[Any], want: pa.DataType | None) -> int:
    """Index of the value that makes `_convert` fail: a failing prefix stays failing, so bisect its length."""
    good, bad = 0, len(values)  # a prefix of `good` values converts, one of `bad` values does not
    while bad - good > 1:
        middle = (good + bad) // 2
        try:
            _convert(values[:middle], want)
            good = middle
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, _Misfit):
            bad = middle
    return bad - 1


def _fits(have: pa.DataType, want: pa.DataType) -> bool:
    """Whether values inferred as `have` convert to `want` keeping every field and every value's kind.

    Not Arrow's cast: that turns 1 into "1" and drops struct fields the target lacks.
    """
    if have == want or pa.types.is_null(have):
        return True
    if pa.types.is_integer(have):
        return pa.types.is_integer(want) or pa.types.is_floating(want)
    if pa.types.is_list(have) and pa.types.is_list(want):
        return _fits(have.value_type, want.value_type)
    if pa.types.is_struct(have) and pa.types.is_struct(want):
        return all(want.get_field_index(f.name) >= 0 and _fits(f.type, want.field(f.name).type) for f in have)
    return False


def _write_in_rank_order(chunks: Iterator[Chunk], n_kept: int, sink: _TableSink,
                         all_found: Callable[[int], None]) -> None:
    """Selection order in bounded memory: an external merge by rank.

    Each chunk (source order) is sorted by rank and appended to a spool file as one run of small record batches.
    Output chunk c holds ranks [c*R, (c+1)*R); as every run is sorted, what it needs from a run are the run's next
    rows, so each run is read front to back once, a small batch at a time.
    """
    run_of_rank = np.full(n_kept, -1, dtype=np.int32)
    run_starts: list[int] = []  # the first spool batch of each run
    with tempfile.TemporaryDirectory(prefix="slap-export-") as folder:
        path = os.path.join(folder, "spool.arrow")
        writer: ipc.RecordBatchFileWriter | None = None
        batches = 0
        for table, ranks in chunks:
            if writer is None:
                schema = table.schema
                writer = ipc.new_file(path, schema)
            run_of_rank[ranks] = len(run_starts)
            run_starts.append(batches)
            for batch in table.take(np.argsort(ranks)).to_batches(max_chunksize=SPOOL_BATCH_ROWS):
                writer.write_batch(batch)
                batches += 1
        all_found(int((run_of_rank >= 0).sum()))  # a rank no run holds would be read from the wrong run
        if writer is None:
            return  # nothing kept
        writer.close()
        with pa.OSFile(path, "rb") as spool:  # not memory-mapped: only the batches read are held
            reader = ipc.open_file(spool)
            runs = [_RunCursor(reader, first) for first in run_starts]
            for start in range(0, n_kept, ROW_GROUP_ROWS):
                run_ids = run_of_rank[start:start + ROW_GROUP_ROWS]
                by_run = np.argsort(run_ids, kind="stable")  # these ranks grouped by run, ascending inside each
                ids, counts = np.unique(run_ids, return_counts=True)
                pieces = [piece for run, count in zip(ids, counts, strict=True) for piece in runs[run].take(int(count))]
                # Row k of the grouped table has rank start + by_run[k]; put each rank at its place.
                sink.write(pa.Table.from_batches(pieces, schema=schema).take(np.argsort(by_run)))


class _RunCursor:
    """Reads one rank-sorted run of the spool front to back, holding at most one small batch of it."""

    def __init__(self, reader: ipc.RecordBatchFileReader, first_batch: int) -> None:
        self._reader = reader
        self._next = first_batch
        self._batch: pa.RecordBatch | None = None

    def take(self, n: int) -> list[pa.RecordBatch]:
        """The run's next `n` rows."""
        pieces = []
        while n > 0:
            if self._batch is None or self._batch.num_rows == 0:
                self._batch = self._reader.get_batch(self._next)
                self._next += 1
            piece = self._batch.slice(0, n)
            pieces.append(piece)
            self._batch = self._batch.slice(piece.num_rows)
            n -= piece.num_rows
        return pieces
