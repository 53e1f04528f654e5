"""The baseline selectors against from-scratch references on random inputs."""

from __future__ import annotations

import numpy as np
import pytest

from slapcli.baselines import (
    ccs_order,
    ifd_order,
    ifd_scores,
    kcenter_order,
    middle_loss_order,
)
from slapcli.io.layouts import Example, Turn
from slapcli.screen import without_prompt  # the prompt-free view moved to the damage screen, which shares it


def _eligible(n: int, rng: np.random.Generator) -> np.ndarray:
    mask = rng.random(n) > 0.2
    mask[0] = True
    return mask


@pytest.mark.parametrize("seed", range(5))
def test_ccs_water_fills_equal_width_loss_bins(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, n_bins = 300, 7
    loss = rng.gamma(2.0, size=n).astype(np.float32)
    eligible = _eligible(n, rng)
    m = int(rng.integers(1, int(eligible.sum())))
    picked = ccs_order(loss, eligible, m, np.random.default_rng(0), n_bins=n_bins)
    assert len(picked) == m == len(set(picked.tolist())) and eligible[picked].all()
    # Naive: which bin each eligible row falls in, then water-filling one row at a time to the poorest bin.
    values = loss[eligible]
    width = (values.max() - values.min()) / n_bins
    bin_of = np.minimum(((loss - values.min()) / width).astype(int), n_bins - 1)
    sizes = np.bincount(bin_of[eligible], minlength=n_bins)
    alloc = np.zeros(n_bins, dtype=int)
    for _ in range(m):
        open_bins = [b for b in range(n_bins) if alloc[b] < sizes[b]]
        alloc[min(open_bins, key=lambda b: (alloc[b], -(sizes[b] - alloc[b]), b))] += 1
    got = np.bincount(bin_of[picked], minlength=n_bins)
    assert got.tolist() == alloc.tolist()


def test_ccs_is_seeded() -> None:
    loss = np.random.default_rng(1).random(100).astype(np.float32)
    eligible = np.ones(100, dtype=bool)
    a = ccs_order(loss, eligible, 40, np.random.default_rng(3))
    b = ccs_order(loss, eligible, 40, np.random.default_rng(3))
    c = ccs_order(loss, eligible, 40, np.random.default_rng(4))
    assert a.tolist() == b.tolist() and sorted(a.tolist()) != sorted(c.tolist())


@pytest.mark.parametrize("seed", range(5))
def test_middle_loss_drops_both_ends_equally(seed: int) -> None:
    rng = np.random.default_rng(seed)
    loss = rng.normal(size=101).astype(np.float32)
    eligible = _eligible(101, rng)
    m = int(rng.integers(0, int(eligible.sum()) + 1))
    picked = middle_loss_order(loss, eligible, m)
    ranked = sorted(np.flatnonzero(eligible).tolist(), key=lambda i: (loss[i], i))
    dropped_low = (len(ranked) - m) // 2
    assert picked.tolist() == ranked[dropped_low:dropped_low + m]


def test_ifd_ranks_below_one_first_then_misaligned_then_undefined() -> None:
    with_prompt = np.array([1.0, 2.0, 0.5, 3.0, 1.0, 0.9], dtype=np.float32)
    direct = np.array([2.0, 1.0, 1.0, 4.0, 0.0, 1.0], dtype=np.float32)
    ifd = ifd_scores(with_prompt, direct)
    np.testing.assert_allclose(ifd[:4], [0.5, 2.0, 0.5, 0.75])
    assert np.isnan(ifd[4])
    eligible = np.ones(6, dtype=bool)
    assert ifd_order(ifd, eligible, 6).tolist() == [5, 3, 0, 2, 1, 4]
    assert ifd_order(ifd, eligible, 2).tolist() == [5, 3]
    eligible[3] = False
    assert ifd_order(ifd, eligible, 2).tolist() == [5, 0]


def test_kcenter_covers_all_eligible_rows_and_skips_the_rest() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 8)).astype(np.float32)
    eligible = _eligible(50, rng)
    picked, gaps = kcenter_order(emb, eligible, 10, np.random.default_rng(1))
    assert len(picked) == 10 and eligible[picked].all()
    assert np.isinf(gaps[0]) and np.all(np.diff(gaps[1:]) <= 1e-6)  # k-center gaps never grow
    everything, _ = kcenter_order(emb, eligible, 999, np.random.default_rng(1))
    assert sorted(everything.tolist()) == np.flatnonzero(eligible).tolist()


def test_without_prompt_keeps_assistant_turns() -> None:
    ex = Example((Turn("system", "s"), Turn("user", "q"), Turn("assistant", "a1"), Turn("user", "q2"),
                  Turn("assistant", "a2")))
    assert without_prompt(ex).turns == (Turn("assistant", "a1"), Turn("assistant", "a2"))


def naive_nearest(target: np.ndarray, emb: np.ndarray, eligible: np.ndarray, m: int) -> list[int]:
    taken: set[int] = set()
    picks: list[int] = []
    while len(picks) < min(m, int(eligible.sum())):
        for t in target:
            best = max((i for i in range(len(emb)) if eligible[i] and i not in taken),
                       key=lambda i, t=t: (float(t @ emb[i]), -i))
            taken.add(best)
            picks.append(best)
            if len(picks) == min(m, int(eligible.sum())):
                break
    return picks


@pytest.mark.parametrize("m", [0, 1, 7, 40])
def test_nearest_order_matches_naive_round_robin(m: int) -> None:
    from slapcli.baselines import nearest_order

    rng = np.random.default_rng(m)
    emb = rng.normal(size=(30, 6)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    target = emb[[2, 9, 17]] + rng.normal(scale=0.1, size=(3, 6)).astype(np.float32)
    eligible = rng.random(30) > 0.2
    got = nearest_order(target, emb, eligible, m).tolist()
    assert got == naive_nearest(target, emb, eligible, m)
    assert len(set(got)) == len(got) and all(eligible[g] for g in got)


@pytest.mark.parametrize("m", [0, 1, 7, 40])
def test_max_similarity_order_matches_a_naive_sort(m: int) -> None:
    from slapcli.baselines import max_similarity_order, target_ranked

    rng = np.random.default_rng(m + 100)
    emb = rng.normal(size=(30, 6)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    target = emb[[2, 9, 17]] + rng.normal(scale=0.1, size=(3, 6)).astype(np.float32)
    eligible = rng.random(30) > 0.2
    best = {i: max(float(np.dot(t, emb[i])) for t in target) for i in range(30) if eligible[i]}
    naive = sorted(best, key=lambda i: (-best[i], i))[:m]
    got = max_similarity_order(target, emb, eligible, m).tolist()
    assert got == naive
    assert target_ranked("max", target, emb, eligible, m).tolist() == naive
    assert target_ranked("round-robin", target, emb, eligible, m).tolist() == naive_nearest(target, emb, eligible, m)
    with pytest.raises(ValueError):
        target_ranked("best", target, emb, eligible, m)


def naive_logistic_regression(pos: np.ndarray, neg: np.ndarray, steps: int, lr: float, l2: float):
    """Row by row, the same balanced, L2-penalised full-batch gradient descent."""
    w, b = np.zeros(pos.shape[1]), 0.0
    rows = [(x, 1.0, 0.5 / len(pos)) for x in pos] + [(x, 0.0, 0.5 / len(neg)) for x in neg]
    for _ in range(steps):
        gw, gb = l2 * w, 0.0
        for x, y, weight in rows:
            z = min(max(float(x @ w) + b, -30.0), 30.0)
            g = weight * (1.0 / (1.0 + np.exp(-z)) - y)
            gw = gw + g * x
            gb += g
        w, b = w - lr * gw, b - lr * gb
    return w, b


def test_dev_vs_pool_direction_matches_a_naive_fit() -> None:
    from slapcli.baselines import CLASSIFIER_L2, CLASSIFIER_LR, dev_vs_pool_direction

    rng = np.random.default_rng(5)
    pool, dev = rng.normal(size=(12, 4)), rng.normal(loc=0.5, size=(3, 4))
    w, b = dev_vs_pool_direction(dev, pool)
    nw, nb = naive_logistic_regression(dev, pool, 500, CLASSIFIER_LR, CLASSIFIER_L2)
    np.testing.assert_allclose(w, nw, rtol=1e-9, atol=1e-12)
    assert b == pytest.approx(nb)


@pytest.mark.parametrize("m", [0, 5, 40])
def test_classifier_order_ranks_by_the_fitted_score_and_takes_the_dev_kind_first(m: int) -> None:
    # Two kinds of rows (the first axis: +1 or -1) on all sorts of topics (8 other axes); the dev rows are of kind A
    # on topics of their own, so what sets them apart from the pool is their kind.
    from slapcli.baselines import classifier_order, dev_vs_pool_direction, target_ranked

    rng = np.random.default_rng(m)

    def rows(kind: float, n: int) -> np.ndarray:
        topics = rng.normal(size=(n, 8))
        out = np.c_[np.full(n, kind), topics / np.linalg.norm(topics, axis=1, keepdims=True)]
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)

    pool, dev = np.vstack([rows(1.0, 10), rows(-1.0, 10)]), rows(1.0, 16)
    eligible = np.ones(20, dtype=bool)
    eligible[3] = False
    got = classifier_order(dev, pool, eligible, m)
    assert len(got) == min(m, 19) and all(eligible[g] for g in got) and len(set(got.tolist())) == len(got)
    assert set(got[:9].tolist()) <= set(range(10))  # the 9 eligible kind-A rows come first
    w, b = dev_vs_pool_direction(dev, pool[eligible])
    score = {i: float(pool[i].astype(np.float64) @ w + b) for i in range(20) if eligible[i]}
    assert got.tolist() == sorted(score, key=lambda i: (-score[i], i))[:m]
    assert target_ranked("classifier", dev, pool, eligible, m).tolist() == got.tolist()
