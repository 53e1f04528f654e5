"""The simple methods: random rows, random rows inside each stratum, and the strata with embedding diversity."""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from slapcli.methods.base import (
    MethodResult,
    Selection,
    SelectionJob,
    members_by_stratum,
    ranked_selection,
    stratum_scales,
)
from slapcli.methods.pool import StratifiedPool
from slapcli.slapmath import farthest_point_order


def select_random(job: SelectionJob) -> MethodResult:
    """Uniform random rows, strata ignored: the floor every method must beat."""
    eligible = job.eligible
    return MethodResult(Selection.plain(job.rng.choice(np.flatnonzero(eligible), size=min(job.m, int(eligible.sum())),
                                                       replace=False)))


def select_stratified(job: SelectionJob) -> MethodResult:
    """Uniform random rows inside each stratum, up to its budget (the pool's seeded order), shuffled across strata."""
    pool = StratifiedPool(job.stratum, job.eligible, job.budgets, job.rng)
    chosen = [list(pool.queues[s])[:int(pool.remaining[s])] for s in np.flatnonzero(pool.remaining).tolist()]
    positions = np.array([pos for part in chosen for pos in part], dtype=np.int64)
    return MethodResult(Selection.plain(positions[job.rng.permutation(len(positions))]))


def select_embedding(job: SelectionJob) -> MethodResult:
    """Strata + relative-distance diversity, no proxy: inside each stratum, greedy k-center from its most
    typical row (nearest the cluster centroid), so the kept rows are as far apart as the budget allows.

    Rows are then ordered round-robin over strata by pick rank and cut into batches of --batch-size, so every
    batch mixes strata. `diversity` records each row's gap to the rows picked before it in its stratum,
    relative to the stratum's typical nearest-neighbour distance (clipped like the replay's term). This is
    the mode for data sets too large for a proxy pass (see `farthest_point_order` for its cost).
    """
    embeddings = job.embeddings()
    scales = stratum_scales(job, embeddings)
    centroid_distance = job.table["centroid_distance"].to_numpy()
    budgets, config = job.budgets, job.config
    members_of = members_by_stratum(job.stratum, job.eligible)
    positions, ranks, strata_of, gaps = [], [], [], []
    # One BLAS thread: the products are small (stratum x 128 x dim), so threads add no speed, and their
    # spin-waiting made select 4x slower (186 s vs 43 s for 1M rows) when other work shared the 2 cores.
    with job.reporter.progress("select (embedding)", int(budgets.sum())) as bar, threadpool_limits(1, "blas"):
        for s, members in members_of.items():
            if budgets[s] == 0:
                continue
            picks, gap = farthest_point_order(embeddings[members], int(budgets[s]),
                                              int(np.argmin(centroid_distance[members])))
            positions.append(members[picks])
            ranks.append(np.arange(len(picks)))
            strata_of.append(np.full(len(picks), s))
            gaps.append(np.minimum(np.array(gap) / float(scales[members[0]]), config.diversity_clip))
            bar.update(advance=len(picks))
    if not positions:
        return MethodResult(Selection.plain(np.zeros(0, dtype=np.int64)))
    order = np.lexsort((np.concatenate(strata_of), np.concatenate(ranks)))  # by rank, then stratum
    return MethodResult(ranked_selection(np.concatenate(positions)[order], config.batch_size,
                                         {"diversity": np.concatenate(gaps)[order]}))
