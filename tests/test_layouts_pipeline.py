"""Every layout and dataset folder through the whole default pipeline (`slap run`, tiny random models), exporting
the kept records exactly as they were; and the reader's data errors as the CLI shows them (issues 21, 22)."""

from __future__ import annotations

import gzip
import json
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from typer.testing import CliRunner

from slapcli.artifacts import read_meta
from slapcli.cli import app

runner = CliRunner()
LAYOUT_DIR = Path(__file__).resolve().parent.parent / "sample_data" / "layouts"
MAPPED = ["--fields", "prompt=ask,response=reply,system=persona"]


def invoke(args: list) -> object:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def models(tiny_encoder_dir: Path, tiny_proxy_dir: Path) -> list[str]:
    return ["--embed-model", str(tiny_encoder_dir), "--proxy-model", str(tiny_proxy_dir)]


def source_records(path: Path) -> list[dict]:
    """The records of a data file or folder, read without slapcli, in the order slap must read them."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if not p.name.startswith((".", "_")) and p.name.endswith((".parquet", ".arrow", ".jsonl",
                                                                                  ".jsonl.gz", ".jsonl.zst")))
        return [r for f in files for r in source_records(f)]
    name = path.name
    if name.endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    if name.endswith(".arrow"):
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all().to_pylist()
    data = path.read_bytes()
    if name.endswith(".gz"):
        data = gzip.decompress(data)
    elif name.endswith(".zst"):
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if name.endswith(".json"):
        return json.loads(data)
    return [json.loads(x) for x in data.splitlines() if x.strip()]


def kept_rows(selection: Path) -> list[int]:
    table = pq.read_table(selection, columns=["row", "kept"]).to_pydict()
    return sorted(r for r, k in zip(table["row"], table["kept"], strict=True) if k)


CASES = [
    ("openai_tools.jsonl", []), ("sharegpt_tools.jsonl", []), ("openai_parts.jsonl", []), ("preference.jsonl", []),
    ("mapped.jsonl", MAPPED), ("hub_parquet", []), ("spark_jsonl", []), ("save_to_disk", []),
    ("alpaca.jsonl", []), ("alpaca.json", []), ("alpaca.parquet", []), ("sharegpt.jsonl", []), ("openai.jsonl", []),
    ("prompt_completion.jsonl", []), ("prompt_response.jsonl", []), ("text.jsonl", []),
]


@pytest.mark.parametrize(("name", "extra"), CASES, ids=[c[0] for c in CASES])
def test_every_layout_runs_and_exports_its_records_unchanged(tmp_path: Path, models: list[str], name: str,
                                                             extra: list[str]) -> None:
    source = LAYOUT_DIR / name
    out, work = tmp_path / "pruned.jsonl", tmp_path / "work"
    r = invoke(["run", source, "-o", out, "--workdir", work, *models, *extra, "-q"])
    assert r.exit_code == 0, r.stderr
    kept = kept_rows(work / "selection.parquet")
    assert kept
    records = source_records(source)
    exported = [json.loads(x) for x in out.read_bytes().splitlines()]
    assert exported == [records[i] for i in kept]
    if name.endswith(".jsonl"):  # JSON Lines: the same bytes, line for line
        lines = source.read_bytes().splitlines()
        assert out.read_bytes().splitlines() == [lines[i] for i in kept]
    meta = read_meta(str(work / "embeddings.parquet"))
    assert meta.stats["rows"] == len(records)
    if source.is_dir():
        assert [s["path"] for s in meta.source["shards"]] == sorted(
            p.name for p in source.iterdir() if p.name.endswith((".parquet", ".arrow", ".jsonl", ".gz", ".zst"))
            and not p.name.startswith((".", "_")))


@pytest.mark.parametrize("name", ["hub_parquet", "save_to_disk"])
def test_a_folder_exports_one_parquet_file(tmp_path: Path, models: list[str], name: str) -> None:
    source = LAYOUT_DIR / name
    out, work = tmp_path / "pruned.parquet", tmp_path / "work"
    r = invoke(["run", source, "-o", out, "--workdir", work, *models, "-q"])
    assert r.exit_code == 0, r.stderr
    records = source_records(source)
    table = pq.read_table(out)
    assert table.to_pylist() == [records[i] for i in kept_rows(work / "selection.parquet")]
    if name == "hub_parquet":  # Parquet shards keep their own schema
        assert table.schema.equals(pq.read_schema(source / "train-00000-of-00002.parquet"), check_metadata=False)


def test_non_text_parts_are_reported_and_recorded(tmp_path: Path, models: list[str]) -> None:
    out = tmp_path / "e.parquet"
    r = invoke(["embed", LAYOUT_DIR / "openai_parts.jsonl", "-o", out, *models])
    assert r.exit_code == 0, r.stderr
    assert "4 non-text content parts (images, audio, files) in 3 rows are not scored" in " ".join(r.stderr.split())
    stats = read_meta(str(out)).stats
    assert (stats["non_text_parts"], stats["rows_with_non_text_parts"]) == (4, 3)


# --- --fields -------------------------------------------------------------------------------------------------------


def test_fields_errors_name_the_mapped_field(tmp_path: Path, models: list[str]) -> None:
    out = tmp_path / "e.parquet"
    r = invoke(["embed", LAYOUT_DIR / "mapped.jsonl", "-o", out, *models, "--fields", "prompt=ask,response=answer"])
    assert r.exit_code == 2
    assert r.stderr.strip().endswith("mapped.jsonl:1: field 'answer': missing (mapped as response by --fields)")
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--fields", "prompt=ask"], "--fields 'prompt=ask': map exactly one of"),
    (["--fields", "prompt=q,response=a", "--format", "alpaca"], "--fields and --format cannot be used together"),
])
def test_bad_fields_options_fail_before_any_model_loads(tmp_path: Path, args: list[str], message: str) -> None:
    for command in (["embed", LAYOUT_DIR / "mapped.jsonl", "-o", tmp_path / "e.parquet"],
                    ["run", LAYOUT_DIR / "mapped.jsonl", "-o", tmp_path / "o.jsonl", "--workdir", tmp_path / "w"]):
        r = invoke([*command, "--embed-model", tmp_path / "no-such-model", *args])
        assert r.exit_code == 2
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


# --- pipes, duplicates, bad rows ------------------------------------------------------------------------------------


def _fifo(tmp_path: Path, data: bytes) -> Path:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    threading.Thread(target=lambda: fifo.write_bytes(data), daemon=True).start()
    return fifo


def test_embed_and_run_read_a_fifo_once(tmp_path: Path, models: list[str]) -> None:
    data = (LAYOUT_DIR / "alpaca.jsonl").read_bytes()
    emb = tmp_path / "e.parquet"
    r = invoke(["embed", _fifo(tmp_path, data), "-o", emb, *models, "-q"])
    assert r.exit_code == 0, r.stderr
    meta = read_meta(str(emb))
    assert meta.stats["rows"] == 6 and meta.source["stream"] is True
    r = invoke(["stratify", emb, "-o", tmp_path / "s.parquet", "--proxy-model", models[3], "-q"])
    assert r.exit_code == 2 and "made from stdin or a pipe" in r.stderr and "--input" in r.stderr
    os.unlink(tmp_path / "pipe")
    out = tmp_path / "pruned.jsonl"
    r = invoke(["run", _fifo(tmp_path, data), "-o", out, "--workdir", tmp_path / "w", *models, "-q"])
    assert r.exit_code == 0, r.stderr
    assert set(out.read_bytes().splitlines()) <= set(data.splitlines()) and out.read_bytes()


def test_exact_duplicates_are_embedded_once(tmp_path: Path, models: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import slapcli.stages.embed as embed_module

    seen: list[int] = []
    real = embed_module.encode_texts

    def counting(tokenizer, model, texts, *args, **kwargs):
        seen.append(len(texts))
        return real(tokenizer, model, texts, *args, **kwargs)

    monkeypatch.setattr(embed_module, "encode_texts", counting)
    same = json.dumps({"instruction": "Say hi.", "output": "Hi."})
    other = json.dumps({"instruction": "Say bye.", "output": "Bye."})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([same] * 40 + [other] + [same] * 9) + "\n")
    out = tmp_path / "e.parquet"
    r = invoke(["embed", path, "-o", out, *models, "-q"])
    assert r.exit_code == 0, r.stderr
    assert sum(seen) == 2
    table = pq.read_table(out)
    vectors = np.array(table["embedding"].to_pylist())
    assert table.num_rows == 50 and len(np.unique(vectors, axis=0)) == 2
    assert len(set(table["n_response_tokens"].to_pylist())) == 2


@pytest.mark.parametrize(("row", "message"), [
    (b'{"instruction": "i", "output": "a", "output": "b"}', "field 'output': the key appears twice"),
    (b'{"instruction": "i\\udc00", "output": "o"}', "field 'instruction': a lone surrogate escape"),
    (b'{"instruction": "i", "output": "o", "meta": "\\ud800"}', "field 'meta': a lone surrogate escape"),
    (b'{"instruction": "i", "output": "o", "n": ' + b"1" * 5000 + b"}", "an integer too long to read"),
    (b'{"instruction": "i", "output": "\\u200b\\u200b"}', "field 'output': no response"),
])
def test_bad_rows_are_one_line_errors_and_skippable(tmp_path: Path, models: list[str], row: bytes,
                                                    message: str) -> None:
    good = (LAYOUT_DIR / "alpaca.jsonl").read_bytes()
    path = tmp_path / "d.jsonl"
    path.write_bytes(good + row + b"\n")
    r = invoke(["embed", path, "-o", tmp_path / "e.parquet", *models, "-q"])
    assert r.exit_code == 2
    assert r.stderr.strip() == f"error: {path}:7: {message}" or (
        r.stderr.startswith(f"error: {path}:7: {message}") and len(r.stderr.strip().splitlines()) == 1), r.stderr
    out = tmp_path / "pruned.parquet"
    r = invoke(["run", path, "-o", out, "--workdir", tmp_path / "w", *models, "-q", "--on-bad-line", "skip"])
    assert r.exit_code == 0, r.stderr
    assert 0 < pq.read_metadata(out).num_rows <= 6


def test_a_huge_row_is_truncated_not_an_error(tmp_path: Path, models: list[str]) -> None:
    path = tmp_path / "d.jsonl"
    huge = json.dumps({"instruction": "Repeat the word.", "output": "word " * 2_000_000})
    path.write_bytes((LAYOUT_DIR / "alpaca.jsonl").read_bytes() + huge.encode() + b"\n")
    out = tmp_path / "e.parquet"
    r = invoke(["embed", path, "-o", out, *models, "-q", "--max-tokens", "64"])
    assert r.exit_code == 0, r.stderr
    table = pq.read_table(out, columns=["truncated", "n_response_tokens"]).to_pydict()
    assert table["truncated"][6] and table["n_response_tokens"][6] <= 64


def test_a_folder_of_mixed_containers(tmp_path: Path, models: list[str]) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.parquet").write_bytes((LAYOUT_DIR / "hub_parquet" / "train-00000-of-00002.parquet").read_bytes())
    (folder / "b.jsonl.gz").write_bytes((LAYOUT_DIR / "spark_jsonl" / "part-00000.jsonl.gz").read_bytes())
    out, work = tmp_path / "pruned.jsonl", tmp_path / "work"
    r = invoke(["run", folder, "-o", out, "--workdir", work, *models, "-q"])
    assert r.exit_code == 0, r.stderr
    meta = read_meta(str(work / "embeddings.parquet"))
    assert (meta.source["container"], meta.source["compression"]) == ("mixed", "mixed")
    records = source_records(folder)
    assert [json.loads(x) for x in out.read_bytes().splitlines()] == [records[i] for i in kept_rows(
        work / "selection.parquet")]


# --- export -o DIR/: one file per shard --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hub_parquet", "spark_jsonl", "save_to_disk"])
def test_a_folder_exports_one_file_per_shard(tmp_path: Path, models: list[str], name: str) -> None:
    source = LAYOUT_DIR / name
    out, work = tmp_path / "pruned", tmp_path / "work"
    r = invoke(["run", source, "-o", f"{out}/", "--workdir", work, *models, "-q"])
    assert r.exit_code == 0, r.stderr
    shards = sorted(p.name for p in source.iterdir()
                    if p.name.endswith((".parquet", ".arrow", ".jsonl", ".gz", ".zst")) and p.name[0] not in "._")
    assert sorted(p.name for p in out.iterdir()) == shards
    kept, start, total = set(kept_rows(work / "selection.parquet")), 0, 0
    for shard in shards:
        records = source_records(source / shard)
        expected = [rec for i, rec in enumerate(records) if start + i in kept]
        assert source_records(out / shard) == expected, shard
        if shard.endswith(".jsonl"):  # the same bytes, line for line
            lines = (source / shard).read_bytes().splitlines()
            assert (out / shard).read_bytes().splitlines() == [x for i, x in enumerate(lines) if start + i in kept]
        if shard.endswith(".parquet"):
            assert pq.read_schema(out / shard).equals(pq.read_schema(source / shard), check_metadata=True)
        start += len(records)
        total += len(expected)
    assert total == len(kept)
    r = invoke(["embed", out, "-o", tmp_path / "again.parquet", *models, "-q"])  # slap reads what it wrote
    assert r.exit_code == 0, r.stderr
    assert read_meta(str(tmp_path / "again.parquet")).stats["rows"] == len(kept)


def test_folder_output_mistakes_are_one_line_before_any_work(tmp_path: Path, models: list[str]) -> None:
    r = invoke(["run", LAYOUT_DIR / "alpaca.jsonl", "-o", f"{tmp_path / 'out'}/", "--workdir", tmp_path / "w",
                *models, "-q"])
    assert r.exit_code == 2 and "writes one file per shard of a folder input" in r.stderr
    assert not (tmp_path / "w").exists() and not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    r = invoke(["run", LAYOUT_DIR / "spark_jsonl", "-o", f"{tmp_path / 'out'}/", "--workdir", tmp_path / "w",
                *models, "-q", "--force"])
    assert r.exit_code == 2 and "exists; -o DIR/ writes a new folder" in r.stderr
    r = invoke(["run", LAYOUT_DIR / "spark_jsonl", "-o", tmp_path / "one.jsonl", "--workdir", tmp_path / "w",
                *models, "-q"])
    assert r.exit_code == 0, r.stderr
    r = invoke(["export", tmp_path / "w" / "selection.parquet", "-o", f"{tmp_path / 'sel'}/", "--order", "selection"])
    assert r.exit_code == 2 and "--order selection needs one output file" in r.stderr
    assert not (tmp_path / "sel").exists()


def test_fields_from_a_llama_factory_dataset_info(tmp_path: Path, models: list[str]) -> None:
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"qa": {"file_name": "mapped.jsonl", "columns": {
        "prompt": "ask", "response": "reply", "system": "persona"}}}))
    out, work = tmp_path / "pruned.jsonl", tmp_path / "work"
    source = LAYOUT_DIR / "mapped.jsonl"
    r = invoke(["run", source, "-o", out, "--workdir", work, *models, "-q", "--fields", f"{info}:qa"])
    assert r.exit_code == 0, r.stderr
    # The artifact records the mapping itself: later stages do not need the dataset_info.json any more.
    assert read_meta(str(work / "embeddings.parquet")).source["fields"] == "prompt=ask,query=input,response=reply," \
        "system=persona"
    lines = source.read_bytes().splitlines()
    assert out.read_bytes().splitlines() == [lines[i] for i in kept_rows(work / "selection.parquet")]
    r = invoke(["embed", source, "-o", tmp_path / "e.parquet", *models, "--fields", f"{info}:other"])
    assert r.exit_code == 2 and "no entry 'other' (entries: qa)" in r.stderr
    r = invoke(["embed", source, "-o", tmp_path / "e.parquet", *models, "--fields", f"{tmp_path}/none.json:qa"])
    assert r.exit_code == 2 and "cannot read" in r.stderr
