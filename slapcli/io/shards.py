"""Export to a folder (`-o DIR/`): the kept rows of each shard of a folder input, one output file per shard.

The output folder mirrors the input's data files: the same names, containers and compression, each holding
that shard's kept rows in their order (JSON Lines byte for byte; Parquet and Arrow with the shard's own schema
and metadata), so a sharded dataset stays sharded for the tools that wrote it. A shard with no row kept is
still written, empty. The folder is built under a hidden temporary name beside it and renamed at the end, so
a stopped export leaves no half-written folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from slapcli.errors import UsageError
from slapcli.io.readers import SourceReader, container_from_name
from slapcli.io.writers import compressed, compression_from_name, replace_into

BATCH_ROWS = 4096  # Parquet/Arrow rows read and written at a time


def is_folder_output(output: str) -> bool:
    """`-o DIR/`: a name ending in a path separator asks for one output file per input shard."""
    return output.endswith((os.sep, "/"))


def export_shards(reader: SourceReader, ranks: np.ndarray, output: str, check: Callable[[int], None],
                  progress: Callable[[int, int], None]) -> int:
    """Write the kept rows (ranks[row] >= 0) of each shard of `reader` into the folder `output`.

    `check(written)` runs before the folder is put in place (it raises when rows are missing); `progress` gets the
    stored bytes read so far and the rows written. Returns the rows written.
    """
    if reader.shards is None:
        raise UsageError(f"{output}: a folder output (ending in /) writes one file per shard of a folder input; "
                         f"{reader.name} is one file, so give a file name")
    final = output.rstrip("/" + os.sep)
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.", suffix=".tmp", dir=parent)
    try:
        written = offset = done_bytes = 0
        for shard in reader.shards:
            target = os.path.join(tmp, os.path.relpath(shard, reader.path) if os.path.isdir(reader.path)
                                  else os.path.basename(shard))
            records, kept = _write_shard(shard, target, ranks, offset)
            offset += records
            written += kept
            done_bytes += os.path.getsize(shard)
            progress(done_bytes, written)
        check(written)
        os.chmod(tmp, 0o777 & ~_umask())
        replace_into(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _kept(ranks: np.ndarray, start: int, n: int) -> np.ndarray:
    """Which of the rows start..start+n are kept (rows past the selection's end are not)."""
    keep = np.zeros(n, dtype=bool)
    known = ranks[start:start + n]
    keep[:len(known)] = known >= 0
    return keep


def _write_shard(shard: str, target: str, ranks: np.ndarray, offset: int) -> tuple[int, int]:
    """(records in the shard, rows written) after writing its kept rows to `target` in its own format."""
    container = container_from_name(shard)
    if container == "parquet":
        return _write_parquet(shard, target, ranks, offset)
    if container == "arrow":
        return _write_arrow(shard, target, ranks, offset)
    records = kept = 0
    with open(target, "wb") as f, compressed(f, compression_from_name(shard)) as stream, \
            SourceReader(shard, allow_empty=True) as reader:
        for record in reader.records():  # the same records (bad lines included) that embed counted
            records += 1
            if _kept(ranks, offset + record.index, 1)[0]:
                stream.write(record.raw + b"\n")
                kept += 1
    return records, kept


def _write_parquet(shard: str, target: str, ranks: np.ndarray, offset: int) -> tuple[int, int]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(shard) as source, pq.ParquetWriter(target, source.schema_arrow) as sink:
        return _filter_batches(source.iter_batches(batch_size=BATCH_ROWS), sink.write_batch, ranks, offset)


def _write_arrow(shard: str, target: str, ranks: np.ndarray, offset: int) -> tuple[int, int]:
    import pyarrow as pa

    with pa.memory_map(shard) as source:
        file_format = source.read(6) == b"ARROW1"
        source.seek(0)
        if file_format:
            reader: Any = pa.ipc.open_file(source)
            batches: Iterator[Any] = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        with pa.OSFile(target, "wb") as out:
            new = pa.ipc.new_file if file_format else pa.ipc.new_stream
            with new(out, reader.schema) as sink:
                return _filter_batches(batches, sink.write_batch, ranks, offset)


def _filter_batches(batches: Iterator[Any], write: Callable[[Any], None], ranks: np.ndarray,
                    offset: int) -> tuple[int, int]:
    import pyarrow as pa

    records = kept = 0
    for batch in batches:
        keep = _kept(ranks, offset + records, batch.num_rows)
        records += batch.num_rows
        if keep.any():
            write(batch.filter(pa.array(keep)))
            kept += int(keep.sum())
    return records, kept
