"""Exact copies across embed's chunks: a row whose content was embedded in an earlier chunk takes that row's vector
and token counts instead of running the models again (10,000 identical rows encode one text, not one per chunk).

Used by `slapcli.stages.embed` (while embedding) and `slapcli.parts` (merging the parts of `embed --shard`, which
fills in what a shard could not know), so that both write the bytes of one unsharded run.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from slapcli.artifacts import embeddings_schema
from slapcli.io.readers import ParsedRow

KNOWN_BYTES = 64 << 20  # vectors kept for exact copies in later chunks: about 43,000 rows of a 384-dim encoder

# One row's values in the embeddings artifact: prompt tokens, response tokens, truncated, vector.
RowValues = tuple[int, int, bool, np.ndarray]


def rows_table(chunk: list[ParsedRow], hashes: list[str], values: list[RowValues], dim: int) -> pa.Table:
    """The embeddings artifact's rows for `chunk`."""
    vectors = np.stack([v[3] for v in values]).astype(np.float32, copy=False) if values \
        else np.zeros((0, dim), np.float32)
    return pa.table({
        "row": pa.array([r.record.index for r in chunk], pa.int64()),
        "line": pa.array([r.record.line for r in chunk], pa.int64()),
        "content_hash": pa.array(hashes, pa.string()),
        "n_prompt_tokens": pa.array([v[0] for v in values], pa.int32()),
        "n_response_tokens": pa.array([v[1] for v in values], pa.int32()),
        "truncated": pa.array([v[2] for v in values], pa.bool_()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
    }).cast(embeddings_schema(dim))


def row_values(table: pa.Table) -> list[RowValues]:
    """Each row's values, from a table of the embeddings artifact."""
    column = table.column("embedding").combine_chunks()
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
    return list(zip(table.column("n_prompt_tokens").to_pylist(), table.column("n_response_tokens").to_pylist(),
                    table.column("truncated").to_pylist(), vectors, strict=True))


class KnownRows:
    """Rows embedded in an earlier chunk, by content hash.

    Which rows are copies must depend on the data alone, never on timing, or a resumed run (or a parallel engine,
    which takes chunk k+1 before chunk k's vectors are back, or a shard) would encode other rows: the encoder's
    floats depend on the batch a text is in, so other batches are other bytes. So a hash is claimed when its
    chunk is handed out, in chunk order, and its values arrive when that chunk's table does, always before any
    later chunk's table is assembled. Memory is bounded: the first `capacity` distinct contents are kept, never
    evicted (an eviction order would be one more thing to keep in step); copies of later ones are still embedded
    once per chunk.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.home: dict[str, int] = {}  # content hash -> the chunk that embeds it
        self.values: dict[str, RowValues] = {}

    @classmethod
    def for_dim(cls, dim: int) -> KnownRows:
        return cls(KNOWN_BYTES // (4 * dim))

    def claim(self, index: int, hashes: list[str]) -> list[bool]:
        """For chunk `index`, in chunk order: which rows copy a row of an earlier chunk (their models are skipped)."""
        copies = []
        for h in hashes:
            home = self.home.get(h)
            if home is None and len(self.home) < self.capacity:
                self.home[h] = home = index
            copies.append(home is not None and home < index)
        return copies

    def learn(self, index: int, table: pa.Table) -> None:
        """Keep the values of the rows chunk `index` claimed, from its finished table."""
        hashes = table.column("content_hash").to_pylist()
        wanted = {i for i, h in enumerate(hashes) if self.home.get(h) == index and h not in self.values}
        if not wanted:
            return
        for i, (prompt, response, cut, vector) in enumerate(row_values(table)):
            if i in wanted:
                # A copy of the row, not a view: a view would keep the whole chunk's array alive.
                self.values[hashes[i]] = (prompt, response, cut, vector.copy())

    def complete(self, chunk: list[ParsedRow], hashes: list[str], copies: list[bool], encoded: pa.Table, dim: int,
                 alone: Callable[[list[ParsedRow]], pa.Table]) -> pa.Table:
        """The chunk's table: the rows the models ran on (`encoded`, in order) with the copies filled in.

        A shard (`embed --shard`) does not hold the values of a copy whose first occurrence is another shard's:
        `alone` embeds those rows by themselves, a stand-in the merge replaces with the first occurrence's values
        (`refill`), so that a part is a valid artifact on its own and the merge the unsharded bytes.
        """
        if not any(copies):
            return encoded  # the common case, and the same bytes as before copies were looked for
        foreign = [row for row, h, copy in zip(chunk, hashes, copies, strict=True) if copy and h not in self.values]
        stand_in = iter(row_values(alone(foreign)) if foreign else [])
        own = iter(row_values(encoded))
        values = [(self.values.get(h) or next(stand_in)) if copy else next(own)
                  for h, copy in zip(hashes, copies, strict=True)]
        return rows_table(chunk, hashes, values, dim)

    def refill(self, index: int, table: pa.Table) -> pa.Table:
        """Chunk `index` of a merge of shard parts, in chunk order: its copies take the values of their first
        occurrence, as in an unsharded run (a part holds stand-ins for those first seen in another shard)."""
        hashes = table.column("content_hash").to_pylist()
        copies = self.claim(index, hashes)
        if any(copies):
            values = [self.values[h] if copy else own
                      for h, copy, own in zip(hashes, copies, row_values(table), strict=True)]
            dim = table.schema.field("embedding").type.list_size
            vectors = np.stack([v[3] for v in values]).astype(np.float32, copy=False)
            columns = {"n_prompt_tokens": pa.array([v[0] for v in values], pa.int32()),
                       "n_response_tokens": pa.array([v[1] for v in values], pa.int32()),
                       "truncated": pa.array([v[2] for v in values], pa.bool_()),
                       "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()),
                                                                      dim)}
            for name, column in columns.items():
                field = table.schema.field(name)
                table = table.set_column(table.schema.get_field_index(name), field, column.cast(field.type))
        self.learn(index, table)
        return table
