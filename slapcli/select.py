"""Stage 3, select: choose the coreset, batch by batch, and explain every pruned row.

Methods:
- `slap` (default): the proxy-training replay of METHOD.md stage 3 (see `slapcli.replay`).
- `embedding`: the same stratified, batch-wise loop without a proxy: batches are composed by
  relative-distance diversity alone. For data too large for a proxy pass.
- `stratified`: uniform random rows inside each stratum, up to its budget.
- `random`: uniform random rows, strata ignored (the floor every method must beat).
- `ccs`, `kcenter`, `loss`, `ifd`: published baselines (see `slapcli.baselines`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from threadpoolctl import threadpool_limits

from slapcli.artifacts import (
    SELECTION_SCHEMA,
    ArtifactMeta,
    check_upstream,
    read_embeddings,
    read_meta,
    read_table,
    upstream_record,
    write_artifact,
)
from slapcli.baselines import ccs_order, ifd_order, ifd_scores, kcenter_order, middle_loss_order, nearest_order
from slapcli.errors import UsageError
from slapcli.io.readers import file_fingerprint
from slapcli.io.writers import atomic_path
from slapcli.models import DEFAULT_PROXY_MODEL, cache_dir, resolve_model
from slapcli.progress import Reporter
from slapcli.screen import SCREEN_REASONS, restore_order, without_prompt
from slapcli.slapmath import (
    ETA_RULES,
    FEATURE_NORMS,
    allocate_budget,
    farthest_point_order,
    group_positions,
    stratum_nn_scale,
    weighted_budget,
)
from slapcli.source import source_path
from slapcli.stratify import ALLOCATIONS, LossPass, proxy_losses, row_budget
from slapcli.target import embed_target, read_target_examples, target_cluster_share

METHODS = ("slap", "embedding", "stratified", "random", "nearest", "ccs", "kcenter", "loss", "ifd")
BASELINES = ("ccs", "kcenter", "loss", "ifd")  # slapcli.baselines, through select_baseline
LOSS_METHODS = ("slap", "ccs", "loss", "ifd")  # need the proxy losses of `stratify` (no --no-proxy-loss)
# Methods that honour stratify's damage screen and near-duplicate labels. The baselines choose over every row that
# is not an exact duplicate (or a --prune-hardest row), as published, so they stay the yardstick the screen is
# measured against.
SCREENED_METHODS = ("slap", "embedding", "stratified")
SCREEN_LABELS = ("near_duplicate", *SCREEN_REASONS)


@dataclass
class SelectConfig:
    method: str = "slap"
    keep: float | None = None  # None: the budget recorded by `stratify`
    budget: int | None = None
    allocation: str | None = None  # None: the allocation recorded by `stratify`
    seed: int = 0
    batch_size: int = 8  # rows per replay batch (b)
    pool_factor: int = 4  # candidates per batch = pool_factor * batch_size (c)
    diversity: float = 0.1  # gamma: weight of the relative-distance term, in units of the batch's score spread
    diversity_clip: float = 2.0
    # proxy replay (method "slap")
    proxy_model: str = DEFAULT_PROXY_MODEL
    proj_dim: int = 1024
    refresh: int = 4  # replay steps a candidate's gradient feature is reused before it is recomputed
    # Replay steps between recomputations of the target direction under the current proxy. Every 4 steps, as the
    # candidates' features: at 25, the 26-step replay of the quality benchmark computed it at steps 0 and 25 only,
    # so the scores aimed at what the untrained proxy lacked, not at what the trained one still lacks, and slap
    # lost to every random subset (docs/RESULTS.md). Costs ~30% more selection CPU.
    target_refresh: int = 4
    lr: float = 1e-4  # proxy learning rate (AdamW); the score's eta is set by `eta`, in feature units
    trainable_blocks: int = 2  # the last decoder blocks get trained and give the gradient features
    damping: float = 0.1  # curvature damping, relative to the mean curvature
    feature_norm: str = "unit"  # "unit": directions (cosine), "tokens": sqrt(n)-weighted directions, "raw"
    eta: str = "target"  # step of the batch score: "target" (Newton step along g*) or "row" (median per row)
    # Multiplies that step. Above 1 the curvature term weighs more: U(B) then peaks at a batch mean shorter than
    # the target's, i.e. batches whose rows' gradients cancel more (less redundant), below 1 at more aligned ones.
    eta_scale: float = 1.0
    # Weight of each row's log(response tokens / mean) in the batch score, in units of the pool's score spread:
    # inside a stratum, a longer response has more to teach than the one-step score sees (replay.response_content).
    length_prior: float = 0.0
    curvature: bool = True  # False drops the second-order term of the batch score (an ablation)
    max_tokens: int | None = None  # None: the --max-tokens recorded by `embed`
    target: str | None = None  # dev file whose rows define the target direction
    target_rows: int = 64  # reference rows when no --target: a fixed stratified sample of the data
    device: str = "auto"
    checkpoint_seconds: float = 300.0  # how often the replay saves its state beside the output
    resume: bool = True  # continue from a checkpoint written with the same settings and strata
    record_timings: bool = False  # store per-phase wall times in stats (the artifact's bytes then vary)
    embeddings: str | None = None  # override the embeddings path recorded in the strata artifact
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Choice:
    """One chosen row and the terms of the marginal gain that chose it."""

    position: int  # index into the strata table
    step: int
    batch: int
    loss: float | None = None
    first_order: float | None = None
    curvature: float | None = None
    diversity: float | None = None
    gain: float | None = None


@dataclass
class Selection:
    """The chosen rows as columns, in selection order (NaN where a term does not apply).

    Methods that choose hundreds of thousands of rows build these arrays directly; a list of `Choice`
    objects would cost seconds of Python per million rows.
    """

    position: np.ndarray  # int64 index into the strata table
    step: np.ndarray  # int32
    batch: np.ndarray  # int32
    terms: dict[str, np.ndarray] = field(default_factory=dict)  # loss, first_order, ...: float32, NaN = none

    def __len__(self) -> int:
        return len(self.position)

    @classmethod
    def plain(cls, positions: np.ndarray) -> Selection:
        """Rows chosen without a score (random, stratified): no step, batch 0, no terms."""
        zeros = np.zeros(len(positions), dtype=np.int32)
        return cls(np.asarray(positions, dtype=np.int64), zeros, zeros.copy())

    @classmethod
    def from_choices(cls, choices: list[Choice]) -> Selection:
        def column(name: str) -> np.ndarray:
            return np.array([np.nan if (v := getattr(c, name)) is None else v for c in choices], dtype=np.float32)

        return cls(np.array([c.position for c in choices], dtype=np.int64),
                   np.array([c.step for c in choices], dtype=np.int32),
                   np.array([c.batch for c in choices], dtype=np.int32),
                   {name: column(name) for name in TERMS})


TERMS = ("loss", "first_order", "curvature", "diversity", "gain")


class StratifiedPool:
    """Candidate pools drawn across strata in proportion to each stratum's remaining budget.

    A stratum offers up to `oversample` times its remaining budget, so the batch scores, not the draw,
    decide which of its rows are kept; the greedy step caps what it takes from each stratum at the
    remaining budget (`greedy_batch(groups=..., group_caps=...)`), so the budgets hold exactly at the end.
    Unchosen candidates the caller wants to `retain` (their cached features are still fresh) go back to the
    front of their stratum's queue and are offered again next step; the others go to the back, so every
    row of a stratum is eventually offered.
    """

    def __init__(self, stratum: np.ndarray, eligible: np.ndarray, budgets: np.ndarray,
                 rng: np.random.Generator, oversample: int = 4) -> None:
        self.stratum = stratum
        self.eligible = eligible
        self.oversample = oversample
        self.remaining = budgets.astype(np.int64).copy()
        order = rng.permutation(len(stratum))
        by_stratum: list[list[int]] = [[] for _ in range(len(budgets))]
        for pos in order[eligible[order]].tolist():
            by_stratum[stratum[pos]].append(pos)
        self.queues = [deque(q) for q in by_stratum]

    @property
    def left(self) -> int:
        return int(self.remaining.sum())

    def draw(self, size: int) -> np.ndarray:
        available = np.array([len(q) for q in self.queues], dtype=np.int64)
        room = np.minimum(available, self.remaining * self.oversample)
        take = allocate_budget(room, min(size, int(room.sum())), "proportional")
        pool: list[int] = []
        for s in np.flatnonzero(take).tolist():
            queue = self.queues[s]
            pool.extend(queue.popleft() for _ in range(int(take[s])))
        return np.array(pool, dtype=np.int64)

    def caps(self, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(group id per candidate, remaining budget per group) for `greedy_batch`."""
        strata, groups = np.unique(self.stratum[candidates], return_inverse=True)
        return groups, self.remaining[strata]

    def settle(self, pool: np.ndarray, chosen: list[int], retain: set[int] | frozenset[int] = frozenset()) -> None:
        """`chosen` are indices into `pool`; unchosen positions in `retain` go to the front of their queue."""
        chosen_set = set(chosen)
        for i, pos in reversed(list(enumerate(pool.tolist()))):
            if i in chosen_set:
                self.remaining[self.stratum[pos]] -= 1
            elif pos in retain:
                self.queues[self.stratum[pos]].appendleft(pos)
            else:
                self.queues[self.stratum[pos]].append(pos)


def resolve_budgets(strata_meta: ArtifactMeta, stratum: np.ndarray, eligible: np.ndarray,
                    config: SelectConfig) -> tuple[np.ndarray, str]:
    """Per-stratum budgets: those `stratify` recorded, or new ones for a --keep/--budget/--allocation given here."""
    recorded = strata_meta.extra["strata"]
    recorded_allocation = strata_meta.config.get("allocation", "waterfill")
    allocation = config.allocation or recorded_allocation
    if allocation not in ALLOCATIONS:
        raise UsageError(f"--allocation must be one of {', '.join(ALLOCATIONS)}")
    new_size = config.keep is not None or config.budget is not None
    if not new_size and allocation == recorded_allocation:
        return np.array([s["budget"] for s in recorded], dtype=np.int64), allocation
    keep, budget = ((config.keep, config.budget) if new_size
                    else (strata_meta.config.get("keep"), strata_meta.config.get("budget")))
    sizes = np.bincount(stratum[eligible], minlength=len(recorded))
    return allocate_budget(sizes, row_budget(len(stratum), keep, budget), allocation), allocation


def target_embeddings(strata_meta: ArtifactMeta, strata_path: str, config: SelectConfig) -> tuple[np.ndarray,
                                                                                                    np.ndarray]:
    """(the pool's embeddings, the --target dev rows' embeddings by the same encoder and settings)."""
    embeddings = load_embeddings(strata_meta, strata_path, config.embeddings)
    assert strata_meta.upstream is not None and config.target is not None
    emb_meta = read_meta(config.embeddings or strata_meta.upstream["path"], "embeddings")
    return embeddings, embed_target(read_target_examples(config.target, config.target_rows), emb_meta.config,
                                    config.device)


def target_budgets(strata_meta: ArtifactMeta, strata_path: str, table: pa.Table, eligible: np.ndarray, m: int,
                   config: SelectConfig) -> np.ndarray:
    """With a --target, the budget follows the dev rows: each cluster gets the share of dev rows whose nearest
    pool row is in it, split over its loss bins by size (slapmath.weighted_budget; what those clusters cannot
    hold goes to the others). Coverage-first budgets would keep the pool's own mix, so a dev set could only
    choose inside strata, never move the mix toward its task."""
    embeddings, target_emb = target_embeddings(strata_meta, strata_path, config)
    cluster = table["cluster"].to_numpy()
    stratum = table["stratum"].to_numpy()
    share = target_cluster_share(target_emb, embeddings, cluster, eligible)
    n_strata = len(strata_meta.extra["strata"])
    sizes = np.bincount(stratum[eligible], minlength=n_strata)
    cluster_of = np.zeros(n_strata, dtype=np.int64)
    cluster_of[stratum[eligible]] = cluster[eligible]
    cluster_sizes = np.bincount(cluster_of, weights=sizes, minlength=len(share))
    weights = share[cluster_of] * sizes / np.maximum(cluster_sizes[cluster_of], 1)
    return weighted_budget(sizes, weights, m)


def screened_rows_back(table: pa.Table, screened: np.ndarray, short: int) -> np.ndarray:
    """Mask of the `short` screened rows that come back when the budget needs more rows than the screen left:
    the least suspicious first, near-copies last (as stratify does), so the screen never shrinks the budget."""
    back = np.zeros(len(screened), dtype=bool)
    if short <= 0:
        return back
    score = table["screen_score"].to_numpy(zero_copy_only=False).astype(np.float64) \
        if "screen_score" in table.column_names else np.zeros(len(screened))
    near = pc.fill_null(pc.equal(table["pruned"], "near_duplicate"), False).to_numpy(zero_copy_only=False)
    order = np.concatenate([restore_order(np.nan_to_num(score, nan=np.inf), screened & ~near),
                            np.flatnonzero(screened & near)])
    back[order[:short]] = True
    return back


def select_nearest(strata_meta: ArtifactMeta, strata_path: str, eligible: np.ndarray, m: int,
                   config: SelectConfig) -> Selection:
    """Pool rows nearest to the --target dev rows in embedding space, round-robin over the dev rows; `gain`
    records each row's cosine with the dev row that took it."""
    embeddings, target_emb = target_embeddings(strata_meta, strata_path, config)
    positions = nearest_order(target_emb, embeddings, eligible, m)
    cosine = (embeddings[positions] @ target_emb.T).max(1) if len(positions) else np.zeros(0, dtype=np.float32)
    return ranked_selection(positions, config.batch_size, {"gain": cosine})


def select_random(eligible: np.ndarray, m: int, rng: np.random.Generator) -> Selection:
    return Selection.plain(rng.choice(np.flatnonzero(eligible), size=min(m, int(eligible.sum())), replace=False))


def select_stratified(pool: StratifiedPool, rng: np.random.Generator) -> Selection:
    chosen = [list(pool.queues[s])[:int(pool.remaining[s])] for s in np.flatnonzero(pool.remaining).tolist()]
    positions = np.array([pos for part in chosen for pos in part], dtype=np.int64)
    return Selection.plain(positions[rng.permutation(len(positions))])


def select_embedding(stratum: np.ndarray, eligible: np.ndarray, budgets: np.ndarray, embeddings: np.ndarray,
                     centroid_distance: np.ndarray, scales: np.ndarray, config: SelectConfig,
                     reporter: Reporter) -> Selection:
    """Strata + relative-distance diversity, no proxy: inside each stratum, greedy k-center from its most
    typical row (nearest the cluster centroid), so the kept rows are as far apart as the budget allows.

    Rows are then ordered round-robin over strata by pick rank and cut into batches of --batch-size, so every
    batch mixes strata. `diversity` records each row's gap to the rows picked before it in its stratum,
    relative to the stratum's typical nearest-neighbour distance (clipped like the replay's term). This is
    the mode for data sets too large for a proxy pass (see `farthest_point_order` for its cost).
    """
    members_of = _members_by_stratum(stratum, eligible)
    positions, ranks, strata_of, gaps = [], [], [], []
    # One BLAS thread: the products are small (stratum x 128 x dim), so threads add no speed, and their
    # spin-waiting made select 4x slower (186 s vs 43 s for 1M rows) when other work shared the 2 cores.
    with reporter.progress("select (embedding)", int(budgets.sum())) as bar, threadpool_limits(1, "blas"):
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
        return Selection.plain(np.zeros(0, dtype=np.int64))
    order = np.lexsort((np.concatenate(strata_of), np.concatenate(ranks)))  # by rank, then stratum
    return ranked_selection(np.concatenate(positions)[order], config.batch_size,
                            {"diversity": np.concatenate(gaps)[order]})


def select_baseline(strata_meta: ArtifactMeta, strata_path: str, table: pa.Table, eligible: np.ndarray, m: int,
                    rng: np.random.Generator, config: SelectConfig, reporter: Reporter,
                    input_override: str | None) -> Selection:
    """The baselines of `slapcli.baselines`, over the whole budget (they ignore the strata, ccs has its own).

    `loss` records each kept row's proxy loss; `gain` records the score that ranked it (IFD for ifd, the
    distance to earlier picks for kcenter).
    """
    if config.method == "kcenter":
        positions, gaps = kcenter_order(load_embeddings(strata_meta, strata_path, config.embeddings), eligible, m, rng)
        return ranked_selection(positions, config.batch_size, {"diversity": gaps, "gain": gaps})
    loss = table["loss"].to_numpy(zero_copy_only=False).astype(np.float32)
    if np.isnan(loss[eligible]).all() and eligible.any():
        raise UsageError(f"--method {config.method} ranks rows by proxy loss, but {strata_path} has none "
                         "(it was stratified with --no-proxy-loss); stratify again with the proxy loss on")
    if config.method == "ccs":
        positions = ccs_order(loss, eligible, m, rng)
        return ranked_selection(positions, config.batch_size, {"loss": loss[positions]})
    if config.method == "loss":
        positions = middle_loss_order(loss, eligible, m)
        return ranked_selection(positions, config.batch_size, {"loss": loss[positions]})
    rows = table["row"].to_numpy()
    if "direct_loss" in table.column_names:  # stratify's damage screen scored the answers without their prompts
        recorded = table["direct_loss"].to_numpy(zero_copy_only=False).astype(np.float32)
        if not np.isnan(recorded[eligible]).any():
            ifd = ifd_scores(loss, recorded)
            positions = ifd_order(ifd, eligible, m)
            return ranked_selection(positions, config.batch_size, {"loss": loss[positions], "gain": ifd[positions]})
    loss_pass = LossPass(strata_meta.config.get("proxy_model", config.proxy_model),
                         int(config.max_tokens or strata_meta.config.get("max_tokens", 1024)),
                         int(strata_meta.config.get("loss_batch_size", 16)), config.device,
                         label="response loss without prompt")
    direct = _direct_losses(strata_meta, strata_path, rows, eligible, loss_pass, reporter, input_override)
    ifd = ifd_scores(loss, direct)
    positions = ifd_order(ifd, eligible, m)
    return ranked_selection(positions, config.batch_size, {"loss": loss[positions], "gain": ifd[positions]})


def _direct_losses(strata_meta: ArtifactMeta, strata_path: str, rows: np.ndarray, eligible: np.ndarray,
                   loss_pass: LossPass, reporter: Reporter, input_override: str | None) -> np.ndarray:
    """IFD's prompt-free response losses, cached per (strata file, proxy, max tokens) in the slapcli cache.

    The pass costs as much as stratify's loss pass and does not depend on --keep, so trying several keep ratios
    (as the quality benchmark does) pays for it once. The strata file's fingerprint covers the source data.
    """
    identity = resolve_model(loss_pass.proxy_model).identity
    key = hashlib.blake2b(json.dumps([file_fingerprint(strata_path).to_dict(), identity, loss_pass.max_tokens,
                                      "ifd-direct-v1"]).encode(), digest_size=16).hexdigest()
    cached = cache_dir() / "ifd" / f"{key}.npy"
    if cached.exists():
        direct = np.load(cached, allow_pickle=False)
        if direct.shape == rows.shape:
            reporter.log(f"prompt-free losses from the cache ({cached})")
            return direct
    direct = np.full(len(rows), np.nan, dtype=np.float32)
    terms, _ = proxy_losses(strata_meta, source_path(strata_meta, input_override, strata_path), strata_path,
                            rows[eligible], loss_pass, reporter, view=without_prompt)
    direct[eligible] = terms[:, 0]
    cached.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(str(cached)) as tmp, open(tmp, "wb") as f:
        np.save(f, direct, allow_pickle=False)
    return direct


def ranked_selection(positions: np.ndarray, batch_size: int, terms: dict[str, np.ndarray]) -> Selection:
    """Rows chosen in one ranked pass, cut into batches of `batch_size` in that order."""
    batch = (np.arange(len(positions)) // batch_size).astype(np.int32)
    columns = {name: np.full(len(positions), np.nan, dtype=np.float32) for name in TERMS}
    columns.update({name: np.asarray(values, dtype=np.float32) for name, values in terms.items()})
    return Selection(np.asarray(positions, dtype=np.int64), batch, batch.copy(), columns)


def _members_by_stratum(stratum: np.ndarray, eligible: np.ndarray) -> dict[int, np.ndarray]:
    positions = np.flatnonzero(eligible)
    return {s: positions[part] for s, part in group_positions(stratum[positions]).items()}


def load_embeddings(strata_meta: ArtifactMeta, strata_path: str, override: str | None) -> np.ndarray:
    assert strata_meta.upstream is not None
    path = override or strata_meta.upstream["path"]
    check_upstream(strata_meta, path, strata_path)
    return read_embeddings(path)


def select(strata_path: str, output_path: str, config: SelectConfig, reporter: Reporter,
           input_override: str | None = None, command: str = "select") -> ArtifactMeta:
    if config.method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}")
    if config.method == "nearest" and not config.target:
        raise UsageError("--method nearest takes the rows nearest to a --target dev file: give --target FILE")
    if config.batch_size < 1 or config.pool_factor < 1:
        raise UsageError("--batch-size and --pool-factor must be >= 1")
    if config.refresh < 1 or config.target_refresh < 1:
        raise UsageError("--refresh and --target-refresh must be >= 1")
    if config.feature_norm not in FEATURE_NORMS:
        raise UsageError(f"--feature-norm must be one of {', '.join(FEATURE_NORMS)}")
    if config.eta not in ETA_RULES:
        raise UsageError(f"--eta must be one of {', '.join(ETA_RULES)}")
    if not config.eta_scale > 0:
        raise UsageError("--eta-scale must be > 0")
    if not config.length_prior >= 0:
        raise UsageError("--length-prior must be >= 0")
    strata_meta = read_meta(strata_path, "strata")
    table = read_table(strata_path)
    n = table.num_rows
    stratum = table["stratum"].to_numpy()
    eligible = pc.is_null(table["pruned"]).to_numpy()
    screened = pc.is_in(table["pruned"], pa.array(SCREEN_LABELS)).to_numpy(zero_copy_only=False)
    if screened.any():
        requested = (row_budget(n, config.keep, config.budget) if config.keep is not None or config.budget is not None
                     else int(strata_meta.stats.get("requested_budget", strata_meta.stats["budget"])))
        back = (screened if config.method not in SCREENED_METHODS
                else screened_rows_back(table, screened, requested - int(eligible.sum())))
        if back.any():
            eligible = eligible | back
            # Budgets recorded by stratify were split without these rows: split them again.
            if config.keep is None and config.budget is None:
                config = dataclasses.replace(config, budget=requested)
    budgets, allocation = resolve_budgets(strata_meta, stratum, eligible, config)
    if config.method == "slap" and config.target:
        budgets, allocation = target_budgets(strata_meta, strata_path, table, eligible, int(budgets.sum()),
                                             config), "target"
    m = int(budgets.sum())
    rng = np.random.default_rng(config.seed)
    reporter.log(f"selecting {m:,} of {n:,} rows with method {config.method!r}")
    stats: dict[str, Any] = {}
    if config.method == "random":
        chosen = select_random(eligible, m, rng)
    elif config.method == "nearest":
        chosen = select_nearest(strata_meta, strata_path, eligible, m, config)
    elif config.method == "stratified":
        chosen = select_stratified(StratifiedPool(stratum, eligible, budgets, rng), rng)
    elif config.method in BASELINES:
        chosen = select_baseline(strata_meta, strata_path, table, eligible, m, rng, config, reporter, input_override)
    else:
        embeddings = load_embeddings(strata_meta, strata_path, config.embeddings)
        with threadpool_limits(1, "blas"):  # small per-stratum products, as in select_embedding
            scale_by_stratum = stratum_nn_scale(embeddings, np.where(eligible, stratum, -1), seed=config.seed)
        scale_of = np.ones(int(stratum.max()) + 1, dtype=np.float32)
        scale_of[list(scale_by_stratum)] = list(scale_by_stratum.values())
        scales = scale_of[stratum]
        if config.method == "embedding":
            chosen = select_embedding(stratum, eligible, budgets, embeddings,
                                      table["centroid_distance"].to_numpy(), scales, config, reporter)
        else:
            from slapcli.replay import run_replay

            pool = StratifiedPool(stratum, eligible, budgets, rng, oversample=config.pool_factor)
            choices, stats = run_replay(strata_meta, strata_path, table, pool, embeddings, scales, config,
                                        reporter, input_override, output_path)
            chosen = Selection.from_choices(choices)
    out = selection_table(table, chosen)
    meta = ArtifactMeta(
        kind="selection",
        command=command,
        config={**asdict(config), "allocation_used": allocation},
        source=strata_meta.source,
        upstream=upstream_record(strata_path, strata_meta),
        stats={"rows": n, "kept": len(chosen), "budget": m, **stats,
               "pruned_by_reason": _count_reasons(out)},
        extra={"strata_budgets": budgets.tolist()},
    )
    write_artifact(output_path, out, meta)
    if config.method == "slap":
        from slapcli.replay import checkpoint_path

        with contextlib.suppress(FileNotFoundError):
            os.unlink(checkpoint_path(output_path))  # the artifact now holds everything the checkpoint did
    return meta


def selection_table(strata: pa.Table, chosen: Selection) -> pa.Table:
    """One row per strata row: kept or not, why, and for kept rows when and by which terms they were chosen."""
    n = strata.num_rows
    kept = np.zeros(n, dtype=bool)
    kept[chosen.position] = True
    # Reason: the strata artifact's prune label, else "selected" or "budget" (eligible but not chosen).
    reason = pc.if_else(pa.array(kept), "selected", pc.coalesce(strata["pruned"], "budget"))

    def scatter(values: np.ndarray, dtype: pa.DataType, missing: np.ndarray | None = None) -> pa.Array:
        full = np.zeros(n, dtype=values.dtype)
        full[chosen.position] = values
        mask = ~kept
        if missing is not None:
            mask[chosen.position[missing]] = True
        return pa.array(full, dtype, mask=mask)

    columns = {
        "order": scatter(np.arange(len(chosen), dtype=np.int64), pa.int64()),
        "step": scatter(chosen.step, pa.int32()),
        "batch": scatter(chosen.batch, pa.int32()),
    }
    for name in TERMS:
        values = chosen.terms.get(name)
        if values is None:
            values = np.full(len(chosen), np.nan, dtype=np.float32)
        columns[name] = scatter(values, pa.float32(), np.isnan(values))
    return pa.table({
        "row": strata["row"],
        "line": strata["line"],
        "stratum": strata["stratum"],
        "kept": kept,
        "reason": reason,
        **columns,
    }, schema=SELECTION_SCHEMA)


def _count_reasons(table: pa.Table) -> dict[str, int]:
    counts = pc.value_counts(table["reason"])
    return {str(v["values"]): int(v["counts"]) for v in sorted(counts.to_pylist(), key=lambda v: v["values"])}
