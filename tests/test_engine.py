"""The engine seam: a stage's per-chunk work is a top-level function that any engine can map, with the same bytes."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from slapcli.config import EmbedConfig
from slapcli.engine import ENGINES
from slapcli.progress import Reporter
from slapcli.stages.embed import embed, embed_chunk

C = TypeVar("C")
B = TypeVar("B")
R = TypeVar("R")
QUIET = Reporter(quiet=True)


class ThreadEngine:
    """Another engine: chunks on a pool of threads, results in order (what a process or cluster engine does)."""

    def __init__(self) -> None:
        self.chunks = 0

    def map(self, fn: Callable[[C, B], R], context: C, chunks: Iterable[B]) -> Iterator[R]:
        def run(chunk: B) -> R:
            self.chunks += 1
            return fn(context, chunk)

        with ThreadPoolExecutor(max_workers=2) as pool:
            yield from pool.map(run, chunks)


def test_another_engine_writes_the_same_artifact(tmp_path: Path, tiny_encoder_dir: Path, tiny_proxy_dir: Path):
    rows = [{"instruction": f"Task {i}", "output": "word " * (1 + i % 7)} for i in range(30)]
    rows[12] = rows[3]  # an exact duplicate, embedded once inside its chunk
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = EmbedConfig(embed_model=str(tiny_encoder_dir), proxy_model=str(tiny_proxy_dir), device="cpu",
                         chunk_rows=8)
    local, threads = tmp_path / "local.parquet", tmp_path / "threads.parquet"
    embed(str(data), str(local), config, QUIET, engine=ENGINES["local"])
    engine = ThreadEngine()
    embed(str(data), str(threads), config, QUIET, engine=engine)
    assert engine.chunks == 4  # 30 rows in chunks of 8: the work went through the other engine
    assert threads.read_bytes() == local.read_bytes()


def test_the_per_chunk_function_is_the_stage_s_work(tmp_path: Path, tiny_encoder_dir: Path, tiny_proxy_dir: Path):
    # embed_chunk is importable and needs nothing but its context and rows: what a worker elsewhere would run.
    from slapcli.io.readers import ReadStats, SourceReader, iter_examples
    from slapcli.models import load_encoder, load_tokenizer, resolve_model
    from slapcli.stages.embed import EmbedWork

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Q{i}", "output": f"A{i}"}) + "\n" for i in range(5)))
    config = EmbedConfig(embed_model=str(tiny_encoder_dir), proxy_model=str(tiny_proxy_dir), device="cpu")
    cpu = torch.device("cpu")
    tokenizer, encoder = load_encoder(resolve_model(config.embed_model), cpu)
    work = EmbedWork(config, tokenizer, encoder, load_tokenizer(resolve_model(config.proxy_model)), cpu)
    with SourceReader(str(data)) as reader:
        chunk = list(iter_examples(reader, "auto", "error", ReadStats()))
    table = embed_chunk(work, chunk)
    assert table.column("row").to_pylist() == [0, 1, 2, 3, 4]
    vectors = np.array(table.column("embedding").to_pylist())
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
