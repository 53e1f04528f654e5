"""Embed: exact copies are encoded once across chunks, and the bar moves per encoder batch.

Copies of a row embedded in an earlier chunk take its vector and token counts (slapcli.stages.embed.KnownRows): the
artifact holds the same values as if each chunk had encoded them, a resumed run writes the same bytes as an
uninterrupted one, and data without such copies gives the same bytes as before copies were looked for.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from slapcli import cli
from slapcli import copies as copies_module
from slapcli.progress import ProgressTask
from slapcli.stages import embed as embed_module

runner = CliRunner()


def invoke(args: list) -> object:
    return runner.invoke(cli.app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def models(tiny_encoder_dir: Path, tiny_proxy_dir: Path) -> list[str]:
    return ["--embed-model", str(tiny_encoder_dir), "--proxy-model", str(tiny_proxy_dir)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def row(i: int) -> dict:
    return {"instruction": f"Explain topic {i} in {i % 5 + 1} words", "output": f"Topic {i} is " + "very " * (i % 7)
            + "simple."}


class Texts:
    """Counts the texts the encoder really runs on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self._real = embed_module.encode_texts
        monkeypatch.setattr(embed_module, "encode_texts", self)

    def __call__(self, tokenizer, model, texts, *args, **kwargs):
        self.count += len(texts)
        return self._real(tokenizer, model, texts, *args, **kwargs)


def columns(path: Path) -> dict[str, list]:
    return pq.read_table(path).to_pydict()


def test_identical_rows_are_encoded_once_across_chunks(tmp_path, models, monkeypatch):
    # 200 copies of one row and 20 distinct rows, spread over 11 chunks of 20 rows.
    rows = [row(0) if i % 10 else row(i) for i in range(220)]
    data = write_rows(tmp_path / "d.jsonl", rows)
    texts = Texts(monkeypatch)
    out = tmp_path / "e.parquet"
    r = invoke(["embed", data, "-o", out, *models, "--chunk-rows", "20", "-q"])
    assert r.exit_code == 0, r.stderr
    distinct = len({json.dumps(x) for x in rows})
    assert texts.count == distinct  # not once per chunk (11 x the copied row)

    # The same values as one chunk encoding every distinct row once (float rounding aside: the batches differ).
    one = tmp_path / "one.parquet"
    assert invoke(["embed", data, "-o", one, *models, "--chunk-rows", "1000", "-q"]).exit_code == 0
    got, want = columns(out), columns(one)
    for name in ("row", "line", "content_hash", "n_prompt_tokens", "n_response_tokens", "truncated"):
        assert got[name] == want[name], name
    np.testing.assert_allclose(np.array(got["embedding"]), np.array(want["embedding"]), atol=1e-5)
    vectors = np.array(got["embedding"])
    copies = [i for i in range(220) if i % 10]
    assert (vectors[copies] == vectors[copies[0]]).all()  # every copy holds the first copy's vector exactly


def test_data_without_copies_across_chunks_gives_the_same_bytes(tmp_path, models, monkeypatch):
    # Copies inside a chunk only (rows 2k and 2k+1 are equal, chunks of 4 rows): nothing for KnownRows to do.
    data = write_rows(tmp_path / "d.jsonl", [row(i // 2) for i in range(24)])
    args = [*models, "--chunk-rows", "4", "-q"]
    assert invoke(["embed", data, "-o", tmp_path / "new.parquet", *args]).exit_code == 0
    monkeypatch.setattr(copies_module, "KNOWN_BYTES", 0)  # no copies looked for: the behaviour before
    assert invoke(["embed", data, "-o", tmp_path / "old.parquet", *args]).exit_code == 0
    assert (tmp_path / "new.parquet").read_bytes() == (tmp_path / "old.parquet").read_bytes()


def test_copies_past_the_memory_bound_are_still_embedded_per_chunk(tmp_path, models, monkeypatch):
    rows = [row(i % 3) for i in range(12)]  # three contents, each in all four chunks of 3 rows
    data = write_rows(tmp_path / "d.jsonl", rows)
    monkeypatch.setattr(copies_module, "KNOWN_BYTES", 4 * 32)  # room for one 32-dim vector: the first content
    texts = Texts(monkeypatch)
    out = tmp_path / "e.parquet"
    assert invoke(["embed", data, "-o", out, *models, "--chunk-rows", "3", "-q"]).exit_code == 0
    assert texts.count == 3 + 3 * 2  # chunk 0 all three; chunks 1-3 only the two contents past the bound
    hashes = columns(out)["content_hash"]
    assert len(set(hashes)) == 3 and hashes[:3] * 4 == hashes


def test_an_interrupted_run_with_copies_resumes_to_the_same_bytes(tmp_path, models, monkeypatch):
    rows = [row(i % 5) if i % 2 else row(i) for i in range(40)]  # copies of five rows in every chunk
    data = write_rows(tmp_path / "d.jsonl", rows)
    args = [*models, "--chunk-rows", "4", "-q"]
    full = tmp_path / "full.parquet"
    assert invoke(["embed", data, "-o", full, *args]).exit_code == 0

    out = tmp_path / "e.parquet"
    real = embed_module.embed_chunk
    calls = 0

    def stop_at_the_sixth(work, chunk):
        nonlocal calls
        calls += 1
        if calls == 6:
            raise KeyboardInterrupt  # what Ctrl-C raises in the middle of the model work
        return real(work, chunk)

    monkeypatch.setattr(embed_module, "embed_chunk", stop_at_the_sixth)
    r = runner.invoke(cli.app, [str(a) for a in ["embed", data, "-o", out, *args]])
    assert r.exit_code == 130 and not out.exists()
    assert len(list((tmp_path / ".e.parquet.parts").glob("part-*.parquet"))) == 5
    monkeypatch.setattr(embed_module, "embed_chunk", real)
    texts = Texts(monkeypatch)
    assert invoke(["embed", data, "-o", out, *args]).exit_code == 0
    assert out.read_bytes() == full.read_bytes()
    assert texts.count < 5 * 4  # the five finished chunks were not embedded again, and their copies not either


def test_sharded_embed_with_copies_across_shards_merges_into_the_unsharded_bytes(tmp_path, models, monkeypatch):
    # The real encoder's floats depend on the batch a text is in (the tiny one's happen not to): make the tiny one's
    # depend on it too, so that a shard encoding other batches than the unsharded run would show in the bytes.
    real = embed_module.encode_texts

    def batch_dependent(tokenizer, model, texts, *args, **kwargs):
        return real(tokenizer, model, texts, *args, **kwargs) + np.float32(len(texts) * 1e-3)

    monkeypatch.setattr(embed_module, "encode_texts", batch_dependent)
    rows = [row(i) for i in range(48)]  # six chunks of 8; shard s of 3 holds chunks s and s + 3
    rows[44], rows[45], rows[30] = row(9), row(17), row(2)  # copies of chunks 1 and 2 in chunk 5, of 0 in chunk 3
    data = write_rows(tmp_path / "d.jsonl", rows)
    whole = tmp_path / "whole.parquet"
    assert invoke(["embed", data, "-o", whole, *models, "--chunk-rows", "8", "-q"]).exit_code == 0
    out = tmp_path / "e.parquet"
    for i in range(3):
        r = invoke(["embed", data, "-o", out, *models, "--chunk-rows", "8", "--shard", f"{i}/3", "-q"])
        assert r.exit_code == 0, r.stderr
    merged = tmp_path / "merged.parquet"
    r = invoke(["merge", f"{out}.part-*", "-o", merged])
    assert r.exit_code == 0, r.stderr
    assert merged.read_bytes() == whole.read_bytes()
    vectors = np.array(columns(whole)["embedding"])
    assert (vectors[44] == vectors[9]).all() and (vectors[30] == vectors[2]).all()


def test_the_embed_bar_moves_per_encoder_batch(tmp_path, models, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then takes stderr for a terminal: bars are drawn
    data = write_rows(tmp_path / "d.jsonl", [row(i) for i in range(24)])
    positions: list[float] = []
    real_update = ProgressTask.update

    def update(self: ProgressTask, **kwargs: object) -> None:
        if kwargs.get("completed") is not None:
            positions.append(float(kwargs["completed"]))
        real_update(self, **kwargs)

    monkeypatch.setattr(ProgressTask, "update", update)
    r = invoke(["embed", data, "-o", tmp_path / "e.parquet", *models, "--batch-size", "4"])
    assert r.exit_code == 0, r.stderr
    size = data.stat().st_size
    # One chunk of 24 rows in 6 encoder batches: the bar stands at 1/6, 2/6, ... of the file before the chunk ends.
    moving = [p for p in positions if 0 < p < size]
    assert len(moving) >= 5 and moving == sorted(moving)
    assert positions[-1] == size
    # The bar erased itself (cursor up, clear line) before the final line.
    assert r.stderr.strip().splitlines()[-1].endswith(f"\x1b[2Kwrote {tmp_path / 'e.parquet'}: 24 rows")
