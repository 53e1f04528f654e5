"""The damage screen through stratify and select (issue 17), on tiny models with controlled proxy signals.

A tiny random proxy's losses mean nothing, so the loss passes are replaced by known terms: a few rows get the
signature of a damaged answer (a prompt that does not help, an end the model finds absurd, a second half copied
from the first), and the tests check what the stages do with them: labels and columns in the strata artifact,
the budget never shrunk by the screen, `slap`/`stratified` honouring it and the baselines ignoring it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from slapcli.artifacts import read_meta
from slapcli.progress import Reporter
from slapcli.stages import stratify as stratify_module
from slapcli.stages.embed import EmbedConfig, embed
from slapcli.stages.select import SelectConfig, select
from slapcli.stages.stratify import StratifyConfig, stratify

QUIET = Reporter(quiet=True)
N = 40
IGNORES, CUT, REPEATS = {3, 11}, {5, 20}, {8}
EASY_TAIL = 9  # a second half the proxy finds easy, in words that do not loop: not repetitive


def rows() -> list[dict]:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "tau"]
    out = [{"instruction": f"Task {i}: " + " ".join(rng.choice(words) for _ in range(5)),
            "output": " ".join(rng.choice(words) for _ in range(40))} for i in range(N)]
    for i in REPEATS:  # an answer stuck repeating its opening
        out[i]["output"] = " ".join([" ".join(out[i]["output"].split()[:8])] * 5)
    return out


def fake_terms(meta, src, name, wanted_rows, loss_pass, reporter, view=None, engine=None):
    """Ordinary rows: loss 2, end loss ~1, tail = head; the flagged rows carry one damage signature each."""
    rng = np.random.default_rng(len(wanted_rows) + (view is not None))
    rows_ = wanted_rows.tolist()
    out = np.zeros((len(rows_), 3), dtype=np.float32)
    out[:, 0] = 2.0 + rng.normal(0, 0.05, len(rows_))
    out[:, 1] = 1.0 + rng.normal(0, 0.2, len(rows_))
    out[:, 2] = out[:, 0] * (1 + rng.normal(0, 0.05, len(rows_)))
    if view is not None:  # the answer without its prompt is harder ...
        out[:, 0] += 0.5 + rng.normal(0, 0.05, len(rows_))
        for r in IGNORES & set(rows_):  # ... except where the prompt does not help
            out[rows_.index(r), 0] = 1.9
    else:
        for r in CUT & set(rows_):
            out[rows_.index(r), 1] = 20.0
        for r in (REPEATS | {EASY_TAIL}) & set(rows_):
            out[rows_.index(r), 2] = 0.05
    return out, "fake-proxy"


@pytest.fixture()
def embedded(tmp_path: Path, tiny_encoder_dir: Path, tiny_proxy_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(stratify_module, "cached_proxy_losses", fake_terms)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    emb = tmp_path / "e.parquet"
    embed(str(data), str(emb), EmbedConfig(embed_model=str(tiny_encoder_dir), proxy_model=str(tiny_proxy_dir),
                                           device="cpu"), QUIET)
    return emb


def do_stratify(emb: Path, keep: float, **kwargs) -> pq.ParquetFile:
    out = emb.with_name(f"s{keep}.parquet")
    stratify(str(emb), str(out), StratifyConfig(proxy_model="unused", device="cpu", keep=keep, clusters=3,
                                                near_dup_cosine=0.0, **kwargs), QUIET)
    return pq.read_table(out)


def test_damaged_rows_get_their_reason_and_the_signals_are_recorded(embedded: Path) -> None:
    t = do_stratify(embedded, 0.5)
    pruned = dict(enumerate(t["pruned"].to_pylist()))
    assert {r for r, p in pruned.items() if p == "ignores_prompt"} == IGNORES
    assert {r for r, p in pruned.items() if p == "cut_off"} == CUT
    assert {r for r, p in pruned.items() if p == "repetitive"} == REPEATS
    assert sum(p is None for p in pruned.values()) == N - 5
    score = np.array(t["screen_score"].to_pylist(), dtype=float)
    assert (score[sorted(IGNORES | CUT | REPEATS)] > 3.5).all()
    assert t["direct_loss"].null_count == 0 and t["end_loss"].null_count == 0
    meta = read_meta(str(embedded.with_name("s0.5.parquet")))
    assert sum(s["budget"] for s in meta.extra["strata"]) == N // 2
    assert meta.stats["screened"] == {"ignores_prompt": 2, "cut_off": 2, "repetitive": 1}


def test_the_screen_never_shrinks_the_budget(embedded: Path) -> None:
    t = do_stratify(embedded, 0.95)  # 38 rows wanted, 35 unflagged: the 3 least suspicious come back
    pruned = t["pruned"].to_pylist()
    assert sum(p is None for p in pruned) == 38
    assert sum(p is not None for p in pruned) == 2


def test_no_screen_flags_nothing(embedded: Path) -> None:
    t = do_stratify(embedded, 0.5, screen=False)
    assert t["pruned"].null_count == N and t["direct_loss"].null_count == N


@pytest.mark.parametrize(("method", "honours"), [("stratified", True), ("slap", True), ("random", False)])
def test_slap_and_stratified_honour_the_screen_and_random_does_not(embedded: Path, tiny_proxy_dir: Path,
                                                                   method: str, honours: bool) -> None:
    do_stratify(embedded, 0.5)
    strata = embedded.with_name("s0.5.parquet")
    flagged = sorted(IGNORES | CUT | REPEATS)
    kept_flagged = 0
    for seed in range(3 if not honours else 1):
        out = embedded.with_name(f"sel-{method}-{seed}.parquet")
        select(str(strata), str(out), SelectConfig(method=method, proxy_model=str(tiny_proxy_dir), device="cpu",
                                                   proj_dim=64, seed=seed, keep=0.9), QUIET)
        sel = pq.read_table(out)
        kept = np.array(sel["kept"].to_pylist())
        assert kept.sum() == 36  # the budget holds either way
        reasons = sel["reason"].to_pylist()
        kept_flagged += int(kept[flagged].sum())
        if honours:  # 36 wanted of 35 unflagged: exactly one (the least suspicious) comes back
            assert kept[flagged].sum() == 1
            assert {reasons[r] for r in flagged if not kept[r]} <= {"ignores_prompt", "cut_off", "repetitive"}
    if not honours:
        assert kept_flagged > 3 * 1  # uniform over all 40 rows: ~4.5 of 5 flagged rows kept per seed
