"""The regimes benchmark's own pieces (scripts/benchmark_regimes.py): data builders, drop table, equal steps."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import benchmark_regimes as br
import compare_heldout
from benchlib.report import paired_rows
from benchlib.trainer import SUBSET_RUN, run_file, subset_tag


def args(**kw) -> argparse.Namespace:
    base = br.parse_args(["noisy", "--workdir", "unused", "--train-rows", "40", "--heldout-per-domain", "5"])
    for k, v in kw.items():
        setattr(base, k, v)
    return base


def test_noisy_pool_is_damaged_and_heldout_clean(tmp_path: Path) -> None:
    info = br.build_noisy(args(damaged_share=0.25), tmp_path)
    pool = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert len(pool) == 40 and sum("damage" in r for r in pool) == 10
    assert not any("damage" in r for r in held) and len(held) == 10
    assert info["pool_damage"]["clean"] == 30
    pool_answers = {r["output"] for r in pool}
    assert not any(r["output"] in pool_answers for r in held)
    # The damaged views of the held-out rows: every in-place kind, each pointing back at its clean row.
    views = [json.loads(line) for line in (tmp_path / "heldout_damaged.jsonl").read_text().splitlines()]
    assert {v["domain"] for v in views} == {"mismatch", "cut_off", "refusal", "repetition"}
    for v in views:
        clean = held[v["source"]]
        assert v["instruction"] == clean["instruction"] and v["output"] != clean["output"]


def test_damage_margin_is_the_mean_pair_gap_per_kind() -> None:
    clean = [1.0, 2.0, 3.0]
    damaged = [1.5, 2.5, 5.0, 2.0]  # pairs: (0, refusal), (1, refusal), (2, cut_off), (0, cut_off)
    kind = np.array(["refusal", "refusal", "cut_off", "cut_off"])
    source = np.array([0, 1, 2, 0])
    m = br.damage_margins(clean, damaged, kind, source)
    naive = {"refusal": ((1.5 - 1.0) + (2.5 - 2.0)) / 2, "cut_off": ((5.0 - 3.0) + (2.0 - 1.0)) / 2}
    assert m["refusal"] == pytest.approx(naive["refusal"]) and m["cut_off"] == pytest.approx(naive["cut_off"])
    assert m["mean"] == pytest.approx((naive["refusal"] + naive["cut_off"]) / 2)


def test_targeted_dev_and_heldout_are_the_target_domain_and_never_in_the_pool(tmp_path: Path) -> None:
    a = br.parse_args(["targeted", "--workdir", "unused", "--train-rows", "40", "--heldout-per-domain", "5",
                       "--target-rows", "6"])
    info = br.build_targeted(a, tmp_path)
    read = lambda name: [json.loads(x) for x in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    pool, held, dev = read("train.jsonl"), read("heldout.jsonl"), read("target.jsonl")
    assert {r["domain"] for r in held} == {r["domain"] for r in dev} == {"code"}
    assert len(dev) == 6 and len(held) == 5 and info["target_domain"] == "code"
    key = lambda r: (r["instruction"], r["input"], r["output"])  # noqa: E731
    assert not ({key(r) for r in dev} & {key(r) for r in pool}) and not ({key(r) for r in held} & {key(r) for r in dev})


def test_heldout_extra_adds_unseen_target_rows_and_leaves_the_pool_and_dev_rows(tmp_path: Path) -> None:
    argv = ["targeted", "--workdir", "unused", "--train-rows", "40", "--heldout-per-domain", "5", "--target-rows", "6"]
    read = lambda d, name: [json.loads(x) for x in (d / name).read_text().splitlines()]  # noqa: E731
    key = lambda r: (r["instruction"], r["input"], r["output"])  # noqa: E731
    (tmp_path / "base").mkdir()
    (tmp_path / "more").mkdir()
    br.build_targeted(br.parse_args(argv), tmp_path / "base")
    info = br.build_targeted(br.parse_args([*argv, "--heldout-extra", "7"]), tmp_path / "more")
    for name in ("train.jsonl", "target.jsonl"):
        assert (tmp_path / "base" / name).read_bytes() == (tmp_path / "more" / name).read_bytes()
    base, more = read(tmp_path / "base", "heldout.jsonl"), read(tmp_path / "more", "heldout.jsonl")
    assert more[:5] == base and len(more) == 12 == info["heldout_rows_target"]
    assert {r["domain"] for r in more} == {"code"} and len({key(r) for r in more}) == 12
    seen = {key(r) for name in ("train.jsonl", "target.jsonl") for r in read(tmp_path / "more", name)}
    assert not {key(r) for r in more[5:]} & seen


def test_regimes_draw_from_a_user_file_keep_its_domains_and_never_leak(tmp_path: Path) -> None:
    answer = "a long enough answer that every kind of damage can cut, repeat or replace here"
    rows = [{"instruction": f"q{d}{i}", "input": "", "output": f"{d} {i} {answer}", "domain": d,
             "source": f"s{i}"}
            for d in ("code", "docs") for i in range(30)]
    data = tmp_path / "pool.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = lambda d, name: [json.loads(x) for x in (d / name).read_text().splitlines()]  # noqa: E731
    key = lambda r: (r["instruction"], r["output"])  # noqa: E731
    noisy, targeted = tmp_path / "noisy", tmp_path / "targeted"
    noisy.mkdir()
    targeted.mkdir()
    base = ["--workdir", "unused", "--train", str(data), "--train-rows", "20", "--heldout-per-domain", "4"]
    info = br.build_noisy(br.parse_args(["noisy", *base, "--damaged-share", "0.25"]), noisy)
    pool, held = read(noisy, "train.jsonl"), read(noisy, "heldout.jsonl")
    assert len(pool) == 20 and info["pool_damage"]["clean"] == 15 and str(data) in info["source"]
    assert {r["domain"] for r in held} == {"code", "docs"} and len(held) == 8
    assert not {key(r) for r in held} & {key(r) for r in pool if "damage" not in r}
    # The dev rows and the extra held-out rows come from the file's target-domain rows outside pool and held-out.
    info = br.build_targeted(br.parse_args(["targeted", *base, "--target-domain", "docs", "--target-rows", "5",
                                            "--heldout-extra", "3"]), targeted)
    pool, held, dev = (read(targeted, n) for n in ("train.jsonl", "heldout.jsonl", "target.jsonl"))
    assert {r["domain"] for r in held} == {r["domain"] for r in dev} == {"docs"}
    assert len(dev) == 5 and len(held) == 7 == info["heldout_rows_target"]
    sets = [{key(r) for r in rows} for rows in (pool, held, dev)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    with pytest.raises(SystemExit, match="only"):
        br.build_targeted(br.parse_args(["targeted", *base, "--target-domain", "docs", "--target-rows", "30"]),
                          tmp_path)


def test_damage_table_counts_dropped_shares_per_kind(tmp_path: Path) -> None:
    labels = np.array(["clean"] * 6 + ["cut_off"] * 2 + ["near_copy"] * 2)
    path = tmp_path / "sel.parquet"
    kept = [True] * 5 + [False] + [False, True] + [False, False]
    pq.write_table(pa.table({"row": list(range(10)), "kept": kept}), path)
    table = br.damage_table({"x": {"label": "m", "keep": 0.6, "seed": 0, "path": str(path)}}, labels)
    entry = table["m@0.60"]
    assert entry["dropped"] == pytest.approx({"clean": 1 / 6, "cut_off": 0.5, "near_copy": 1.0})
    assert entry["dropped_damaged_non_copy"] == 0.5


def test_equal_steps_trainer_cycles_the_subset_for_exactly_the_steps() -> None:
    trainer = br.EqualStepsTrainer.__new__(br.EqualStepsTrainer)
    trainer.args = argparse.Namespace(batch_size=4, epochs=1)
    trainer.steps = 7
    batches = list(trainer.batches(np.arange(10), np.random.default_rng(0)))
    assert len(batches) == 7 and trainer.total_steps(10) == 7
    assert sorted(r for b in batches[:3] for r in b) == list(range(10))  # one whole pass before any row repeats


def test_variant_is_a_label_a_method_and_select_options() -> None:
    args = br.parse_args(["noisy", "--workdir", "w", "--variant", "slap-prop=slap --allocation proportional",
                          "--variant", "rnd=random"])
    assert args.variant == [("slap-prop", "slap", ["--allocation", "proportional"]), ("rnd", "random", [])]
    for bad in ("slap", "=slap", "a_b=slap", "a=", "a/b=slap"):
        with pytest.raises(SystemExit):
            br.parse_args(["noisy", "--workdir", "w", "--variant", bad])
    assert br.parse_args(["clean", "--workdir", "w", "--methods", ""]).methods == []
    assert br.parse_args(["clean", "--workdir", "w"]).methods == ["stratified", "slap"]


def test_damaged_targeted_pool_keeps_dev_and_heldout_clean_and_of_the_domain(tmp_path: Path) -> None:
    a = br.parse_args(["targeted", "--workdir", "unused", "--train-rows", "40", "--heldout-per-domain", "5",
                       "--target-rows", "6", "--damaged-share", "0.25"])
    info = br.build_targeted(a, tmp_path)
    read = lambda name: [json.loads(x) for x in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    pool, held, dev = read("train.jsonl"), read("heldout.jsonl"), read("target.jsonl")
    assert sum("damage" in r for r in pool) == 10 and info["pool_damage"]["clean"] == 30
    assert not any("damage" in r for r in held + dev) and {r["domain"] for r in held + dev} == {"code"}
    assert {r["domain"] for r in pool} == {"code", "general"}  # damage keeps a row's domain
    views = read("heldout_damaged.jsonl")
    assert views and all(held[v["source"]]["instruction"] == v["instruction"] for v in views)
    # Without the option the targeted pool stays undamaged, and the noisy default stays 0.3.
    assert br.parse_args(["targeted", "--workdir", "w"]).damaged_share == 0.0
    assert br.parse_args(["noisy", "--workdir", "w"]).damaged_share == 0.3


def test_paired_rows_reads_differences_row_by_row() -> None:
    diff = [0.5, -0.1, -0.2, 0.05, -0.3, -0.01, 0.0, -0.02]  # one large row decides the mean
    r = paired_rows(diff, trim=1, largest=2)
    assert r["mean"] == pytest.approx(sum(diff) / 8) and r["median"] == pytest.approx(-0.015)
    assert r["lower"] == 5 and r["rows"] == 8
    assert r["trimmed_mean"] == pytest.approx(sum(sorted(diff)[1:-1]) / 6)
    assert r["largest"] == [(0, 0.5), (4, -0.3)]


def test_compare_heldout_averages_shuffles_per_seed_and_keeps_the_equal_steps_runs_apart(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    files = {"nearest_k0.20_s0_t0.ab12.json": [1.0, 2.0], "nearest_k0.20_s0_t1.ab12.json": [3.0, 2.0],
             "oracle-domain_rows_k0.20_s1_t0.ab12.json": [1.0, 1.0],
             "slap_k0.20_s0_eqsteps_t0.ab12.json": [9.0, 9.0], "slap_k0.30_s0_t0.ab12.json": [5.0, 5.0]}
    for name, rows in files.items():
        (runs / name).write_text(json.dumps({"heldout_rows": rows}))
    got = compare_heldout.per_seed_rows(tmp_path, "0.20", equal_steps=False)
    assert set(got) == {("nearest", 0), ("oracle-domain_rows", 1)}
    assert got[("nearest", 0)].tolist() == [2.0, 2.0]
    assert set(compare_heldout.per_seed_rows(tmp_path, "0.20", equal_steps=True)) == {("slap", 0)}


def test_subset_run_names_read_back_what_the_benchmark_wrote(tmp_path: Path) -> None:
    for label, keep, seed, eq in (("oracle: clean domain rows", 0.2, 1, True), ("slap-tc1.5", 0.7, 12, False)):
        path = run_file(tmp_path, subset_tag(label, keep, seed, eq), 2, "0a1b2c")
        m = SUBSET_RUN.fullmatch(path.name)
        assert m is not None and path.parent == tmp_path / "runs"
        assert (m["label"], m["keep"], int(m["seed"]), bool(m["eq"]), int(m["shuffle"])) == (
            label.replace(": ", "-").replace(" ", "_"), f"{keep:.2f}", seed, eq, 2)
