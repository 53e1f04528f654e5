"""The --target dev file's share per cluster (slapcli.target), against a naive count."""

from __future__ import annotations

import numpy as np

from slapcli.target import target_cluster_share


def test_each_dev_row_counts_for_the_cluster_of_its_nearest_eligible_row() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 5)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cluster = rng.integers(0, 4, 50)
    eligible = rng.random(50) > 0.3
    dev = emb[[1, 2, 3, 40]] + 0.01
    share = target_cluster_share(dev, emb, cluster, eligible)
    expected = np.zeros(4)
    for d in dev:
        best = max((i for i in range(50) if eligible[i]), key=lambda i, d=d: float(d @ emb[i]))
        expected[cluster[best]] += 1
    np.testing.assert_allclose(share, expected / expected.sum())
    assert target_cluster_share(dev, emb, cluster, np.zeros(50, dtype=bool)).sum() == 0
