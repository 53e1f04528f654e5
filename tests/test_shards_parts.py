"""`--shard i/N` parts read as one (the same bytes as one unsharded run, refused when missing, doubled or foreign),
`--threads` and `--cache-dir`: on tiny random models."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from slapcli import runtime
from slapcli.artifacts import read_meta
from slapcli.cli import app
from slapcli.shard import Shard, parse_part_name, part_path

runner = CliRunner()
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]


def invoke(args: list[object]):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(autouse=True)
def process_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """--threads and --cache-dir set process-wide state: put it back for the next test."""
    for name in runtime.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    yield
    runtime.reset()
    torch.set_num_threads(threads)


@pytest.fixture()
def data_file(tmp_path: Path) -> Path:
    rng = random.Random(0)
    rows = [{"instruction": f"Explain topic {i}", "input": "",
             "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14)))} for i in range(45)]
    rows[5] = dict(rows[2])  # an exact copy inside the first chunk
    rows[40] = dict(rows[9])  # and one whose first occurrence is in another shard's chunk
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def models(tiny_encoder_dir: Path, tiny_proxy_dir: Path) -> list[str]:
    return ["--embed-model", str(tiny_encoder_dir), "--proxy-model", str(tiny_proxy_dir)]


def embed_shards(data: Path, out: Path, models: list[str], count: int, *extra: object) -> list[Path]:
    for i in range(count):
        r = invoke(["embed", data, "-o", out, *models, "--chunk-rows", 8, "--shard", f"{i}/{count}", "-q", *extra])
        assert r.exit_code == 0, r.stderr
    return [Path(part_path(str(out), Shard(i, count))) for i in range(count)]


def test_shard_option_is_checked_while_parsing() -> None:
    assert Shard.parse("3/4") == Shard(3, 4)
    for bad in ("4/4", "1", "-1/2", "a/b", "0/0"):
        r = invoke(["embed", "x.jsonl", "-o", "e.parquet", "--shard", bad])
        assert r.exit_code == 2 and "--shard" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert parse_part_name("w/e.parquet.part-0002-of-0004") == ("w/e.parquet", "part", Shard(2, 4))
    assert parse_part_name("w/e.parquet") is None


def test_sharded_embed_merges_into_the_unsharded_artifact(tmp_path: Path, data_file: Path, models: list[str]):
    whole = tmp_path / "whole.parquet"
    r = invoke(["embed", data_file, "-o", whole, *models, "--chunk-rows", 8, "-q"])
    assert r.exit_code == 0, r.stderr
    out = tmp_path / "e.parquet"
    parts = embed_shards(data_file, out, models, 3)
    # Each part holds its own chunks (45 rows in chunks of 8: 6 chunks, 2 per shard) and says so.
    meta = read_meta(str(parts[1]), "embeddings")
    assert meta.extra["shard"]["chunks"] == [[1, 8], [4, 8]] and meta.stats["rows"] == 16
    assert pq.read_table(parts[1]).column("row").to_pylist() == [*range(8, 16), *range(32, 40)]

    merged = tmp_path / "merged.parquet"
    r = invoke(["merge", f"{out}.part-*", "-o", merged])
    assert r.exit_code == 0, r.stderr
    assert merged.read_bytes() == whole.read_bytes()

    # stratify reads the parts as one: merged once into the artifact they are parts of, then reused.
    strata = tmp_path / "s.parquet"
    r = invoke(["stratify", f"{out}.part-*", "-o", strata, "--proxy-model", models[3], "--clusters", 3])
    assert r.exit_code == 0, r.stderr
    assert out.read_bytes() == whole.read_bytes()
    assert read_meta(str(strata), "strata").upstream["path"] == str(out)
    r = invoke(["stratify", tmp_path, "-o", tmp_path / "s2.parquet", "--proxy-model", models[3], "--clusters", 3])
    assert r.exit_code == 0 and "merged from these 3 parts before" in r.stderr, r.stderr  # a folder of parts too


def one_line(r) -> str:
    assert r.exit_code == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_missing_doubled_and_foreign_parts_are_refused(tmp_path: Path, data_file: Path, models: list[str]):
    out = tmp_path / "e.parquet"
    parts = embed_shards(data_file, out, models, 3)
    merged = tmp_path / "m.parquet"

    line = one_line(invoke(["merge", parts[0], parts[2], "-o", merged]))
    assert "shard 1/3 is missing" in line and part_path(str(out), Shard(1, 3)) in line

    line = one_line(invoke(["merge", *parts, parts[1], "-o", merged]))
    assert "given twice" in line and str(parts[1]) in line

    # A part of another run: other settings (--max-tokens), or a run with another shard count.
    other = tmp_path / "other.parquet"
    foreign = embed_shards(data_file, other, models, 3, "--max-tokens", 16)[1]
    line = one_line(invoke(["merge", parts[0], foreign, parts[2], "-o", merged]))
    assert str(foreign) in line and "another run" in line and "settings" in line
    two = embed_shards(data_file, tmp_path / "two.parquet", models, 2)[1]
    line = one_line(invoke(["merge", *parts, two, "-o", merged]))
    assert str(two) in line and "2 shards" in line

    # A part of other data.
    changed = tmp_path / "changed.jsonl"
    changed.write_text(data_file.read_text().replace("topic 1", "topic one"))
    moved = embed_shards(changed, tmp_path / "c.parquet", models, 3)[2]
    line = one_line(invoke(["merge", parts[0], parts[1], moved, "-o", merged]))
    assert str(moved) in line and "source data" in line

    # A whole artifact is not a part.
    merged_ok = tmp_path / "ok.parquet"
    assert invoke(["merge", *parts, "-o", merged_ok]).exit_code == 0
    line = one_line(invoke(["merge", parts[0], merged_ok, "-o", merged]))
    assert str(merged_ok) in line and "not a part" in line
    assert not merged.exists()


def test_a_shard_needs_a_file_input(tmp_path: Path, data_file: Path, models: list[str]):
    r = runner.invoke(app, ["embed", "-", "-o", str(tmp_path / "e.parquet"), *models, "--shard", "0/2"],
                      input=data_file.read_bytes())
    assert "must be a file" in one_line(r)


def test_sharded_loss_pass_gives_the_unsharded_strata(tmp_path: Path, data_file: Path, models: list[str],
                                                      monkeypatch: pytest.MonkeyPatch):
    import slapcli.proxy.passes
    import slapcli.stages.stratify

    monkeypatch.setattr(slapcli.proxy.passes, "LOSS_CHUNK_ROWS", 8)  # several chunks of the pass on a few dozen rows
    emb = tmp_path / "e.parquet"
    assert invoke(["embed", data_file, "-o", emb, *models, "-q"]).exit_code == 0
    proxy = ["--proxy-model", models[3], "--clusters", 3]
    whole = tmp_path / "whole.parquet"
    assert invoke(["stratify", emb, "-o", whole, *proxy, "-q"]).exit_code == 0

    strata = tmp_path / "s.parquet"
    for i in range(3):
        r = invoke(["stratify", emb, "-o", strata, *proxy, "--shard", f"{i}/3", "-q"])
        assert r.exit_code == 0, r.stderr
    assert not strata.exists() and len(list(tmp_path.glob("s.parquet.loss-part-*"))) == 3
    calls: list[int] = []
    monkeypatch.setattr(slapcli.stages.stratify, "cached_proxy_losses", lambda *a, **k: calls.append(1))
    r = invoke(["stratify", emb, "-o", strata, *proxy])
    assert r.exit_code == 0 and "from 3 loss parts" in r.stderr, r.stderr
    assert not calls  # no proxy pass here: every loss came from the parts
    whole_table, sharded = pq.read_table(whole), pq.read_table(strata)
    assert sharded.equals(whole_table)
    assert read_meta(str(strata)).stats == read_meta(str(whole)).stats

    # Foreign (another proxy setting), missing and doubled loss parts are refused, each in one line.
    Path(f"{strata}.loss-part-0001-of-0003").rename(tmp_path / "aside")
    line = one_line(invoke(["stratify", emb, "-o", strata, *proxy, "--force", "-q"]))
    assert "shard 1/3 is missing" in line and "s.parquet.loss-part-0001-of-0003" in line
    (tmp_path / "aside").rename(f"{strata}.loss-part-0001-of-0003")
    line = one_line(invoke(["stratify", emb, "-o", strata, *proxy, "--no-screen", "--force", "-q"]))
    assert "loss-part-0000-of-0003" in line and "screen" in line
    r = invoke(["stratify", emb, "-o", tmp_path / "s.parquet.x", *proxy, "--shard", "1/2", "-q"])
    assert r.exit_code == 0
    Path(f"{tmp_path / 's.parquet.x'}.loss-part-0001-of-0002").rename(f"{strata}.loss-part-0001-of-0002")
    line = one_line(invoke(["stratify", emb, "-o", strata, *proxy, "--force", "-q"]))
    assert "loss-part-0001-of-0002" in line and "2 shards" in line


def test_threads_sets_torch_threads(tmp_path: Path, data_file: Path, models: list[str]):
    torch.set_num_threads(1)
    r = invoke(["embed", data_file, "-o", tmp_path / "e.parquet", *models, "--threads", 2, "-q"])
    assert r.exit_code == 0, r.stderr
    assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
    # The artifact does not record it: a rerun with other threads is the same artifact.
    assert "threads" not in read_meta(str(tmp_path / "e.parquet")).config
    r = invoke(["embed", data_file, "-o", tmp_path / "e.parquet", "--threads", 0])
    assert r.exit_code == 2 and "--threads" in r.stderr


def test_without_threads_the_count_is_left_alone(tmp_path: Path, data_file: Path, models: list[str]):
    # Not lowered to follow the machine's load: the count is the libraries' own, so the same command on the same
    # machine computes the same bits.
    torch.set_num_threads(3)
    r = invoke(["embed", data_file, "-o", tmp_path / "e.parquet", *models, "-q"])
    assert r.exit_code == 0, r.stderr
    assert torch.get_num_threads() == 3 and "OMP_NUM_THREADS" not in os.environ


def test_cache_dir_holds_the_prefix_cache_and_nothing_stays(tmp_path: Path, data_file: Path, models: list[str],
                                                            monkeypatch: pytest.MonkeyPatch, slap_cache_dir: Path):
    import slapcli.proxy.split

    made_in: list[str | None] = []
    original = slapcli.proxy.split.HiddenStore.__init__

    def spy(self, directory: str | None = None) -> None:
        made_in.append(directory)
        original(self, directory)

    monkeypatch.setattr(slapcli.proxy.split.HiddenStore, "__init__", spy)
    emb, strata = tmp_path / "e.parquet", tmp_path / "s.parquet"
    assert invoke(["embed", data_file, "-o", emb, *models, "-q"]).exit_code == 0
    cache = tmp_path / "scratch" / "slap"
    # stratify keeps the frozen prefix's states for select: in --cache-dir, not in the slapcli cache.
    r = invoke(["stratify", emb, "-o", strata, "--proxy-model", models[3], "--clusters", 3, "--cache-dir", cache,
                "-q"])
    assert r.exit_code == 0, r.stderr
    assert any((cache / "prefix").iterdir()) and not (slap_cache_dir / "prefix").exists()
    runtime.reset()
    r = invoke(["select", strata, "-o", tmp_path / "sel.parquet", "--proxy-model", models[3], "--keep", 0.5,
                "--proj-dim", 32, "--cache-dir", cache, "-q"])
    assert r.exit_code == 0, r.stderr
    assert made_in == [str(cache)]
    # The replay's own store was an anonymous file: gone with the process's handle, nothing beside the prefix store.
    assert [p.name for p in cache.iterdir()] == ["prefix"]

    made_in.clear()
    runtime.reset()  # the default again: beside the output
    r = invoke(["select", strata, "-o", tmp_path / "out" / "sel.parquet", "--proxy-model", models[3], "--keep", 0.5,
                "--proj-dim", 32, "-q"])
    assert r.exit_code == 0, r.stderr
    assert made_in == [str(tmp_path / "out")]

    (tmp_path / "file").write_text("")
    r = invoke(["select", strata, "-o", tmp_path / "sel2.parquet", "--cache-dir", tmp_path / "file"])
    assert "not a directory" in one_line(r)


def test_part_rows_cover_the_source_once(tmp_path: Path, data_file: Path, models: list[str]):
    parts = embed_shards(data_file, tmp_path / "e.parquet", models, 4)
    rows = np.concatenate([pq.read_table(p).column("row").to_numpy() for p in parts])
    assert sorted(rows.tolist()) == list(range(45))
