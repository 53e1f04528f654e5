"""The baselines `slap` must beat (issue 4), as pure functions over per-row scores.

Each takes the rows' scores and an eligibility mask (duplicates and --prune-hardest rows are not eligible)
and returns the chosen positions in selection order, so `select` writes every method's choice into the
same artifact:

- `ccs`: Coverage-centric Coreset Selection (Zheng et al., ICLR 2023): equal-width bins of the proxy loss,
  the budget water-filled over the bins, uniform random rows inside each bin. Strata over loss only.
- `kcenter`: greedy k-center on the sentence embeddings over the whole data set (Sener & Savarese, 2018).
- `loss`: the middle of the loss distribution: drop the easiest and the hardest rows in equal numbers.
- `nearest`: with a --target dev set, the pool rows nearest to its rows in embedding space (round-robin).
- `ifd`: Instruction-Following Difficulty (Li et al., 2024, "From Quantity to Quality"): the response loss
  with the prompt over the response loss without it; keep the highest. Rows with IFD >= 1 (the prompt does
  not help predict the response: misaligned pairs, the paper drops them) come last, lowest first.
"""

from __future__ import annotations

import numpy as np

from slapcli.slapmath import allocate_budget, farthest_point_order

CCS_BINS = 50  # the CCS paper's default number of score strata


def ccs_order(loss: np.ndarray, eligible: np.ndarray, m: int, rng: np.random.Generator,
              n_bins: int = CCS_BINS) -> np.ndarray:
    """Water-fill `m` rows over equal-width loss bins, uniform random inside each; shuffled across bins."""
    positions = np.flatnonzero(eligible)
    if len(positions) == 0 or m == 0:
        return np.zeros(0, dtype=np.int64)
    values = loss[positions]
    lo, hi = float(values.min()), float(values.max())
    edges = np.linspace(lo, hi, n_bins + 1)[1:-1]
    bins = np.searchsorted(edges, values, side="right")  # 0..n_bins-1, the maximum lands in the last bin
    budgets = allocate_budget(np.bincount(bins, minlength=n_bins), m, "waterfill")
    chosen = [rng.permutation(positions[bins == b])[:budgets[b]] for b in range(n_bins) if budgets[b]]
    picked = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    return picked[rng.permutation(len(picked))]


def middle_loss_order(loss: np.ndarray, eligible: np.ndarray, m: int) -> np.ndarray:
    """The `m` eligible rows in the middle of the loss ranking (ties by position), in ascending loss order."""
    positions = np.flatnonzero(eligible)
    ranked = positions[np.argsort(loss[positions], kind="stable")]
    m = min(m, len(ranked))
    start = (len(ranked) - m) // 2
    return ranked[start:start + m]


def ifd_scores(loss_with_prompt: np.ndarray, loss_without_prompt: np.ndarray) -> np.ndarray:
    """IFD = L(response | prompt) / L(response); NaN where the direct loss is 0 (the ratio is undefined)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = loss_with_prompt / loss_without_prompt
    return np.where(loss_without_prompt > 0, ratio, np.nan).astype(np.float32)


def ifd_order(ifd: np.ndarray, eligible: np.ndarray, m: int) -> np.ndarray:
    """Highest IFD below 1 first; then IFD >= 1 lowest first; undefined IFD last (ties by position)."""
    positions = np.flatnonzero(eligible)
    values = ifd[positions].astype(np.float64)
    group = np.where(np.isnan(values), 2, np.where(values >= 1.0, 1, 0))
    key = np.where(group == 0, -values, np.where(group == 1, values, 0.0))
    order = np.lexsort((positions, key, group))
    return positions[order][:m]


def kcenter_order(embeddings: np.ndarray, eligible: np.ndarray, m: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Greedy k-center over all eligible rows from a seeded random start; (positions, gap to earlier picks)."""
    positions = np.flatnonzero(eligible)
    if len(positions) == 0 or m == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    picks, gaps = farthest_point_order(embeddings[positions], m, int(rng.integers(len(positions))))
    return positions[picks], np.array(gaps, dtype=np.float32)


def nearest_order(target_emb: np.ndarray, embeddings: np.ndarray, eligible: np.ndarray, m: int) -> np.ndarray:
    """The `nearest` baseline for a --target dev set: round-robin over the dev rows, each taking its most similar
    (cosine) eligible pool row not taken yet, until `m` rows. Round-robin, not the top rows by best similarity, so
    every dev row gets its neighbours and one dense region of the dev set does not take the whole budget."""
    positions = np.flatnonzero(eligible)
    m = min(m, len(positions))
    if m == 0 or len(target_emb) == 0:
        return np.zeros(0, dtype=np.int64)
    sims = target_emb.astype(np.float32) @ embeddings[positions].astype(np.float32).T
    ranked = np.argsort(-sims, axis=1, kind="stable")  # per dev row, pool positions best first
    taken = np.zeros(len(positions), dtype=bool)
    cursor = np.zeros(len(target_emb), dtype=np.int64)
    picks: list[int] = []
    while len(picks) < m:
        for t in range(len(target_emb)):
            while taken[ranked[t, cursor[t]]]:
                cursor[t] += 1
            j = ranked[t, cursor[t]]
            taken[j] = True
            picks.append(int(positions[j]))
            if len(picks) == m:
                break
    return np.array(picks, dtype=np.int64)


def max_similarity_order(target_emb: np.ndarray, embeddings: np.ndarray, eligible: np.ndarray, m: int) -> np.ndarray:
    """The `m` eligible pool positions with the highest best cosine to any dev row, best first (ties by position).

    LESS's max over target rows: a row close to one dev row ranks high, and a dev row whose neighbours are all
    far (an odd one, or one of another domain) brings in no rows of its own, as it does round-robin."""
    positions = np.flatnonzero(eligible)
    m = min(m, len(positions))
    if m == 0 or len(target_emb) == 0:
        return np.zeros(0, dtype=np.int64)
    best = (target_emb.astype(np.float32) @ embeddings[positions].astype(np.float32).T).max(axis=0)
    return positions[np.argsort(-best, kind="stable")[:m]].astype(np.int64)


# The dev-vs-pool classifier: an L2-penalised logistic regression fitted by full-batch gradient descent from zero
# (deterministic, no solver dependency), on at most CLASSIFIER_MAX_POOL pool rows (a seeded sample beyond that:
# 384-d embeddings need no more to place a hyperplane, and scoring every row is one product).
CLASSIFIER_STEPS = 500
CLASSIFIER_LR = 0.5
CLASSIFIER_L2 = 1e-3
CLASSIFIER_MAX_POOL = 50_000


def dev_vs_pool_direction(target_emb: np.ndarray, pool_emb: np.ndarray) -> tuple[np.ndarray, float]:
    """(w, b) of a logistic regression telling dev rows (1) from pool rows (0), the two classes weighted equally.

    The pool holds the target's kind of rows too, so this is not a domain classifier: it learns what sets the dev
    rows apart from the pool as a whole (their template, their vocabulary), the importance-weighting view of
    targeted selection (DSIR, Xie et al. 2023; GPT-3's quality filter), where `nearest` asks only what each dev row
    resembles, which can be a row of another domain that shares its words."""
    x = np.vstack([target_emb, pool_emb]).astype(np.float64)
    y = np.r_[np.ones(len(target_emb)), np.zeros(len(pool_emb))]
    weight = np.where(y == 1, 0.5 / len(target_emb), 0.5 / len(pool_emb))  # each class half the loss
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(CLASSIFIER_STEPS):
        z = np.clip(x @ w + b, -30.0, 30.0)
        g = weight * (1.0 / (1.0 + np.exp(-z)) - y)
        w -= CLASSIFIER_LR * (x.T @ g + CLASSIFIER_L2 * w)
        b -= CLASSIFIER_LR * float(g.sum())
    return w, b


def classifier_order(target_emb: np.ndarray, embeddings: np.ndarray, eligible: np.ndarray, m: int) -> np.ndarray:
    """The `m` eligible pool positions the dev-vs-pool classifier scores most dev-like, best first (ties by
    position)."""
    positions = np.flatnonzero(eligible)
    m = min(m, len(positions))
    if m == 0 or len(target_emb) == 0:
        return np.zeros(0, dtype=np.int64)
    fit = positions
    if len(fit) > CLASSIFIER_MAX_POOL:
        fit = np.sort(np.random.default_rng(0).choice(positions, CLASSIFIER_MAX_POOL, replace=False))
    w, b = dev_vs_pool_direction(target_emb, embeddings[fit])
    score = embeddings[positions].astype(np.float64) @ w + b
    return positions[np.argsort(-score, kind="stable")[:m]].astype(np.int64)


def target_ranked(ranking: str, target_emb: np.ndarray, embeddings: np.ndarray, eligible: np.ndarray,
                  m: int) -> np.ndarray:
    """`m` eligible positions nearest the dev rows, best first, by `ranking` (config.TARGET_RANKINGS)."""
    if ranking == "max":
        return max_similarity_order(target_emb, embeddings, eligible, m)
    if ranking == "classifier":
        return classifier_order(target_emb, embeddings, eligible, m)
    if ranking == "round-robin":
        return nearest_order(target_emb, embeddings, eligible, m)
    raise ValueError(f"unknown target ranking {ranking!r}")
