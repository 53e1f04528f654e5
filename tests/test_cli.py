"""The `slap` commands end to end on tiny random models: exit codes, stdout vs stderr, artifacts, bytes."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from slapcli.artifacts import read_meta
from slapcli.cli import app

runner = CliRunner()

TOPICS = ["python lists", "french cooking", "prime numbers", "poetry", "sql joins", "the moon", "tax law", "jazz"]


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        vocab = ["alpha", "beta", "gamma", "delta", "omega", "kappa"]
        words = " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 12)))
        rows.append({"instruction": f"Explain {topic} #{i}", "input": "" if i % 3 else f"context {words}",
                     "output": f"{topic} is about {words}.", "id": f"r{i}"})
    return rows


@pytest.fixture()
def data_file(tmp_path):
    rows = make_rows(60)
    rows[10] = dict(rows[3], id="dup-of-3")  # an exact duplicate (same prompt and response, other id)
    path = tmp_path / "data.jsonl"
    # Unusual but valid JSON formatting, to prove export copies bytes rather than re-serialising.
    path.write_bytes(b"".join(json.dumps(r, indent=None, separators=(", ", ":  ")).encode() + b"\n" for r in rows))
    return path


@pytest.fixture()
def models(tiny_encoder_dir, tiny_proxy_dir):
    return ["--embed-model", str(tiny_encoder_dir), "--proxy-model", str(tiny_proxy_dir)]


def invoke(args: list[str], input: bytes | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


def chain(tmp_path, data_file, models, method="slap", extra_select=()):
    emb, strata, sel = tmp_path / "e.parquet", tmp_path / "s.parquet", tmp_path / "sel.parquet"
    r = invoke(["embed", data_file, "-o", emb, *models[:2], "--proxy-model", models[3], "-q"])
    assert r.exit_code == 0, r.stderr
    r = invoke(["stratify", emb, "-o", strata, "--proxy-model", models[3], "--clusters", "4", "-q"])
    assert r.exit_code == 0, r.stderr
    r = invoke(["select", strata, "-o", sel, "--method", method, "--proxy-model", models[3], "--keep", "0.5",
                "--proj-dim", "64", "-q", *extra_select])
    assert r.exit_code == 0, r.stderr
    return emb, strata, sel


@pytest.mark.parametrize("method", ["slap", "embedding", "stratified", "random", "ccs", "kcenter", "loss", "ifd"])
def test_four_commands_chain_and_export_copies_bytes(tmp_path, data_file, models, method):
    _emb, _strata, sel = chain(tmp_path, data_file, models, method)
    out = tmp_path / "pruned.jsonl"
    r = invoke(["export", sel, "-o", out])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == ""  # nothing but data on stdout, and here the data went to a file
    source_lines = data_file.read_bytes().splitlines(keepends=True)
    kept = out.read_bytes().splitlines(keepends=True)
    assert len(kept) == 30  # keep 0.5 of 60 rows
    # Every exported line is an input line, byte for byte, in input order.
    positions = [source_lines.index(line) for line in kept]
    assert positions == sorted(positions)
    table = pq.read_table(sel)
    kept_col = table["kept"].to_pylist()
    assert sum(kept_col) == 30
    reasons = set(table["reason"].to_pylist())
    assert "duplicate" in reasons and "selected" in reasons
    # The duplicate pair is never both kept.
    rows = table["row"].to_pylist()
    assert not (kept_col[rows.index(3)] and kept_col[rows.index(10)])


def test_loss_baselines_need_proxy_losses(tmp_path, data_file, models):
    emb, strata = tmp_path / "e.parquet", tmp_path / "s.parquet"
    assert invoke(["embed", data_file, "-o", emb, *models[:4], "-q"]).exit_code == 0
    assert invoke(["stratify", emb, "-o", strata, "--no-proxy-loss", "-q"]).exit_code == 0
    r = invoke(["select", strata, "-o", tmp_path / "sel.parquet", "--method", "ccs", "-q"])
    assert r.exit_code == 2 and "--no-proxy-loss" in r.stderr
    assert not (tmp_path / "sel.parquet").exists()


def test_ifd_reuses_its_prompt_free_losses_across_keep_ratios(tmp_path, data_file, models):
    _, strata, sel = chain(tmp_path, data_file, models, "ifd")
    first = pq.read_table(sel)
    r = invoke(["select", strata, "-o", tmp_path / "sel2.parquet", "--method", "ifd", "--keep", "0.5", "--force",
                "--proxy-model", models[3]])
    assert r.exit_code == 0, r.stderr
    assert "from the cache" in r.stderr
    assert pq.read_table(tmp_path / "sel2.parquet").equals(first)  # same scores, same choice


def test_budgets_hold_per_stratum(tmp_path, data_file, models):
    _, _strata, sel = chain(tmp_path, data_file, models, "slap")
    meta = read_meta(str(sel))
    budgets = meta.extra["strata_budgets"]
    table = pq.read_table(sel)
    kept_per = np.bincount(np.array(table["stratum"].to_pylist())[np.array(table["kept"].to_pylist())],
                           minlength=len(budgets))
    assert kept_per.tolist() == budgets
    chosen = [r for r, k in zip(table["step"].to_pylist(), table["kept"].to_pylist(), strict=True) if k]
    assert all(s is not None for s in chosen)  # the replay recorded a step for every kept row


def test_export_selection_order_and_stdout(tmp_path, data_file, models):
    _, _, sel = chain(tmp_path, data_file, models, "slap")
    r = invoke(["export", sel, "-o", "-", "--order", "selection"])
    assert r.exit_code == 0, r.stderr
    lines = r.stdout_bytes.splitlines()
    table = pq.read_table(sel)
    order = sorted((o, row) for o, row, k in zip(table["order"].to_pylist(), table["row"].to_pylist(),
                                                 table["kept"].to_pylist(), strict=True) if k)
    source = data_file.read_bytes().splitlines()
    assert lines == [source[row] for _, row in order]


def test_same_seed_same_bytes(tmp_path, data_file, models):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    _, _, sel_a = chain(a, data_file, models, "slap")
    _, _, sel_b = chain(b, data_file, models, "slap")
    assert pq.read_table(sel_a).equals(pq.read_table(sel_b))


def test_stdin_embed_needs_input_for_later_stages(tmp_path, data_file, models, monkeypatch):
    emb = tmp_path / "e.parquet"
    r = invoke(["embed", "-", "-o", emb, *models], input=data_file.read_bytes())
    assert r.exit_code == 0, r.stderr
    assert read_meta(str(emb)).source["path"] == "-"
    r = invoke(["stratify", emb, "-o", tmp_path / "s.parquet", "--proxy-model", models[3]])
    assert r.exit_code == 2
    assert "--input" in r.stderr
    r = invoke(["stratify", emb, "-o", tmp_path / "s.parquet", "--proxy-model", models[3], "--input", data_file,
                "-q"])
    assert r.exit_code == 0, r.stderr


def test_export_refuses_other_data(tmp_path, data_file, models):
    _, _, sel = chain(tmp_path, data_file, models, "stratified")
    other = tmp_path / "other.jsonl"
    other.write_bytes(data_file.read_bytes().replace(b"moon", b"mars"))
    out = tmp_path / "out.jsonl"
    r = invoke(["export", sel, "-o", out, "--input", other])
    assert r.exit_code == 2
    assert "not the data" in r.stderr and str(sel) in r.stderr
    assert not out.exists()


def test_bad_line_is_a_data_error_with_location(tmp_path, models):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"})
    path.write_text(f"{good}\n{good}\n{{not json\n")
    out = tmp_path / "e.parquet"
    r = invoke(["embed", path, "-o", out, *models])
    assert r.exit_code == 2
    assert f"{path}:3" in r.stderr and "malformed JSON" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    r = invoke(["embed", path, "-o", out, *models, "--on-bad-line", "skip"])
    assert r.exit_code == 0
    assert "skipped 1 bad rows" in r.stderr
    assert read_meta(str(out)).stats["bad_skipped"] == 1


def test_output_safety(tmp_path, data_file, models):
    emb = tmp_path / "e.parquet"
    assert invoke(["embed", data_file, "-o", emb, *models, "-q"]).exit_code == 0
    r = invoke(["embed", data_file, "-o", emb, *models, "-q"])
    assert r.exit_code == 2 and "--force" in r.stderr
    r = invoke(["embed", data_file, "-o", data_file, *models, "-q", "--force"])
    assert r.exit_code == 2 and "input path" in r.stderr


def test_run_reuses_valid_artifacts(tmp_path, data_file, models):
    work = tmp_path / "work"
    out = tmp_path / "pruned.jsonl"
    args = ["run", data_file, "-o", out, "--workdir", work, "--keep", "0.5", *models]
    r = invoke(args)
    assert r.exit_code == 0, r.stderr
    assert "rows kept" in r.stderr
    first = out.read_bytes()
    r = invoke([*args, "--force"])
    assert r.exit_code == 0, r.stderr
    assert r.stderr.count("reusing") == 3
    assert out.read_bytes() == first
    r = invoke([*args, "--force", "--keep", "0.6"])
    assert r.exit_code == 0, r.stderr
    assert r.stderr.count("reusing") == 1  # embeddings only: the budget changed


def test_inspect_prints_metadata(tmp_path, data_file, models):
    _, strata, _ = chain(tmp_path, data_file, models, "stratified")
    r = invoke(["inspect", strata])
    assert r.exit_code == 0
    assert "strata artifact" in r.stdout and "blake2b" in r.stdout


def test_every_command_has_help_with_an_example():
    for name in ("embed", "stratify", "select", "export", "run", "inspect"):
        r = invoke([name, "--help"])
        assert r.exit_code == 0
        assert "Example:" in r.stdout, name


def test_artifact_of_wrong_kind_is_refused(tmp_path, data_file, models):
    emb = tmp_path / "e.parquet"
    assert invoke(["embed", data_file, "-o", emb, *models, "-q"]).exit_code == 0
    r = invoke(["export", emb, "-o", tmp_path / "x.jsonl"])
    assert r.exit_code == 2 and "expected a selection artifact" in r.stderr

