"""Nearest neighbours by cosine on unit-norm embeddings (faiss, exact inner product) and duplicate groups."""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np

# Rows per faiss query block: a range search keeps every hit of a block in memory at once.
QUERY_BLOCK = 8192
# Up to this many rows the search is exact (a flat index: n^2 d products, ~20 s for 50,000 rows of 384 dims on
# one core); above it, an inverted-file index over sqrt(n) k-means lists probed NPROBE at a time. Its scores are
# still exact inner products, so it never reports a pair below the threshold; it can miss a pair whose rows fall
# in lists that are not probed.
EXACT_ROWS = 50_000
NPROBE = 16


def _index(x: np.ndarray) -> faiss.Index:
    """An inner-product index over the rows of x (exact up to EXACT_ROWS rows, IVF above)."""
    d = x.shape[1]
    if len(x) <= EXACT_ROWS:
        index = faiss.IndexFlatIP(d)
    else:
        lists = int(np.sqrt(len(x)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 0  # the same lists, hence the same answers, on every run
        sample = x[np.random.default_rng(0).choice(len(x), size=min(len(x), 64 * lists), replace=False)]
        index.train(sample)
        index.nprobe = NPROBE
    index.add(x)
    return index


def nearest_neighbour_cosine(embeddings: np.ndarray) -> np.ndarray:
    """Per row, the cosine to its most similar *other* row (NaN with fewer than 2 rows).

    Exact duplicates have equal vectors, so a row's own index need not come back first among equal scores:
    two neighbours are asked for and the row itself is dropped wherever it lands.
    """
    n = len(embeddings)
    out = np.full(n, np.nan, dtype=np.float32)
    if n < 2:
        return out
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = _index(x)
    for start in range(0, n, QUERY_BLOCK):
        scores, ids = index.search(x[start:start + QUERY_BLOCK], 2)
        own = np.arange(start, start + len(ids))[:, None]
        scores = np.where((ids == own) | (ids < 0), -np.inf, scores)  # -1: fewer hits in the probed lists
        out[start:start + len(ids)] = scores.max(axis=1)
    out[np.isneginf(out)] = np.nan
    return out


def cosine_pairs(embeddings: np.ndarray, threshold: float) -> np.ndarray:
    """All pairs (i < j) with cosine >= threshold, as an [m, 2] int64 array."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if len(x) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    index = _index(x)
    pairs = []
    # faiss keeps hits strictly above the radius; nextafter makes the threshold inclusive.
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
    for start in range(0, len(x), QUERY_BLOCK):
        lims, _scores, ids = index.range_search(x[start:start + QUERY_BLOCK], radius)
        query = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims).astype(np.int64))
        keep = query < ids
        pairs.append(np.stack([query[keep], ids[keep].astype(np.int64)], axis=1))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)


def connected_groups(n: int, pairs: np.ndarray) -> list[np.ndarray]:
    """Connected components of the graph on n nodes with `pairs` as edges, size >= 2, largest first
    (ties by smallest member), each sorted."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    for a, b in pairs:
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(i) for i in range(n)], dtype=np.int64)
    return _groups_from_labels(roots)


def exact_duplicate_groups(hashes: Sequence[str] | np.ndarray) -> list[np.ndarray]:
    """Positions that share a content hash, groups of 2 or more, largest first."""
    _, labels = np.unique(np.asarray(hashes, dtype=object).astype(str), return_inverse=True)
    return _groups_from_labels(labels.reshape(-1))


def near_duplicate_groups(embeddings: np.ndarray, threshold: float,
                          candidates: np.ndarray | None = None) -> list[np.ndarray]:
    """Rows linked by cosine >= threshold (chains included), largest group first, as positions into
    `embeddings`. `candidates` (a boolean mask) limits the search, e.g. to one row per exact duplicate group so
    that near duplicates are rows that differ in text."""
    pos = np.arange(len(embeddings)) if candidates is None else np.flatnonzero(candidates)
    groups = connected_groups(len(pos), cosine_pairs(embeddings[pos], threshold))
    return [pos[g] for g in groups]


def _groups_from_labels(labels: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    groups = [g for g in np.split(order, bounds) if len(g) >= 2]
    return sorted((np.sort(g) for g in groups), key=lambda g: (-len(g), int(g[0])))
