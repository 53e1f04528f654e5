"""Parts written by `--shard i/N` runs, read as one: checked (one run, every shard once) and merged.

- embed: each shard writes an embeddings artifact of its chunks (`OUTPUT.part-0001-of-0004`) whose metadata
  `extra.shard` says which shard it is and which chunks (and how many rows each) it holds. `merge_embeddings`
  interleaves their chunks back into source order and writes the artifact an unsharded run writes, byte for byte:
  the same row groups (one per chunk), the same metadata (the row and truncation counts summed).
- stratify's proxy loss pass: each shard writes the loss terms of its chunks of the rows to score
  (`OUTPUT.loss-part-0001-of-0004`); the unsharded stratify reads them instead of running the proxy
  (`slapcli.loss_parts`, which checks them with `check_set`). This module loads no model library, so that
  `slap merge` starts fast.

A part from another run (other data, settings, tool version or shard count), a shard given twice or one missing
is refused with one line naming the part. Slicing and naming: `slapcli.shard`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import pyarrow.parquet as pq

from slapcli.artifacts import ArtifactMeta, ArtifactWriter, embeddings_schema, read_meta
from slapcli.copies import KnownRows
from slapcli.errors import DataError, UsageError
from slapcli.progress import Reporter
from slapcli.shard import EMBED_PART, Shard, parse_part_name, part_path

# Embedding stats that count the shard's own rows (summed over the parts); every other stat describes the whole
# read of the source, which each shard makes in full, and must be equal in every part.
SUMMED_STATS = ("rows", "truncated")


class _Part(Protocol):
    path: str


P = TypeVar("P", bound=_Part)  # an embed part here, a loss part in slapcli.loss_parts


def shard_record(shard: Shard, chunks_total: int, chunk_rows: dict[int, int]) -> dict[str, Any]:
    """What an embed part's metadata says about its slice (`extra.shard`)."""
    return {**shard.to_dict(), "chunks_total": chunks_total, "chunks": [[c, chunk_rows[c]] for c in sorted(chunk_rows)]}


@dataclass(frozen=True)
class _EmbedPart:
    path: str
    meta: ArtifactMeta
    shard: Shard
    record: dict[str, Any]


def _read_embed_part(path: str) -> _EmbedPart:
    meta = read_meta(path, "embeddings")
    record = meta.extra.get("shard")
    if not isinstance(record, dict):
        raise UsageError(f"{path}: not a part (an embeddings artifact of a whole run, not of `slap embed --shard`); "
                         "pass only the parts")
    try:
        shard = Shard(int(record["index"]), int(record["count"]))
        chunks = [(int(c), int(n)) for c, n in record["chunks"]]
        total = int(record["chunks_total"])
    except (KeyError, TypeError, ValueError):
        raise DataError("damaged part: its shard record is malformed", path) from None
    if [c for c, _ in chunks] != [c for c in range(total) if shard.owns(c)]:
        raise DataError(f"damaged part: shard {shard} of {total} chunks does not hold its chunks", path)
    return _EmbedPart(path, meta, shard, record)


def _run_identity(meta: ArtifactMeta) -> dict[str, Any]:
    """What every part of one sharded run shares: all but its own rows' counts and its shard record."""
    return {"tool_version": meta.tool_version, "schema_version": meta.schema_version, "command": meta.command,
            "source data": meta.source.get("fingerprint"), "settings": meta.config,
            "read statistics": {k: v for k, v in meta.stats.items() if k not in SUMMED_STATS}}


def check_set(parts: list[P], describe: str, shard_of: Callable[[P], Shard],
              identity_of: Callable[[P], dict[str, Any]], name_hint: str) -> list[P]:
    """The parts of one run, every shard once, sorted by shard; else one line naming the part at fault (`describe`
    says what a part is, `identity_of` what all parts of one run share, `name_hint` the output they belong to)."""
    first = parts[0]
    count = shard_of(first).count
    for part in parts[1:]:
        if shard_of(part).count != count:
            raise UsageError(f"{part.path}: shard {shard_of(part)} is a part of a run with {shard_of(part).count} "
                             f"shards, not {count} as {first.path}; remove it or rerun its shard")
        mine, theirs = identity_of(part), identity_of(first)
        differ = [k for k in theirs if mine.get(k) != theirs[k]]
        if differ:
            raise UsageError(f"{part.path}: a {describe} of another run than {first.path} (its {differ[0]} "
                             "differs); remove it or rerun its shard with the same data and options")
    by_index: dict[int, P] = {}
    for part in parts:
        index = shard_of(part).index
        if index in by_index:
            raise UsageError(f"{part.path}: shard {shard_of(part)} given twice (also {by_index[index].path})")
        by_index[index] = part
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        expected = part_path(name_hint, Shard(missing[0], count), parse_part_name(first.path)[1]
                             if parse_part_name(first.path) else EMBED_PART)
        raise UsageError(f"{expected}: shard {missing[0]}/{count} is missing"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                         + "; run it, then read the parts again")
    return [by_index[i] for i in range(count)]


def base_name(paths: list[str]) -> str:
    parsed = parse_part_name(paths[0])
    return parsed[0] if parsed else paths[0]


def merged_path(paths: list[str]) -> str:
    """The artifact the parts were sharded from (their names without the part suffix)."""
    bases = {parse_part_name(p)[0] for p in paths if parse_part_name(p)}
    if len(bases) != 1 or any(parse_part_name(p) is None for p in paths):
        raise UsageError(f"{paths[0]}: parts of one output (OUTPUT.part-I-of-N) needed to know what to merge them "
                         "into; use `slap merge PARTS -o OUTPUT`")
    return bases.pop()


def check_embedding_parts(paths: list[str]) -> list[_EmbedPart]:
    if not paths:
        raise UsageError("no parts given")
    parts = [_read_embed_part(p) for p in paths]
    return check_set(parts, "part", lambda p: p.shard, lambda p: _run_identity(p.meta), base_name(paths))


def merged_meta(parts: list[_EmbedPart]) -> ArtifactMeta:
    """The metadata an unsharded run writes: the parts' own, with the shard's row counts summed."""
    first = parts[0].meta
    stats = dict(first.stats)
    for key in SUMMED_STATS:
        if key in stats:
            stats[key] = sum(int(p.meta.stats.get(key, 0)) for p in parts)
    extra = {k: v for k, v in first.extra.items() if k != "shard"}
    return dataclasses.replace(first, stats=stats, extra=extra)


def merge_embeddings(paths: list[str], output: str, reporter: Reporter) -> ArtifactMeta:
    """Write the embeddings artifact of the parts at `paths` to `output` (atomically): chunk c from part c % N."""
    parts = check_embedding_parts(paths)
    meta = merged_meta(parts)
    count, total = len(parts), int(parts[0].record["chunks_total"])
    files = [pq.ParquetFile(p.path, pre_buffer=False) for p in parts]
    sizes = [dict((int(c), int(n)) for c, n in p.record["chunks"]) for p in parts]
    cursor = [0] * count  # next row group of each part
    schema = embeddings_schema(int(meta.stats["dim"]))
    known = KnownRows.for_dim(int(meta.stats["dim"]))  # copies whose first occurrence is another shard's
    with reporter.progress(f"merge {count} parts", total) as bar, ArtifactWriter(output, schema) as writer:
        for chunk in range(total):
            i = chunk % count
            groups, rows = [], 0
            while rows < sizes[i][chunk]:  # one row group per chunk, or several for chunks above ROW_GROUP_ROWS
                if cursor[i] >= files[i].num_row_groups:
                    raise DataError(f"damaged part: fewer rows than its shard record says (chunk {chunk})",
                                    parts[i].path)
                groups.append(cursor[i])
                rows += files[i].metadata.row_group(cursor[i]).num_rows
                cursor[i] += 1
            if rows != sizes[i][chunk]:
                raise DataError(f"damaged part: chunk {chunk} does not end on a row group", parts[i].path)
            writer.write(known.refill(chunk, files[i].read_row_groups(groups)))
            bar.update(advance=1)
        writer.finish(meta)
    return meta


def parts_match(artifact: str, paths: list[str]) -> bool:
    """Whether `artifact` is the merge of these parts, as far as its metadata tells (rows, source, settings)."""
    parts = check_embedding_parts(paths)
    try:
        existing = read_meta(artifact, "embeddings")
    except (UsageError, DataError):
        return False
    want = merged_meta(parts)
    return (existing.stats == want.stats and existing.config == want.config and existing.source == want.source
            and existing.tool_version == want.tool_version and not existing.extra.get("shard"))
