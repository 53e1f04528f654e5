"""Stage 1, embed: per row a unit-norm sentence embedding, proxy token counts and a content hash.

Streaming: rows are read, embedded and written one chunk (one Parquet row group) at a time, so memory
stays flat however large the input. Inside a chunk, rows are sorted by length before batching (little
padding) and written back in input order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch

from slapcli.artifacts import ArtifactMeta, ArtifactWriter, embeddings_schema
from slapcli.io.layouts import Example
from slapcli.io.readers import ParsedRow, ReadStats, SourceReader, iter_examples
from slapcli.models import (
    DEFAULT_EMBED_MODEL,
    DEFAULT_PROXY_MODEL,
    load_encoder,
    load_tokenizer,
    pick_device,
    resolve_model,
)
from slapcli.progress import Reporter
from slapcli.proxy import encode_examples


@dataclass
class EmbedConfig:
    embed_model: str = DEFAULT_EMBED_MODEL
    proxy_model: str = DEFAULT_PROXY_MODEL  # its tokenizer gives the token counts used downstream
    layout: str = "auto"
    input_format: str | None = None
    on_bad_line: str = "error"
    max_tokens: int = 1024  # proxy tokens per row; longer rows are truncated and counted
    encoder_max_tokens: int = 256  # all-MiniLM-L6-v2 was trained on 256-token inputs
    batch_size: int = 64
    chunk_rows: int = 2048  # rows per streamed chunk and Parquet row group
    device: str = "auto"


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
                 device: torch.device) -> np.ndarray:
    """Embed texts in length-sorted batches and return them in input order (float32, unit norm)."""
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


def embed(input_path: str, output_path: str, config: EmbedConfig, reporter: Reporter,
          command: str = "embed") -> ArtifactMeta:
    """Read `input_path`, write the embeddings artifact to `output_path`, return its metadata."""
    device = pick_device(config.device)
    embed_ref = resolve_model(config.embed_model)
    proxy_ref = resolve_model(config.proxy_model)
    reporter.log(f"loading encoder {embed_ref.spec} and proxy tokenizer {proxy_ref.spec}")
    enc_tokenizer, encoder = load_encoder(embed_ref, device)
    proxy_tokenizer = load_tokenizer(proxy_ref)
    dim = int(encoder.config.hidden_size)
    stats = ReadStats()
    rows_out = truncated = 0
    with SourceReader(input_path, config.input_format) as reader, \
            ArtifactWriter(output_path, embeddings_schema(dim)) as writer, \
            reporter.progress(f"embed {reader.name}", reader.total_bytes, unit="bytes") as bar:
        for chunk in _chunks(iter_examples(reader, config.layout, config.on_bad_line, stats), config.chunk_rows):
            examples = [row.example for row in chunk]
            vectors = encode_texts(enc_tokenizer, encoder, [e.full_text for e in examples], config.batch_size,
                                   config.encoder_max_tokens, device)
            tokens = encode_examples(proxy_tokenizer, examples, config.max_tokens)
            truncated += sum(t.truncated for t in tokens)
            table = pa.table({
                "row": pa.array([r.record.index for r in chunk], pa.int64()),
                "line": pa.array([r.record.line for r in chunk], pa.int64()),
                "content_hash": pa.array([content_hash(e) for e in examples], pa.string()),
                "n_prompt_tokens": pa.array([t.n_prompt_tokens for t in tokens], pa.int32()),
                "n_response_tokens": pa.array([t.n_response_tokens for t in tokens], pa.int32()),
                "truncated": pa.array([t.truncated for t in tokens], pa.bool_()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
            })
            writer.write(table)
            rows_out += len(chunk)
            bar.update(completed=reader.bytes_read, rows_done=rows_out)
        assert reader.fingerprint is not None
        meta = ArtifactMeta(
            kind="embeddings",
            command=command,
            config={**asdict(config), "embed_model_identity": embed_ref.identity,
                    "proxy_model_identity": proxy_ref.identity},
            source={"path": reader.path, "fingerprint": reader.fingerprint.to_dict(), "container": reader.container,
                    "compression": reader.compression, "layout": config.layout},
            stats={"records": stats.records, "rows": rows_out, "bad_skipped": stats.bad_skipped,
                   "bad_examples": stats.bad_examples, "truncated": truncated, "dim": dim},
        )
        writer.finish(meta)
    return meta
