"""Behaviour of the SLAP method on small synthetic data and tiny random models.

What the method promises, checked end to end through the stages (and the CLI where the option parsing
matters): budgets hold per stratum at any keep ratio, rare strata keep their rows under water-filling,
exact duplicates are never both kept, a --target file steers the replay, runs are deterministic, and the
selection artifact explains every input row.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from slapcli.artifacts import read_meta
from slapcli.cli import app
from slapcli.methods.pool import StratifiedPool
from slapcli.methods.registry import method_names
from slapcli.progress import Reporter
from slapcli.stages.embed import EmbedConfig, embed
from slapcli.stages.select import SelectConfig, select
from slapcli.stages.stratify import StratifyConfig, stratify

runner = CliRunner()
QUIET = Reporter(quiet=True)
STRATA_METHODS = ("slap", "embedding", "stratified")  # the methods that honour per-stratum budgets

TOPICS = ["python lists", "french cooking", "prime numbers", "poetry", "sql joins", "the moon", "tax law", "jazz"]
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa"]


# ----------------------------------------------------------------------------------------------- helpers


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def topic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        rows.append({"instruction": f"Explain {topic} #{i}", "input": "" if i % 3 else f"context {words}",
                     "output": f"{topic} is about {words}.", "id": f"r{i}"})
    return rows


def vocab_rows(vocab: list[str], n: int, seed: int, tag: str, sep: str = " ") -> list[dict]:
    """Rows whose prompt and response are made only of words from `vocab`."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return sep.join(rng.choice(vocab) for _ in range(k))

    return [{"instruction": words(rng.randint(3, 6)), "output": words(rng.randint(6, 12)), "id": f"{tag}{i}"}
            for i in range(n)]


def with_duplicates(rows: list[dict]) -> list[dict]:
    """Insert an exact duplicate of rows[3] and two of rows[10] (a triple), each with another id."""
    out = list(rows)
    out.insert(20, dict(rows[3], id="dup-of-r3"))
    out.insert(33, dict(rows[10], id="dup-of-r10-a"))
    out.insert(47, dict(rows[10], id="dup-of-r10-b"))
    return out


def do_embed(data: Path, out: Path, encoder: Path, proxy: Path) -> Path:
    embed(str(data), str(out), EmbedConfig(embed_model=str(encoder), proxy_model=str(proxy), device="cpu"), QUIET)
    return out


def do_stratify(emb: Path, out: Path, proxy: Path, **kwargs) -> Path:
    # A tiny random encoder puts most rows above any near-copy cosine and a random proxy's losses flag rows at
    # random: these tests are about strata and budgets, so the damage screen is off unless a test turns it on
    # (tests/test_screen_pipeline.py covers it).
    kwargs.setdefault("screen", False)
    kwargs.setdefault("near_dup_cosine", 0.0)
    stratify(str(emb), str(out), StratifyConfig(proxy_model=str(proxy), device="cpu", **kwargs), QUIET)
    return out


def do_select(strata: Path, out: Path, proxy: Path, **kwargs) -> pa.Table:
    kwargs.setdefault("proj_dim", 64)
    select(str(strata), str(out), SelectConfig(proxy_model=str(proxy), device="cpu", **kwargs), QUIET)
    return pq.read_table(out)


def invoke(args: list) -> object:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def kept_rows(table: pa.Table) -> np.ndarray:
    kept = np.array(table["kept"].to_pylist())
    return np.array(table["row"].to_pylist())[kept]


def kept_per_stratum(table: pa.Table, n_strata: int) -> list[int]:
    kept = np.array(table["kept"].to_pylist())
    return np.bincount(np.array(table["stratum"].to_pylist())[kept], minlength=n_strata).tolist()


def target_for(method: str, prepared: Prepared) -> list:
    """`nearest` needs a --target dev file: the data's own first rows stand in for one."""
    if method != "nearest":
        return []
    dev = prepared.data.with_name("dev.jsonl")
    dev.write_text("".join(prepared.data.read_text().splitlines(keepends=True)[:5]))
    return ["--target", dev]


@dataclass
class Prepared:
    data: Path
    rows: list[dict]
    embeddings: Path
    strata: Path


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a small shared machine two busy-waiting intra-op threads
    make them 10-80x slower; restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def module_env(tmp_path_factory: pytest.TempPathFactory):
    """What conftest's per-test `slap_cache_dir` does, for the module-scoped artifacts built below."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLAP_CACHE_DIR", str(tmp_path_factory.mktemp("slap-cache")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def mixed(module_env, tmp_path_factory, tiny_encoder_dir, tiny_proxy_dir) -> Prepared:
    """59 rows over 8 topics with a duplicate pair and a triple; 4 clusters x 3 loss bins, keep 0.5."""
    d = tmp_path_factory.mktemp("mixed")
    rows = with_duplicates(topic_rows(56))
    data = write_jsonl(d / "data.jsonl", rows)
    emb = do_embed(data, d / "e.parquet", tiny_encoder_dir, tiny_proxy_dir)
    strata = do_stratify(emb, d / "s.parquet", tiny_proxy_dir, clusters=4, loss_bins=3, keep=0.5)
    return Prepared(data, rows, emb, strata)


def eligible_rows(strata: Path) -> set[int]:
    t = pq.read_table(strata)
    return {r for r, p in zip(t["row"].to_pylist(), t["pruned"].to_pylist(), strict=True) if p is None}


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("method", method_names())
def test_keep_one_keeps_every_eligible_row(tmp_path, mixed, tiny_proxy_dir, method):
    sel = tmp_path / "sel.parquet"
    r = invoke(["select", mixed.strata, "-o", sel, "--method", method, "--keep", "1.0",
                "--proxy-model", tiny_proxy_dir, "--proj-dim", "64", "-q", *target_for(method, mixed)])
    assert r.exit_code == 0, r.stderr
    table = pq.read_table(sel)
    eligible = eligible_rows(mixed.strata)
    assert len(eligible) == len(mixed.rows) - 3  # the duplicate pair and the triple leave 3 copies out
    assert set(kept_rows(table).tolist()) == eligible
    meta = read_meta(str(sel))
    assert meta.stats["kept"] == meta.stats["budget"] == len(eligible)


def test_budget_of_one_row_per_stratum(tmp_path, mixed, tiny_proxy_dir):
    """--budget = number of non-empty strata: every non-empty stratum gets, and keeps, exactly one row."""
    nonempty = sum(1 for s in read_meta(str(mixed.strata)).extra["strata"] if s["size"] > 0)
    assert nonempty > 4  # several loss bins per cluster, so the check is not trivial
    strata = do_stratify(mixed.embeddings, tmp_path / "s.parquet", tiny_proxy_dir, clusters=4, loss_bins=3,
                         budget=nonempty)
    recorded = read_meta(str(strata)).extra["strata"]
    assert [s["budget"] for s in recorded] == [1 if s["size"] > 0 else 0 for s in recorded]
    for method in STRATA_METHODS:
        table = do_select(strata, tmp_path / f"sel-{method}.parquet", tiny_proxy_dir, method=method)
        budgets = read_meta(str(tmp_path / f"sel-{method}.parquet")).extra["strata_budgets"]
        assert budgets == [s["budget"] for s in recorded], method
        assert kept_per_stratum(table, len(recorded)) == budgets, method


@pytest.mark.parametrize("allocation", ["waterfill", "proportional", "sqrt"])
def test_tiny_keep_budgets_hold(tmp_path, mixed, tiny_proxy_dir, allocation):
    """--keep near 0: every stratum given a row keeps one, and the kept count per stratum is its budget."""
    n_strata = len(read_meta(str(mixed.strata)).extra["strata"])
    for method, keep in (("slap", 0.02), ("stratified", 0.02), ("embedding", 0.1), ("stratified", 0.1)):
        out = tmp_path / f"sel-{method}-{keep}.parquet"
        table = do_select(mixed.strata, out, tiny_proxy_dir, method=method, keep=keep, allocation=allocation)
        budgets = read_meta(str(out)).extra["strata_budgets"]
        assert sum(budgets) == round(keep * len(mixed.rows)) > 0
        kept = kept_per_stratum(table, n_strata)
        assert kept == budgets, (method, keep)
        assert all(k >= 1 for k, b in zip(kept, budgets, strict=True) if b > 0)


@pytest.mark.parametrize("proxy_loss", [False, True], ids=["no-proxy-loss", "proxy-loss"])
def test_rare_topic_keeps_its_rows_under_waterfill(tmp_path, tiny_encoder_dir, tiny_proxy_dir, proxy_loss):
    big = vocab_rows(["alpha", "beta", "gamma", "delta", "omega", "kappa", "report", "budget", "committee"],
                     60, seed=1, tag="big")
    rare = vocab_rows(["{", "}", "(", ")", ";", "=", "+", "-", "*", "/", "%", "#", "@", "&", "|", "0", "1"],
                      5, seed=2, tag="rare", sep="")
    rows = big + rare
    random.Random(3).shuffle(rows)
    is_rare = np.array([r["id"].startswith("rare") for r in rows])
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    emb = do_embed(data, tmp_path / "e.parquet", tiny_encoder_dir, tiny_proxy_dir)
    strata = do_stratify(emb, tmp_path / "s.parquet", tiny_proxy_dir, clusters=3, loss_bins=3,
                         proxy_loss=proxy_loss, keep=0.4, allocation="waterfill")
    t = pq.read_table(strata)
    cluster = np.array(t["cluster"].to_pylist())
    # Precondition (the tiny encoder separates symbols from words): the rare rows form a cluster of their own.
    rare_cluster = set(cluster[is_rare].tolist())
    assert len(rare_cluster) == 1 and not set(cluster[~is_rare].tolist()) & rare_cluster

    table = do_select(strata, tmp_path / "sel.parquet", tiny_proxy_dir, method="slap")
    kept = np.zeros(len(rows), dtype=bool)
    kept[kept_rows(table)] = True
    assert kept[is_rare].all()  # all 5 rare rows survive keep 0.4 ...
    assert kept[~is_rare].sum() == round(0.4 * 65) - 5  # ... and the big topic pays for it
    # Proportional allocation, for contrast, gives the rare topic less than its whole self.
    prop = do_select(strata, tmp_path / "prop.parquet", tiny_proxy_dir, method="stratified",
                     allocation="proportional")
    assert is_rare[kept_rows(prop)].sum() < 5


@pytest.mark.parametrize("method", method_names())
def test_duplicates_never_both_kept(tmp_path, mixed, tiny_proxy_dir, method):
    emb_hashes = pq.read_table(mixed.embeddings)["content_hash"].to_pylist()
    groups: dict[str, list[int]] = {}
    for row, h in enumerate(emb_hashes):
        groups.setdefault(h, []).append(row)
    dup_groups = [g for g in groups.values() if len(g) > 1]
    assert sorted(len(g) for g in dup_groups) == [2, 3]
    for keep in ("1.0", "0.5"):
        sel = tmp_path / f"sel-{keep}.parquet"
        r = invoke(["select", mixed.strata, "-o", sel, "--method", method, "--keep", keep,
                    "--proxy-model", tiny_proxy_dir, "--proj-dim", "64", "-q", *target_for(method, mixed)])
        assert r.exit_code == 0, r.stderr
        table = pq.read_table(sel)
        kept = dict(zip(table["row"].to_pylist(), table["kept"].to_pylist(), strict=True))
        reason = dict(zip(table["row"].to_pylist(), table["reason"].to_pylist(), strict=True))
        for g in dup_groups:
            assert sum(kept[r] for r in g) <= 1, (keep, g)
            assert all(reason[r] == "duplicate" and not kept[r] for r in g[1:])
            if keep == "1.0":
                assert kept[g[0]]  # at keep 1.0 one copy (the first) is kept


A_WORDS = ["def", "total", "numbers", "result", "return", "for", "in", "printf", "int", "SELECT", "FROM", "WHERE"]
B_WORDS = ["the", "cat", "sleeps", "on", "warm", "window", "sill", "chat", "dort", "sur", "le", "rebord"]

@pytest.fixture()
def two_domains(tmp_path, tiny_encoder_dir, tiny_proxy_dir):
    """40 rows of domain A words and 40 of domain B, one stratum (1 cluster, no loss bins): the budget split
    cannot force the domain shares, only the replay's scores can."""
    rows = vocab_rows(A_WORDS, 40, seed=1, tag="a") + vocab_rows(B_WORDS, 40, seed=2, tag="b")
    random.Random(3).shuffle(rows)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    emb = do_embed(data, tmp_path / "e.parquet", tiny_encoder_dir, tiny_proxy_dir)
    strata = do_stratify(emb, tmp_path / "s.parquet", tiny_proxy_dir, clusters=1, loss_bins=1, proxy_loss=False,
                         keep=0.5)
    is_a = np.array([r["id"].startswith("a") for r in rows])
    target_a = write_jsonl(tmp_path / "target_a.jsonl", vocab_rows(A_WORDS, 16, seed=10, tag="ta"))
    target_b = write_jsonl(tmp_path / "target_b.jsonl", vocab_rows(B_WORDS, 16, seed=11, tag="tb"))
    return strata, is_a, target_a, target_b


def test_target_shifts_selection_toward_its_domain(tmp_path, tiny_proxy_dir, two_domains):
    strata, is_a, target_a, target_b = two_domains
    share = {}
    for name, target in (("A", target_a), ("B", target_b)):
        shares = []
        for seed in (0, 1):
            table = do_select(strata, tmp_path / f"sel-{name}-{seed}.parquet", tiny_proxy_dir, method="slap",
                              target=str(target), diversity=0.0, seed=seed)
            kept = kept_rows(table)
            assert len(kept) == 40
            shares.append(is_a[kept].mean())
        share[name] = float(np.mean(shares))
    assert share["A"] > share["B"], share


def test_scores_decide_which_rows_are_kept(tmp_path, tiny_proxy_dir, two_domains):
    """Same seed, same strata: the replay (and the diversity-only method) must not keep exactly the rows that
    uniform sampling inside the strata keeps, or the scores only reorder a set fixed by the seed."""
    strata, *_ = two_domains
    sets = {m: set(kept_rows(do_select(strata, tmp_path / f"{m}.parquet", tiny_proxy_dir, method=m)).tolist())
            for m in STRATA_METHODS}
    assert sets["slap"] != sets["stratified"]
    assert sets["embedding"] != sets["stratified"]


def test_pool_offers_more_candidates_than_the_budget():
    """METHOD.md stage 3.1: each pool holds about c*b unchosen rows. One stratum of 80 rows, budget 40, b = 8,
    c = 4: while 32 unchosen rows remain, every pool must offer 32, so the batches choose among > 40 rows."""
    n, budget, b, pool_size = 80, 40, 8, 32
    pool = StratifiedPool(np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool), np.array([budget]),
                          np.random.default_rng(0))
    offered: set[int] = set()
    sizes = []
    while pool.left > 0:
        candidates = pool.draw(pool_size)
        sizes.append(len(candidates))
        offered |= set(candidates.tolist())
        pool.settle(candidates, list(range(len(candidates) - b, len(candidates))))  # take the last b
    assert sizes == [pool_size] * (budget // b)
    assert len(offered) > budget


def test_same_seed_same_selection_other_seed_differs(tmp_path, mixed, tiny_proxy_dir):
    a = do_select(mixed.strata, tmp_path / "a.parquet", tiny_proxy_dir, method="slap")
    b = do_select(mixed.strata, tmp_path / "b.parquet", tiny_proxy_dir, method="slap")
    c = do_select(mixed.strata, tmp_path / "c.parquet", tiny_proxy_dir, method="slap", seed=7)
    assert a.equals(b)

    def by_order(t: pa.Table) -> list[int]:
        return [r for _, r in sorted((o, r) for o, r in zip(t["order"].to_pylist(), t["row"].to_pylist(),
                                                              strict=True) if o is not None)]

    assert by_order(a) != by_order(c)


def test_same_seed_same_bytes(tmp_path, mixed, tiny_proxy_dir):
    do_select(mixed.strata, tmp_path / "a.parquet", tiny_proxy_dir, method="slap")
    do_select(mixed.strata, tmp_path / "b.parquet", tiny_proxy_dir, method="slap")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_selection_artifact_explains_every_row(tmp_path, mixed, tiny_proxy_dir):
    strata = do_stratify(mixed.embeddings, tmp_path / "s.parquet", tiny_proxy_dir, clusters=4, loss_bins=3,
                         keep=0.5, prune_hardest=0.1)
    table = do_select(strata, tmp_path / "sel.parquet", tiny_proxy_dir, method="slap")
    st = pq.read_table(strata)
    n = len(mixed.rows)
    cols = {k: table[k].to_pylist() for k in table.column_names}
    assert sorted(cols["row"]) == list(range(n))  # every input row exactly once
    assert cols["row"] == st["row"].to_pylist() and cols["stratum"] == st["stratum"].to_pylist()
    pruned = st["pruned"].to_pylist()
    assert pruned.count("duplicate") == 3 and pruned.count("hardest") > 0
    n_kept = sum(cols["kept"])
    assert n_kept == read_meta(str(tmp_path / "sel.parquet")).stats["budget"] > 0
    assert sorted(o for o in cols["order"] if o is not None) == list(range(n_kept))
    terms = ("order", "step", "batch", "loss", "first_order", "curvature", "diversity", "gain")
    for i in range(n):
        kept, reason = cols["kept"][i], cols["reason"][i]
        assert (reason == "selected") == kept, i
        if pruned[i] is not None:
            assert reason == pruned[i] and not kept, i
        elif not kept:
            assert reason == "budget", i
        for k in terms:
            assert (cols[k][i] is not None) == kept, (i, k)
        if kept:
            assert all(np.isfinite(cols[k][i]) for k in terms), i
            assert np.isclose(cols["gain"][i], cols["first_order"][i] - cols["curvature"][i] + cols["diversity"][i],
                              rtol=1e-3, atol=1e-6), i


def test_duplicates_are_found_across_row_groups() -> None:
    # Real embeddings artifacts hold many row groups, so the hash column arrives as several chunks.
    import pyarrow as pa

    from slapcli.stages.stratify import first_occurrence

    hashes = pa.chunked_array([["a", "b", "c"], ["d", "a", "e"], ["b", "f", "d"]])
    assert first_occurrence(hashes).tolist() == [0, 1, 2, 3, 0, 5, 1, 7, 3]
