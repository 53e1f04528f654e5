"""`slap inspect`: the documented JSON of each artifact kind, and the diagnosis of a data file before pruning
(duplicates, nearest-neighbour cosines, damaged rows, suggested flags) on tiny models."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from slapcli.artifacts import read_embeddings
from slapcli.cli import app
from slapcli.report.damage import (
    damage_kinds,
    is_emptyish,
    is_refusal,
    is_repetitive,
    looks_cut_off,
)
from slapcli.report.diagnose import loss_outliers, suggest

runner = CliRunner()

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]
# Line (1-based) -> what is wrong with that row.
DAMAGED = {5: "empty", 8: "repeated", 12: "refusal", 15: "cut_off"}
DUPLICATE_LINE, ORIGINAL_LINE, BAD_LINE = 20, 3, 25


def make_lines(n: int = 40) -> list[str]:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        rows.append({"instruction": f"Describe item {i} of the {rng.choice(WORDS)} list", "input": "",
                     "output": f"Item {i} is {words}."})
    rows[4]["output"] = "N/A"
    rows[7]["output"] = "The cat sat on the mat. " * 8
    rows[11]["output"] = "I'm sorry, but I can't help with that request."
    rows[14]["output"] = "The main reasons are the economy, the weather and the"
    rows[DUPLICATE_LINE - 1] = dict(rows[ORIGINAL_LINE - 1])
    lines = [json.dumps(r) for r in rows]
    lines[BAD_LINE - 1] = '{"instruction": "broken", '
    return lines


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(make_lines()) + "\n")
    return path


@pytest.fixture()
def models(tiny_encoder_dir, tiny_proxy_dir):
    return ["--embed-model", str(tiny_encoder_dir), "--proxy-model", str(tiny_proxy_dir)]


def invoke(args: list) -> object:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def artifacts(tmp_path, data_file, models):
    emb, strata, sel = tmp_path / "e.parquet", tmp_path / "s.parquet", tmp_path / "sel.parquet"
    assert invoke(["embed", data_file, "-o", emb, *models, "--on-bad-line", "skip", "-q"]).exit_code == 0
    assert invoke(["stratify", emb, "-o", strata, "--proxy-model", models[3], "--clusters", "3", "-q"]).exit_code == 0
    assert invoke(["select", strata, "-o", sel, "--method", "stratified", "--keep", "0.5", "-q"]).exit_code == 0
    return emb, strata, sel


# --- inspect --json on artifacts ------------------------------------------------------------------------------

ARTIFACT_KEYS = {"kind", "path", "schema_version", "tool_version", "command", "rows", "columns", "source", "upstream",
                 "config", "stats", "summary"}


def test_json_of_each_artifact_kind_follows_the_documented_schema(tmp_path, data_file, models):
    emb, strata, sel = artifacts(tmp_path, data_file, models)
    docs = {}
    for path in (emb, strata, sel):
        r = invoke(["inspect", path, "--json"])
        assert r.exit_code == 0, r.stderr
        doc = json.loads(r.stdout)  # nothing but the JSON object on stdout
        assert set(doc) == ARTIFACT_KEYS
        assert doc["path"] == str(path)
        assert doc["rows"] == pq.read_metadata(path).num_rows == 39  # 40 lines, one bad
        assert doc["columns"] == pq.read_schema(path).names
        assert doc["source"]["fingerprint"]["size"] == data_file.stat().st_size
        assert isinstance(doc["config"], dict) and isinstance(doc["stats"], dict)
        docs[doc["kind"]] = doc
    assert docs["embeddings"]["upstream"] is None
    assert docs["strata"]["upstream"]["kind"] == "embeddings"
    assert docs["selection"]["upstream"]["kind"] == "strata"
    assert docs["embeddings"]["summary"] == {"dim": 32, "truncated": 0}
    strata_summary = docs["strata"]["summary"]
    pruned = pq.read_table(strata, columns=["pruned"])["pruned"].drop_null().to_pylist()
    assert strata_summary["pruned"] == {label: pruned.count(label) for label in sorted(set(pruned))}
    assert strata_summary["pruned"]["duplicate"] == 1
    assert strata_summary["clusters"] == 3 and strata_summary["strata"] <= strata_summary["strata_total"]
    kept = pq.read_table(sel, columns=["kept"])["kept"].to_pylist()
    assert docs["selection"]["summary"]["kept"] == sum(kept) == docs["selection"]["stats"]["kept"]
    assert docs["selection"]["summary"]["kept_share"] == pytest.approx(sum(kept) / len(kept))
    assert docs["selection"]["summary"]["reasons"]["duplicate"] == 1

    r = invoke(["inspect", strata])  # without --json: the human-readable description, as before
    assert r.exit_code == 0 and "strata artifact" in r.stdout and "blake2b" in r.stdout


# --- inspect DATA ---------------------------------------------------------------------------------------------

DATA_KEYS = {"kind", "path", "container", "layout", "rows", "records", "bad_rows", "bad_examples",
             "exact_duplicates", "near_duplicates", "nearest_neighbour_cosine", "damaged", "damaged_rows",
             "suggestion"}


def test_diagnosis_of_a_data_file(tmp_path, data_file, models):
    r = invoke(["inspect", data_file, "--json", "--embed-model", models[1], "-q"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == DATA_KEYS
    assert doc["kind"] == "data" and doc["layout"] == "alpaca" and doc["container"] == "jsonl"
    assert (doc["records"], doc["rows"], doc["bad_rows"]) == (40, 39, 1)
    assert f"data.jsonl:{BAD_LINE}" in doc["bad_examples"][0]
    assert doc["exact_duplicates"] == {"rows": 1, "groups": 1, "largest": [[ORIGINAL_LINE, DUPLICATE_LINE]]}
    for line, kind in DAMAGED.items():
        assert doc["damaged"][kind] == {"rows": 1, "lines": [line]}
    assert doc["damaged_rows"] == 4
    assert "loss_outlier" not in doc["damaged"]  # needs --strata
    assert set(doc["nearest_neighbour_cosine"]) == {"p10", "p50", "p90", "p99", "max"}
    near = doc["near_duplicates"]
    assert near["threshold"] == 0.9 and near["redundant"] <= near["rows"]
    s = doc["suggestion"]
    redundant = 1 + near["redundant"]
    assert s == suggest(str(data_file), 39, redundant, 4, None)
    assert f"--keep {s['keep']}" in s["command"]

    r = invoke(["inspect", data_file, "--embed-model", models[1], "-q"])
    assert r.exit_code == 0
    assert "39 rows" in r.stdout and "suggestion: --keep" in r.stdout and "repeated: 1 (lines 8)" in r.stdout


def test_diagnosis_reuses_an_embeddings_artifact_and_its_numbers_match_brute_force(tmp_path, data_file, models):
    emb, strata, _ = artifacts(tmp_path, data_file, models)
    computed = json.loads(invoke(["inspect", data_file, "--json", "--embed-model", models[1], "-q",
                                  "--near-duplicate", "0.95"]).stdout)
    r = invoke(["inspect", data_file, "--json", "--embeddings", emb, "--near-duplicate", "0.95"])
    assert r.exit_code == 0, r.stderr
    reused = json.loads(r.stdout)
    # The same vectors as `slap embed` (same encoder, text and pooling), up to float rounding.
    for key, value in reused["nearest_neighbour_cosine"].items():
        assert value == pytest.approx(computed["nearest_neighbour_cosine"][key], abs=1e-5)
    assert reused["near_duplicates"] == computed["near_duplicates"]

    x = read_embeddings(str(emb))
    distinct = np.ones(len(x), dtype=bool)  # the first row of each exact duplicate group
    hashes = pq.read_table(emb, columns=["content_hash"])["content_hash"].to_pylist()
    seen = set()
    for i, h in enumerate(hashes):
        distinct[i] = h not in seen
        seen.add(h)
    y = x[distinct]
    sims = y @ y.T
    np.fill_diagonal(sims, -np.inf)
    nn = sims.max(axis=1)
    assert reused["nearest_neighbour_cosine"]["p50"] == pytest.approx(float(np.median(nn)), abs=1e-5)
    assert reused["nearest_neighbour_cosine"]["max"] == pytest.approx(float(nn.max()), abs=1e-5)
    linked = (sims >= 0.95).any(axis=1)
    assert reused["near_duplicates"]["rows"] == int(linked.sum())

    r = invoke(["inspect", data_file, "--json", "--embeddings", emb, "--strata", strata])
    assert r.exit_code == 0, r.stderr
    outliers = json.loads(r.stdout)["damaged"]["loss_outlier"]
    loss = pq.read_table(strata, columns=["loss"])["loss"].to_numpy(zero_copy_only=False)
    assert outliers["rows"] == int(loss_outliers(loss.astype(float)).sum())


def test_diagnosis_reads_own_field_names(tmp_path, models):
    path = tmp_path / "qa.jsonl"
    rows = [{"question": f"What is {w}?", "answer": f"{w} is a letter."} for w in WORDS]
    rows.append({"question": "Again?", "answer": "I'm sorry, but I can't answer that."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = invoke(["inspect", path, "--json", "--embed-model", models[1], "--fields",
                "prompt=question,response=answer", "-q"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["rows"] == len(rows) and doc["bad_rows"] == 0
    assert doc["layout"] == "--fields prompt=question,response=answer"
    assert doc["damaged"]["refusal"] == {"rows": 1, "lines": [len(rows)]}


def test_diagnosis_refuses_an_embeddings_artifact_of_other_data(tmp_path, data_file, models):
    emb, _, _ = artifacts(tmp_path, data_file, models)
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(make_lines()[:30]) + "\n")
    r = invoke(["inspect", other, "--json", "--embeddings", emb])
    assert r.exit_code == 2
    assert "is not the data" in r.stderr and r.stdout == ""


# --- the tests behind each finding ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "kinds"), [
    ("", ["empty"]), ("  ...  ", ["empty"]), ("N/A", ["empty"]), ("7", []), ("4.6", []),
    ("go " * 30, ["repeated"]), ("one two three four five six seven eight nine ten eleven twelve thirteen", []),
    ("I'm sorry, but I cannot help with that.", ["refusal"]), ("I'm sorry to hear that. Rest well.", []),
    ("As an AI language model, I have no opinions. " + "Still, here it is.", ["refusal"]),
    ("The three reasons are cost, speed, and", ["cut_off"]), ("Here is the code:\n```python\nprint(1)", ["cut_off"]),
    ("SELECT * FROM t WHERE a = 1;", []), ("Birds: eagle, sparrow", []),
])
def test_damage_kinds(text, kinds):
    assert damage_kinds(text) == kinds


def test_each_damage_test_alone():
    assert is_emptyish("-") and not is_emptyish("a")
    assert is_repetitive("x y z " * 10) and not is_repetitive("x y z " * 3)  # too short to judge
    assert is_refusal("Unfortunately, I am unable to browse the web.")
    assert looks_cut_off("It works in three steps: first the") and not looks_cut_off("the")  # too short


def test_suggest_rounds_keep_down_within_bounds():
    s = suggest("d.jsonl", 1000, 100, 30, None)
    assert s["keep"] == 0.85 and s["prune_hardest"] == 0.0  # 1 - 0.13 = 0.87 -> 0.85
    assert "--strata" in " ".join(s["why"])
    assert suggest("d.jsonl", 1000, 0, 0, 0)["keep"] == 0.95
    assert "little to prune" in " ".join(suggest("d.jsonl", 1000, 5, 0, 0)["why"])
    assert suggest("d.jsonl", 100, 80, 0, 0)["keep"] == 0.5
    s = suggest("d.jsonl", 1000, 0, 0, 15)
    assert s["prune_hardest"] == 0.02 and "--prune-hardest 0.02" in s["command"]


def test_loss_outliers_are_beyond_three_iqr():
    loss = np.array([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 9.0, np.nan])
    q1, q3 = np.quantile(loss[:9], [0.25, 0.75])
    assert q3 + 3 * (q3 - q1) < 9.0
    assert loss_outliers(loss).tolist() == [False] * 8 + [True, False]
    assert not loss_outliers(np.array([1.0, np.nan])).any()
