"""Stage 4, export: write the kept rows exactly as they were in the input.

JSON Lines input gives the same bytes, line for line. Other inputs give one compact JSON object per line
(or Parquet when the output name ends in .parquet). `order="selection"` writes rows in the order `select`
chose them; to stay flat in memory it spools kept rows to a temporary file and reads them back by offset.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from slapcli.artifacts import check_source, read_meta, read_table
from slapcli.errors import UsageError
from slapcli.io.readers import STDIN, SourceReader, record_value
from slapcli.io.writers import atomic_path, open_output
from slapcli.progress import Reporter
from slapcli.source import source_path, verify_source

ORDERS = ("source", "selection")


@dataclass
class ExportConfig:
    order: str = "source"
    input: str | None = None  # overrides the source path recorded in the selection artifact


@dataclass
class ExportResult:
    rows_written: int
    rows_in_source: int


def export(selection_path: str, output: str, config: ExportConfig, reporter: Reporter) -> ExportResult:
    if config.order not in ORDERS:
        raise UsageError(f"--order must be one of {', '.join(ORDERS)}")
    meta = read_meta(selection_path, "selection")
    src = source_path(meta, config.input, selection_path)
    verify_source(meta, src, selection_path)
    table = read_table(selection_path, ["row", "kept", "order"])
    kept_mask = table["kept"].to_numpy(zero_copy_only=False)
    kept_rows = table["row"].to_numpy()[kept_mask]
    # rank[row] = position in selection order, for every kept row.
    selection_rank = dict(zip(kept_rows.tolist(),
                              np.argsort(np.argsort(table["order"].to_numpy(zero_copy_only=False)[kept_mask],
                                                    kind="stable"), kind="stable").tolist(), strict=True))
    as_parquet = output != "-" and output.lower().endswith(".parquet")
    with SourceReader(src, meta.source.get("container")) as reader, \
            reporter.progress(f"export {reader.name}", reader.total_bytes, unit="bytes") as bar:
        if as_parquet:
            written = _export_parquet(reader, selection_rank, output, config.order)
        else:
            with open_output(output) as sink:
                written = _export_jsonl(reader, selection_rank, sink, config.order, bar)
        if src == STDIN:
            assert reader.fingerprint is not None
            check_source(meta, reader.fingerprint, "<stdin>", selection_path)
        bar.update(completed=reader.bytes_read, rows_done=written)
    return ExportResult(written, int(meta.stats.get("rows", len(kept_mask))))


def _export_jsonl(reader: SourceReader, rank: dict[int, int], sink, order: str, bar) -> int:
    written = 0
    if order == "source":
        for record in reader.records():
            if record.index in rank:
                sink.write(record.raw + b"\n")
                written += 1
                if written % 4096 == 0:
                    bar.update(completed=reader.bytes_read, rows_done=written)
        return written
    # Selection order: spool kept rows (source order) to disk, then emit them by rank via seeks.
    offsets = np.zeros((len(rank), 2), dtype=np.int64)
    with tempfile.TemporaryFile() as spool:
        for record in reader.records():
            if record.index in rank:
                offsets[rank[record.index]] = (spool.tell(), len(record.raw))
                spool.write(record.raw + b"\n")
                written += 1
        for start, length in offsets:
            spool.seek(int(start))
            sink.write(spool.read(int(length) + 1))
    return written


def _export_parquet(reader: SourceReader, rank: dict[int, int], output: str, order: str) -> int:
    rows, ranks = [], []
    for record in reader.records():
        if record.index in rank:
            rows.append(record_value(record))
            ranks.append(rank[record.index])
    if order == "selection":
        rows = [rows[i] for i in np.argsort(ranks, kind="stable")]
    with atomic_path(output) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    return len(rows)
