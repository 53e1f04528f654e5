"""Stage 1, embed: per row a unit-norm sentence embedding, proxy token counts and a content hash.

Streaming: rows are read, embedded and written one chunk (one Parquet row group) at a time, so memory
stays flat however large the input. Inside a chunk, rows are sorted by length before batching (little
padding) and written back in input order.

Resuming: each finished chunk is saved as a small Parquet part in a hidden folder beside the output
(`.OUTPUT.parts/`), under a manifest of the source fingerprint and settings. A rerun of the same command
after a kill reads the source again but runs the models only on chunks without a part; the artifact is
assembled from the parts at the end (temporary name, then one rename), so it is byte for byte what an
uninterrupted run writes, and nothing final-looking exists before that.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from copy import deepcopy
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from slapcli import __version__
from slapcli.artifacts import ArtifactMeta, ArtifactWriter, embeddings_schema
from slapcli.config import EmbedConfig
from slapcli.copies import KnownRows, rows_table
from slapcli.engine import ENGINES, Engine
from slapcli.errors import DataError, SlapError, UsageError
from slapcli.io.layouts import Example
from slapcli.io.readers import ParsedRow, ReadStats, SourceReader, field_map, file_fingerprint, iter_examples
from slapcli.io.writers import atomic_path, companion_path, replace_into
from slapcli.models import (
    load_encoder,
    load_tokenizer,
    pick_device,
    pick_dtype,
    resolve_model,
)
from slapcli.parts import shard_record
from slapcli.progress import Reporter
from slapcli.proxy import encode_examples
from slapcli.shard import Shard


def content_hash(example: Example) -> str:
    """Equal for rows whose turns are equal, whatever their extra fields or JSON formatting."""
    canonical = json.dumps([[t.role, t.text] for t in example.turns], ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, then unit norm (how all-MiniLM-L6-v2 was trained)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


@torch.inference_mode()
def encode_texts(tokenizer, model, texts: list[str], batch_size: int, max_tokens: int,
                 device: torch.device, progress_callback: Callable[[int], None] | None = None) -> np.ndarray:
    """Embed texts in length-sorted batches and return them in input order (float32, unit norm).

    `progress_callback(n)` is called after each batch with the number of texts it just finished.
    """
    if not texts:
        return np.zeros((0, model.config.hidden_size), dtype=np.float32)
    encoded = tokenizer(texts, truncation=True, max_length=max_tokens, add_special_tokens=True)["input_ids"]
    order = np.argsort([len(ids) for ids in encoded], kind="stable")
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[r, : len(encoded[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out[idx] = mean_pool(hidden, mask).cpu().numpy()
        if progress_callback is not None:
            progress_callback(len(idx))
    return out


def _chunks(rows: Iterator[ParsedRow], size: int) -> Iterator[list[ParsedRow]]:
    chunk: list[ParsedRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def parts_folder(output_path: str) -> str:
    """Where finished chunks wait for the artifact to be complete: hidden, beside the output (same file system).

    One folder per output, not per input: the output's lock (slapcli.io.writers.output_lock, taken by the
    command) keeps two runs out of it at once, and its manifest keeps parts of other data or settings out.
    """
    return companion_path(output_path, ".parts")


class ChunkParts:
    """The finished chunks of one embed run, one Parquet file each, so that a killed run can resume.

    `manifest.json` records what the parts were made from (source fingerprint and every setting that changes
    the result); parts made from anything else are discarded, never mixed in. Each part is written under a
    temporary name and renamed, so a part that exists is complete.
    """

    FORMAT = 2  # 2: rows copying a row of an earlier chunk take its values (KnownRows)

    def __init__(self, folder: str, key: dict[str, Any]) -> None:
        self.folder = folder
        self.key = key

    @classmethod
    def open(cls, folder: str, key: dict[str, Any], resume: bool, reporter: Reporter) -> ChunkParts:
        """Reuse `folder` when resuming and its manifest matches `key`; otherwise start it afresh."""
        manifest = os.path.join(folder, "manifest.json")
        if os.path.isdir(folder):
            if resume and key["source"] is not None and _read_json(manifest) == key:
                done = sum(name.startswith("part-") and name.endswith(".parquet") for name in os.listdir(folder))
                reporter.log(f"resuming from {folder}: {done:,} chunks already embedded")
                return cls(folder, key)
            if resume:
                reporter.log(f"discarding {folder}: made from other data or settings")
            shutil.rmtree(folder)
        os.makedirs(folder)
        with atomic_path(manifest) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(key, f, sort_keys=True)
        return cls(folder, key)

    def part_path(self, index: int) -> str:
        return os.path.join(self.folder, f"part-{index:06d}.parquet")

    def load(self, index: int, rows: list[int]) -> pa.Table | None:
        """Part `index` if it exists and holds exactly these source rows, else None (embed them again)."""
        path = self.part_path(index)
        if not os.path.exists(path):
            return None
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException):  # renamed into place complete, but the disk may have lost it
            return None
        return table if table.column("row").to_pylist() == rows else None

    def save(self, index: int, table: pa.Table) -> None:
        with atomic_path(self.part_path(index)) as tmp:
            pq.write_table(table, tmp, compression="zstd")

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class EmbedWork:
    """What `embed_chunk` needs besides its rows: the settings and the loaded models."""

    config: EmbedConfig
    enc_tokenizer: Any
    encoder: torch.nn.Module
    proxy_tokenizer: Any
    device: torch.device
    # Called after each encoder batch with the share of the chunk it finished: a bar that moves per batch, not one
    # that jumps per chunk. Only an engine that runs chunks in this process calls it.
    advance: Callable[[float], None] | None = None

    @property
    def dim(self) -> int:
        return int(self.encoder.config.hidden_size)

    def for_worker(self, device: torch.device) -> EmbedWork:
        """This work as a worker on `device` runs it (slapcli.engine): the encoder there, at that device's dtype,
        and no progress hook of this process."""
        encoder = self.encoder if device == self.device else deepcopy(self.encoder).to(device, pick_dtype(device))
        return dataclasses.replace(self, encoder=encoder, device=device, advance=None)


def embed_chunk(work: EmbedWork, chunk: list[ParsedRow]) -> pa.Table:
    """A chunk of rows to their rows of the embeddings artifact (the per-chunk work an engine runs)."""
    config = work.config
    examples = [row.example for row in chunk]
    hashes = [content_hash(e) for e in examples]
    # Exact duplicates get the same vector and counts: the models run once per distinct content.
    first: dict[str, int] = {}
    for i, h in enumerate(hashes):
        first.setdefault(h, i)
    distinct = sorted(first.values())
    slot = {i: k for k, i in enumerate(distinct)}
    copy_of = [slot[first[h]] for h in hashes]
    unique = [examples[i] for i in distinct]
    advance, total = work.advance, len(unique)
    moved = None if advance is None else (lambda n: advance(n / total))
    vectors = encode_texts(work.enc_tokenizer, work.encoder, [e.full_text for e in unique], config.batch_size,
                           config.encoder_max_tokens, work.device, moved)[copy_of]
    # A chunk may come empty: every row of it copies a row of an earlier chunk (see KnownRows).
    unique_tokens = encode_examples(work.proxy_tokenizer, unique, config.max_tokens) if unique else []
    tokens = [unique_tokens[k] for k in copy_of]
    return rows_table(chunk, hashes, [(t.n_prompt_tokens, t.n_response_tokens, t.truncated, v)
                                      for t, v in zip(tokens, vectors, strict=True)], work.dim)


def embed(input_path: str, output_path: str, config: EmbedConfig, reporter: Reporter,
          engine: Engine = ENGINES["local"], shard: Shard | None = None) -> ArtifactMeta:
    """Read `input_path`, write the embeddings artifact to `output_path`, return its metadata.

    With `shard` (i of N), only the chunks c with c % N == i are embedded and `output_path` is that shard's part:
    an embeddings artifact of those chunks whose `extra.shard` records them (slapcli.parts merges the parts).
    """
    # A bad --fields fails before any model loads; the artifact records the mapping itself (not a dataset_info.json
    # path), so later stages parse the same way from anywhere.
    mapping = field_map(config.fields, config.layout)
    if os.path.lexists(parts_folder(output_path)) and not os.path.isdir(parts_folder(output_path)):
        raise UsageError(f"{parts_folder(output_path)}: not a folder, where embed keeps the finished chunks of "
                         f"{output_path}; remove it (slap makes no such file) or choose another output")
    device = pick_device(config.device)
    embed_ref = resolve_model(config.embed_model)
    proxy_ref = resolve_model(config.proxy_model)
    # Where the bar stands between chunk ends: the chunk being encoded starts at `start` bytes of the input and
    # ends at `end` (the input is read a chunk ahead of its models); each encoder batch moves the bar by its share
    # of them. (`bar` and `rows_out` are bound below, before any chunk is encoded.)
    position = {"start": 0, "end": 0, "rows": 0, "share": 0.0}

    def advance(share: float) -> None:
        position["share"] += share
        bar.update(completed=position["start"] + (position["end"] - position["start"]) * position["share"],
                   rows_done=rows_out + int(position["rows"] * position["share"]))

    meta_config = {**asdict(config), "embed_model_identity": embed_ref.identity,
                   "proxy_model_identity": proxy_ref.identity}
    stats = ReadStats()
    rows_out = truncated = 0
    chunk_sizes: dict[int, int] = {}  # rows of each chunk embedded here
    chunks_seen = [0]  # chunks of the whole input, this shard's or not
    with SourceReader(input_path, config.input_format) as reader, \
            reporter.progress(f"embed {reader.name}", reader.total_bytes, unit="bytes") as bar:
        if shard is not None and reader.stream:
            raise UsageError(f"--shard {shard}: every shard reads the whole input, so it must be a file (or a folder "
                             f"of files), not {reader.name}")
        rows = iter_examples(reader, config.layout, config.on_bad_line, stats, config.fields)
        # The first chunk is read before any model loads (it is held for the models anyway): a file of another
        # container or layout (an artifact given as data), or a bad line among the first rows, is one line at once.
        head = list(itertools.islice(rows, config.chunk_rows))
        rows = itertools.chain(head, rows)
        reporter.log(f"loading encoder {embed_ref.spec} and proxy tokenizer {proxy_ref.spec}")
        enc_tokenizer, encoder = load_encoder(embed_ref, device)
        work = EmbedWork(config, enc_tokenizer, encoder, load_tokenizer(proxy_ref), device, advance)
        dim = work.dim
        known = KnownRows.for_dim(dim)  # exact copies of rows of earlier chunks are not encoded again
        schema = embeddings_schema(dim)
        # Parts are reusable only for the same bytes: fingerprint a file up front (one extra read, cheap next to
        # the models). Stdin or a pipe cannot be read twice, so its parts are never reused.
        source_fp = None if reader.stream else file_fingerprint(input_path)
        parts = ChunkParts.open(parts_folder(output_path), {
            "format": ChunkParts.FORMAT, "tool_version": __version__,
            "source": source_fp.to_dict() if source_fp is not None else None,
            "config": {k: v for k, v in meta_config.items() if k != "resume"},
        }, config.resume, reporter)
        try:
            # The chunks handed to the engine, in order: index, rows, content hashes, which rows are copies.
            waiting: deque[tuple[int, list[ParsedRow], list[str], list[bool]]] = deque()

            def done(index: int, table: pa.Table) -> None:
                nonlocal truncated, rows_out
                known.learn(index, table)
                truncated += sum(table.column("truncated").to_pylist())
                rows_out += table.num_rows
                chunk_sizes[index] = table.num_rows
                bar.update(completed=reader.bytes_read, rows_done=rows_out)

            def to_embed() -> Iterator[list[ParsedRow]]:
                for index, chunk in enumerate(_chunks(rows, config.chunk_rows)):
                    chunks_seen[0] = index + 1
                    if shard is not None and not shard.owns(index):
                        # Another shard's: read (chunk boundaries and statistics need every row), not run; its
                        # contents are claimed as an unsharded run claims them, so that this shard's chunks leave
                        # out the same copies (KnownRows).
                        known.claim(index, [content_hash(r.example) for r in chunk])
                        continue
                    position.update(start=position["end"], end=reader.bytes_read, rows=len(chunk), share=0.0)
                    table = parts.load(index, [r.record.index for r in chunk])
                    if table is None:
                        hashes = [content_hash(r.example) for r in chunk]
                        copies = known.claim(index, hashes)
                        waiting.append((index, chunk, hashes, copies))
                        yield [row for row, copy in zip(chunk, copies, strict=True) if not copy]
                    else:  # finished by a killed run: its rows are known as if this run had embedded them
                        known.claim(index, table.column("content_hash").to_pylist())
                        done(index, table)

            for encoded in engine.map(embed_chunk, work, to_embed()):
                index, chunk, hashes, copies = waiting.popleft()
                table = known.complete(chunk, hashes, copies, encoded, dim,
                                       lambda alone: embed_chunk(dataclasses.replace(work, advance=None), alone))
                parts.save(index, table)
                done(index, table)
            assert reader.fingerprint is not None
            if source_fp is not None and reader.fingerprint != source_fp:
                raise DataError("the file changed while it was read; run again on a file nobody is writing to",
                                reader.name)
        except SlapError:
            # Bad data fails the same way on every rerun until the file is fixed, and a fixed file has another
            # fingerprint: these parts can never be resumed, so leave nothing behind. (An interrupt or a
            # runtime failure keeps them.)
            parts.remove()
            raise
        meta = ArtifactMeta(
            kind="embeddings",
            command="embed",
            config=meta_config,
            source={"path": reader.path, "fingerprint": reader.fingerprint.to_dict(), "container": reader.container,
                    "compression": reader.compression, "layout": config.layout,
                    "fields": mapping.describe() if mapping is not None else None,
                    "stream": reader.stream, "shards": reader.shard_fingerprints},
            stats={"records": stats.records, "rows": rows_out, "bad_skipped": stats.bad_skipped,
                   "bad_examples": stats.bad_examples, "truncated": truncated, "dim": dim,
                   "non_text_parts": stats.non_text_parts,
                   "rows_with_non_text_parts": stats.rows_with_non_text_parts},
            extra={"shard": shard_record(shard, chunks_seen[0], chunk_sizes)} if shard is not None else {},
        )
    _assemble(parts, sorted(chunk_sizes), schema, meta, output_path)
    parts.remove()
    return meta


def _assemble(parts: ChunkParts, chunks: list[int], schema: pa.Schema, meta: ArtifactMeta, output_path: str) -> None:
    """Concatenate the parts into the artifact, one row group each, and rename it over `output_path` at once.

    The artifact is first completed inside the parts folder, so that a kill at any moment leaves no temporary
    file beside the output; the folder sits beside the output, so the last rename is atomic.
    """
    assembled = os.path.join(parts.folder, "artifact.parquet")
    with ArtifactWriter(assembled, schema) as writer:
        for index in chunks:
            writer.write(pq.read_table(parts.part_path(index)))
        writer.finish(meta)
    replace_into(assembled, output_path)
