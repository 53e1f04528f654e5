"""The numbers behind each figure and table of the report, as pure functions of arrays (tested one by one)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

QUANTILES = (0.1, 0.5, 0.9, 0.99)


@dataclass(frozen=True)
class GroupShare:
    """Kept share per group (cluster, loss bin): only groups that have rows."""

    group: np.ndarray  # group ids, ascending
    rows: np.ndarray
    kept: np.ndarray
    share: np.ndarray  # kept / rows


def kept_share(groups: np.ndarray, kept: np.ndarray) -> GroupShare:
    groups = np.asarray(groups, dtype=np.int64)
    kept = np.asarray(kept, dtype=bool)
    ids, inverse = np.unique(groups, return_inverse=True)
    rows = np.bincount(inverse, minlength=len(ids))
    kept_per = np.bincount(inverse, weights=kept, minlength=len(ids)).astype(np.int64)
    return GroupShare(ids, rows, kept_per, kept_per / np.maximum(rows, 1))


@dataclass(frozen=True)
class Spread:
    """count, mean and quantiles of the finite values of one group."""

    count: int
    mean: float
    quantiles: dict[str, float]  # "p10", "p50", ..., "max" (NaN when count is 0)


def spread(values: np.ndarray) -> Spread:
    v = _finite(values)
    return Spread(len(v), float(v.mean()) if len(v) else float("nan"), quantiles(v))


def _finite(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return v[np.isfinite(v)]


def _q(q: float) -> str:
    return f"p{round(q * 100):d}"


def split_by_kept(values: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The finite values of kept rows and of pruned rows."""
    v = np.asarray(values, dtype=np.float64)
    kept = np.asarray(kept, dtype=bool)
    finite = np.isfinite(v)
    return v[kept & finite], v[~kept & finite]


@dataclass(frozen=True)
class StepCurve:
    """The replay's proxy loss over its steps: per step the mean loss of the rows it chose."""

    step: np.ndarray
    mean_loss: np.ndarray
    rows: np.ndarray  # rows chosen at that step with a loss


def loss_by_step(step: np.ndarray, loss: np.ndarray) -> StepCurve:
    """`step` and `loss` are the selection artifact's columns (NaN / negative where missing)."""
    s = np.asarray(step, dtype=np.float64)
    v = np.asarray(loss, dtype=np.float64)
    ok = np.isfinite(s) & np.isfinite(v) & (s >= 0)
    ids, inverse = np.unique(s[ok].astype(np.int64), return_inverse=True)
    rows = np.bincount(inverse, minlength=len(ids))
    sums = np.bincount(inverse, weights=v[ok], minlength=len(ids))
    return StepCurve(ids, sums / np.maximum(rows, 1), rows)


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` points (shorter at the start), to read a noisy curve."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return v
    c = np.concatenate([[0.0], np.cumsum(v)])
    ends = np.arange(1, len(v) + 1)
    starts = np.maximum(ends - window, 0)
    return (c[ends] - c[starts]) / (ends - starts)


def pca_2d(x: np.ndarray) -> np.ndarray:
    """The first two principal components of the rows of x ([n, 2]; zeros where x has fewer dimensions).

    Signs are fixed (each component's largest-magnitude loading positive) so the same data always draws the
    same map.
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros((len(x), 2))
    if len(x) < 2:
        return out
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(2, vt.shape[0])
    components = vt[:k]
    signs = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
    out[:, :k] = centred @ (components * signs[:, None]).T
    return out


def sample_positions(n: int, limit: int, seed: int) -> np.ndarray:
    """At most `limit` positions out of n, sorted, the same for the same seed (the map of a huge pool)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def examples_per_reason(reason: np.ndarray, kept: np.ndarray, n: int, seed: int) -> dict[str, np.ndarray]:
    """Up to n positions of pruned rows for each pruning reason, drawn with `seed`, sorted.

    Each reason draws from its own stream (seed and the reason's name), so one reason's examples do not change
    when another reason appears or disappears.
    """
    reason = np.asarray(reason, dtype=object)
    kept = np.asarray(kept, dtype=bool)
    out = {}
    for r in sorted({str(x) for x in reason[~kept]}):
        pos = np.flatnonzero((reason == r) & ~kept)
        rng = np.random.default_rng([seed, zlib.crc32(r.encode())])
        out[r] = np.sort(rng.choice(pos, size=min(n, len(pos)), replace=False))
    return out


def most_and_least_valuable(gain: np.ndarray, kept: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Kept rows with the highest and the lowest marginal gain (positions; best first, then worst first).

    The two lists do not overlap: with fewer than 2n scored rows the lower half goes to the least valuable.
    """
    g = np.asarray(gain, dtype=np.float64)
    scored = np.flatnonzero(np.asarray(kept, dtype=bool) & np.isfinite(g))
    order = scored[np.argsort(-g[scored], kind="stable")]
    top = min(n, (len(order) + 1) // 2)
    bottom = min(n, len(order) - top)
    return order[:top], order[::-1][:bottom]


def quantiles(values: np.ndarray, qs: tuple[float, ...] = QUANTILES) -> dict[str, float]:
    """Quantiles of the finite values plus their max, keyed p10 ... max (NaN when none)."""
    v = _finite(values)
    if len(v) == 0:
        return {**{_q(q): float("nan") for q in qs}, "max": float("nan")}
    return {**{_q(q): float(np.quantile(v, q)) for q in qs}, "max": float(v.max())}
