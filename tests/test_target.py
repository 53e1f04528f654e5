"""With --target, slap's candidates and stratum budgets (select.target_scope), against a naive reference."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from slapcli.methods.base import SelectConfig
from slapcli.stages.select import target_scope


def naive_round_robin(dev: np.ndarray, emb: np.ndarray, eligible: np.ndarray, k: int) -> list[int]:
    taken: list[int] = []
    while len(taken) < k:
        for d in dev:
            free = [i for i in range(len(emb)) if eligible[i] and i not in taken]
            taken.append(max(free, key=lambda i, d=d: (float(d @ emb[i]), -i)))
            if len(taken) == k:
                break
    return taken


@pytest.mark.parametrize(("m", "factor"), [(6, 2.0), (10, 1.0), (30, 2.0)])
def test_candidates_are_the_nearest_rows_and_budgets_where_the_first_m_fall(m: int, factor: float) -> None:
    rng = np.random.default_rng(m)
    emb = rng.normal(size=(50, 6)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    stratum = rng.integers(0, 5, 50)
    eligible = rng.random(50) > 0.2
    dev = emb[[3, 17, 29]] + rng.normal(0, 0.05, (3, 6)).astype(np.float32)
    job = SimpleNamespace(eligible=eligible, m=m, budgets=np.zeros(5, dtype=np.int64),
                          config=SelectConfig(target="dev.jsonl", target_candidates=factor),
                          table=pa.table({"stratum": stratum}), target_embeddings=lambda: dev,
                          embeddings=lambda: emb)
    scope, budgets = target_scope(job)
    ranked = naive_round_robin(dev, emb, eligible, min(int(np.ceil(factor * m)), int(eligible.sum())))
    assert sorted(np.flatnonzero(scope).tolist()) == sorted(ranked)
    assert not (scope & ~eligible).any()
    np.testing.assert_array_equal(budgets, np.bincount(stratum[ranked[:m]], minlength=5))
    assert budgets.sum() == min(m, eligible.sum())
    # every stratum can fill its budget from its candidates
    assert (budgets <= np.bincount(stratum[scope], minlength=5)).all()


def test_max_ranking_takes_the_rows_nearest_any_dev_row_and_budgets_follow_them() -> None:
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(50, 6)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    stratum = rng.integers(0, 5, 50)
    eligible = rng.random(50) > 0.2
    dev = emb[[3, 17, 29]] + rng.normal(0, 0.05, (3, 6)).astype(np.float32)
    m = 8
    job = SimpleNamespace(eligible=eligible, m=m, budgets=np.zeros(5, dtype=np.int64),
                          config=SelectConfig(target="dev.jsonl", target_ranking="max"),
                          table=pa.table({"stratum": stratum}), target_embeddings=lambda: dev,
                          embeddings=lambda: emb)
    scope, budgets = target_scope(job)
    best = {i: max(float(d @ emb[i]) for d in dev) for i in range(50) if eligible[i]}
    ranked = sorted(best, key=lambda i: (-best[i], i))[: 2 * m]
    assert sorted(np.flatnonzero(scope).tolist()) == sorted(ranked)
    np.testing.assert_array_equal(budgets, np.bincount(stratum[ranked[:m]], minlength=5))
