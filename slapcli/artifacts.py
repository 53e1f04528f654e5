"""The Parquet artifacts that connect the stages, their schemas and their metadata, in one place.

Each artifact is one Parquet file whose key-value metadata (key `slapcli`) holds a JSON document:
kind, schema version, tool version, the command and its resolved config, the source data's path and
fingerprint, the upstream artifact's path and fingerprint, and run statistics. No timestamps: the same
inputs and seed give the same bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from slapcli import __version__
from slapcli.errors import DataError, SlapError, StaleArtifactError, UsageError
from slapcli.io.readers import STDIN, Fingerprint, file_fingerprint
from slapcli.io.writers import discard, replace_into, temp_path_beside

SCHEMA_VERSION = 2  # 2: strata gained the damage screen's columns (end_loss, tail_loss, direct_loss, screen_score)
META_KEY = b"slapcli"
# Rows per Parquet row group when a whole table is written at once: readers stream one group at a time, and a
# single million-row group of embeddings took 7x longer to decode than the same rows in small groups.
ROW_GROUP_ROWS = 16_384
KINDS = ("embeddings", "strata", "selection")

# Columns every artifact starts with: where the row sits in the source.
ROW_FIELDS = [
    pa.field("row", pa.int64(), nullable=False),  # index of the record in the source (0-based, bad rows included)
    pa.field("line", pa.int64(), nullable=False),  # 1-based line (JSON Lines) or element/row number
]


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema([
        *ROW_FIELDS,
        pa.field("content_hash", pa.string(), nullable=False),  # equal for exact duplicates (prompt + response)
        pa.field("n_prompt_tokens", pa.int32(), nullable=False),  # under the proxy tokenizer, after truncation
        pa.field("n_response_tokens", pa.int32(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),  # longer than --max-tokens
        pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),  # unit norm
    ])


STRATA_SCHEMA = pa.schema([
    *ROW_FIELDS,
    pa.field("content_hash", pa.string(), nullable=False),
    pa.field("cluster", pa.int32(), nullable=False),  # spherical k-means cluster
    pa.field("centroid_distance", pa.float32(), nullable=False),  # 1 - cosine to the cluster centroid
    pa.field("n_tokens", pa.int32(), nullable=False),
    pa.field("loss", pa.float32()),  # response loss under the untrained proxy; null without a proxy
    pa.field("loss_bin", pa.int16(), nullable=False),  # loss quantile inside the cluster (0 = easiest)
    pa.field("stratum", pa.int32(), nullable=False),  # cluster * loss_bins + loss_bin
    pa.field("pruned", pa.string()),  # null, "duplicate" or "hardest": dropped before allocation
    pa.field("duplicate_of", pa.int64()),  # the row this one duplicates (first occurrence) or nearly duplicates
    # The damage screen's signals (slapcli.screen), null where not computed (duplicates, --no-screen, no proxy):
    pa.field("end_loss", pa.float32()),  # loss of the answer's end-of-turn token
    pa.field("tail_loss", pa.float32()),  # mean loss of the answer's second half
    pa.field("direct_loss", pa.float32()),  # response loss without the prompt
    pa.field("screen_score", pa.float32()),  # largest outlier score over the screen's reasons (> 3.5: flagged)
])

SELECTION_SCHEMA = pa.schema([
    *ROW_FIELDS,
    pa.field("stratum", pa.int32(), nullable=False),
    pa.field("kept", pa.bool_(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),  # why kept or pruned: selected, duplicate, hardest, budget
    pa.field("order", pa.int64()),  # position in selection order (kept rows only)
    pa.field("step", pa.int32()),  # replay step that chose the row
    pa.field("batch", pa.int32()),
    pa.field("loss", pa.float32()),  # the proxy's loss on the row when it was chosen
    pa.field("first_order", pa.float32()),  # terms of the marginal gain that chose the row
    pa.field("curvature", pa.float32()),
    pa.field("diversity", pa.float32()),
    pa.field("gain", pa.float32()),
])


@dataclass
class ArtifactMeta:
    kind: str
    command: str
    config: dict[str, Any]
    source: dict[str, Any]  # path, fingerprint, container, compression, layout
    upstream: dict[str, Any] | None = None  # path, kind, fingerprint of the artifact this was made from
    stats: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific tables, e.g. the strata
    schema_version: int = SCHEMA_VERSION
    tool_version: str = __version__

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, ensure_ascii=False).encode()

    def with_absolute_source(self) -> ArtifactMeta:
        """The source path made absolute, so a later stage finds it from any folder; the path as given is kept
        under `given` for display. (Artifacts written before this recorded the given path only.)"""
        path = self.source.get("path")
        if not path or path == STDIN or os.path.isabs(path):
            return self
        self.source = {**self.source, "path": os.path.abspath(path), "given": path}
        return self

    @property
    def source_fingerprint(self) -> Fingerprint:
        return Fingerprint.from_dict(self.source["fingerprint"])


def write_artifact(path: str, table: pa.Table, meta: ArtifactMeta) -> None:
    """Write the whole table at once, atomically, with the metadata in the footer."""
    with ArtifactWriter(path, table.schema) as writer:
        writer.write(table)
        writer.finish(meta)


class ArtifactWriter:
    """Streams row groups into a temporary file and renames it into place once `finish` is called."""

    def __init__(self, path: str, schema: pa.Schema) -> None:
        self.path = path
        self.schema = schema
        self._tmp = ""
        self._writer: pq.ParquetWriter | None = None
        self._finished = False

    def __enter__(self) -> ArtifactWriter:
        self._tmp = temp_path_beside(self.path)
        # Dictionary encoding only pays for repetitive strings (reasons, prune labels); on hashes, ids and
        # float vectors it cost 4x the write time for a larger file.
        dictionary = [f.name for f in self.schema if pa.types.is_string(f.type) and f.name != "content_hash"]
        self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd", use_dictionary=dictionary)
        return self

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        assert self._writer is not None
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        self._writer.write_table(table.cast(self.schema), row_group_size=ROW_GROUP_ROWS)

    def finish(self, meta: ArtifactMeta) -> None:
        assert self._writer is not None
        self._writer.add_key_value_metadata({META_KEY: meta.with_absolute_source().to_json()})
        self._writer.close()
        self._finished = True

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if self._writer is not None and not self._finished:
            self._writer.close()
        if exc is None and self._finished:
            replace_into(self._tmp, self.path)
        else:
            discard(self._tmp)
        if exc is None and not self._finished:
            raise RuntimeError("artifact writer closed without finish(): nothing was written")


def read_meta(path: str, expect_kind: str | None = None) -> ArtifactMeta:
    """The metadata of a slapcli artifact, with errors that say what the file is instead.

    Everything a stage relies on is checked here, once: the metadata is a JSON document of the known fields, the
    kind is one slapcli writes, and the columns of that kind are there with their types.
    """
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory, expected a slapcli artifact")
    try:
        file_meta = pq.read_metadata(path)
        kv = file_meta.metadata or {}
        schema = file_meta.schema.to_arrow_schema()
    except Exception:
        raise DataError("not a Parquet file (expected a slapcli artifact)", path) from None
    if META_KEY not in kv:
        raise DataError("a Parquet file without slapcli metadata: not made by slapcli", path)
    try:
        data = json.loads(kv[META_KEY])
    except ValueError:
        raise DataError("damaged artifact: its slapcli metadata is not JSON", path) from None
    if not isinstance(data, dict):
        raise DataError("damaged artifact: its slapcli metadata is not a JSON object", path)
    version = data.get("schema_version", 0)
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise DataError(f"artifact schema version {data['schema_version']} is newer than this slapcli "
                        f"understands ({SCHEMA_VERSION}); upgrade slapcli", path)
    try:
        meta = ArtifactMeta(**data)
    except TypeError as e:  # a field missing or unknown
        raise DataError(f"damaged artifact: its slapcli metadata does not fit ({e})", path) from None
    _check_meta(meta, schema, path)
    if expect_kind is not None and meta.kind != expect_kind:
        raise DataError(f"expected {_article(expect_kind)} {expect_kind} artifact, got {_article(meta.kind)} "
                        f"{meta.kind} artifact (made by `slap {meta.command}`)", path)
    return meta


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _check_meta(meta: ArtifactMeta, schema: pa.Schema, path: str) -> None:
    """The metadata's fields have the shapes stages read, and the file has its kind's columns and types."""
    if meta.kind not in KINDS:
        raise DataError(f"damaged artifact: unknown kind {meta.kind!r} (expected one of {', '.join(KINDS)})", path)
    for name in ("config", "source", "stats", "extra"):
        if not isinstance(getattr(meta, name), dict):
            raise DataError(f"damaged artifact: metadata field '{name}' is not an object", path)
    if meta.upstream is not None and not isinstance(meta.upstream, dict):
        raise DataError("damaged artifact: metadata field 'upstream' is not an object", path)
    try:
        Fingerprint.from_dict(meta.source["fingerprint"])
        if meta.upstream is not None:
            Fingerprint.from_dict(meta.upstream["fingerprint"])
    except (KeyError, TypeError, ValueError):
        raise DataError("damaged artifact: a fingerprint in its metadata is missing or malformed", path) from None
    if not isinstance(meta.stats.get("rows"), int):
        raise DataError("damaged artifact: its metadata has no row count (stats.rows)", path)
    expected = {"embeddings": embeddings_schema(schema.field("embedding").type.list_size)
                if "embedding" in schema.names and pa.types.is_fixed_size_list(schema.field("embedding").type)
                else embeddings_schema(0),
                "strata": STRATA_SCHEMA, "selection": SELECTION_SCHEMA}[meta.kind]
    for want in expected:
        if want.name not in schema.names:
            raise DataError(f"damaged {meta.kind} artifact: no column '{want.name}'", path)
        if schema.field(want.name).type != want.type:
            raise DataError(f"damaged {meta.kind} artifact: column '{want.name}' is "
                            f"{schema.field(want.name).type}, expected {want.type}", path)


# Columns no artifact may leave empty in any row (a null there was not written by slapcli).
_REQUIRED = frozenset(f.name for schema in (embeddings_schema(1), STRATA_SCHEMA, SELECTION_SCHEMA)
                      for f in schema if not f.nullable)


def read_table(path: str, columns: list[str] | None = None) -> pa.Table:
    try:
        table = pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as e:  # a damaged page, a truncated file
        raise DataError(f"damaged artifact: cannot read its rows ({e})", path) from None
    for name in table.column_names:
        if name in _REQUIRED and table[name].null_count:
            raise DataError(f"damaged artifact: column '{name}' has missing values", path)
    return table


def read_embeddings(path: str) -> np.ndarray:
    """The embedding column as one [rows, dim] float32 array, filled row group by row group.

    Reading the column as an Arrow table first would hold it twice at the peak (Arrow + NumPy): 3 GB
    instead of 1.5 GB for a million 384-dim rows. pre_buffer=False: with it, pyarrow fetched every row
    group's bytes up front and held them to the end (3.1 GB peak for 1M rows; 1.7 GB without).
    """
    try:
        file = pq.ParquetFile(path, pre_buffer=False)
        field = file.schema_arrow.field("embedding")
        out = np.empty((file.metadata.num_rows, field.type.list_size), dtype=np.float32)
        start = 0
        for batch in file.iter_batches(columns=["embedding"], batch_size=ROW_GROUP_ROWS):
            column = batch.column(0)
            out[start:start + len(column)] = column.flatten().to_numpy().reshape(len(column), -1)
            start += len(column)
    except (OSError, KeyError, ValueError, pa.ArrowException) as e:
        raise DataError(f"damaged artifact: cannot read its embeddings ({e})", path) from None
    return out


def upstream_record(path: str, meta: ArtifactMeta) -> dict[str, Any]:
    """How a downstream artifact remembers the artifact it was computed from."""
    return {"path": os.path.abspath(path), "kind": meta.kind, "fingerprint": file_fingerprint(path).to_dict()}


def check_upstream(meta: ArtifactMeta, upstream_path: str, name: str) -> None:
    """Refuse an upstream artifact that is not the one `meta` was computed from."""
    assert meta.upstream is not None
    if not os.path.isfile(upstream_path):
        raise UsageError(f"{name}: its {meta.upstream['kind']} artifact {upstream_path} is missing (moved or "
                         f"deleted?); pass --{meta.upstream['kind']} FILE")
    expected = Fingerprint.from_dict(meta.upstream["fingerprint"])
    actual = file_fingerprint(upstream_path)
    if actual != expected:
        raise StaleArtifactError(
            f"{upstream_path} is not the {meta.upstream['kind']} artifact that {name} was made from "
            f"(expected {expected.size} bytes, blake2b {expected.blake2b[:12]}…; found {actual.size} bytes, "
            f"blake2b {actual.blake2b[:12]}…); rerun the stages after it",
            name,
        )


def check_source(meta: ArtifactMeta, actual: Fingerprint, source_name: str, artifact_name: str) -> None:
    expected = meta.source_fingerprint
    if actual != expected:
        raise StaleArtifactError(
            f"{source_name} is not the data that {artifact_name} was made from (expected {expected.size} bytes, "
            f"blake2b {expected.blake2b[:12]}…; found {actual.size} bytes, blake2b {actual.blake2b[:12]}…)",
            artifact_name,
        )


def recorded_inputs(path: str) -> list[str]:
    """Every file an artifact was made from, as far as its records reach: its source data and its upstream
    artifacts, theirs, and so on. An output must never be one of them."""
    found: list[str] = []
    seen: set[str] = set()
    while path not in seen:  # a tampered chain could loop
        seen.add(path)
        try:
            meta = read_meta(path)
        except SlapError:
            break
        source = meta.source.get("path")
        if isinstance(source, str) and source != STDIN:
            found.append(source)
        upstream = meta.upstream.get("path") if meta.upstream else None
        if not isinstance(upstream, str):
            break
        found.append(upstream)
        path = upstream
    return found
