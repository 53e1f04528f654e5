"""Stage 2, stratify: semantic clusters x loss bins, exact-duplicate and hardest-row pruning, budgets.

Strata are cluster x loss-quantile-bin inside the cluster (METHOD.md stage 2). The budget M is split over
strata by water-filling (or proportional / sqrt allocation), so rare regions keep their rows.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from slapcli.artifacts import (
    STRATA_SCHEMA,
    ArtifactMeta,
    read_embeddings,
    read_meta,
    read_table,
    upstream_record,
    write_artifact,
)
from slapcli.budgets import ALLOCATIONS, row_budget
from slapcli.config import StratifyConfig
from slapcli.engine import ENGINES, Engine
from slapcli.errors import UsageError
from slapcli.loss_parts import loss_terms_from_parts, write_loss_shard
from slapcli.progress import Reporter
from slapcli.proxy.loss import LOSS_TERMS
from slapcli.proxy.passes import LossPass, cached_proxy_losses
from slapcli.screen import (
    SCREEN_REASONS,
    ScreenSignals,
    answer_text,
    near_duplicates,
    prompt_gain,
    repeated_ngram_share,
    restore_order,
    screen_flags,
    screen_scores,
    without_prompt,
)
from slapcli.shard import Shard
from slapcli.slapmath import allocate_budget
from slapcli.source import iter_source_rows, source_path, verify_source


def default_clusters(n_rows: int) -> int:
    return max(1, min(n_rows, max(8, min(1024, round(math.sqrt(n_rows / 2))))))


def spherical_kmeans(embeddings: np.ndarray, k: int, iters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cluster unit vectors by cosine; returns (assignment, 1 - cosine to the assigned centroid)."""
    n, d = embeddings.shape
    k = max(1, min(k, n))
    kmeans = faiss.Kmeans(d, k, niter=iters, seed=seed, spherical=True, verbose=False,
                          max_points_per_centroid=256, min_points_per_centroid=1)
    kmeans.train(embeddings)
    index = faiss.IndexFlatIP(d)
    index.add(kmeans.centroids)
    sims, assign = index.search(embeddings, 1)
    return assign[:, 0].astype(np.int32), (1.0 - sims[:, 0]).astype(np.float32)


def loss_bins_within_clusters(cluster: np.ndarray, loss: np.ndarray, n_bins: int) -> np.ndarray:
    """Quantile bin of each row's loss inside its own cluster (0 = easiest), by rank so ties split evenly."""
    bins = np.zeros(len(cluster), dtype=np.int16)
    for c in np.unique(cluster):
        members = np.flatnonzero(cluster == c)
        ranks = np.empty(len(members), dtype=np.int64)
        ranks[np.argsort(loss[members], kind="stable")] = np.arange(len(members))
        bins[members] = (ranks * n_bins // len(members)).astype(np.int16)
    return bins


def first_occurrence(hashes: pa.Array | pa.ChunkedArray | np.ndarray) -> np.ndarray:
    """For each row the index of the first row with the same content hash (itself if unique).

    Through Arrow's dictionary encoding (integer codes) rather than np.unique on a million Python strings.
    """
    codes = pc.dictionary_encode(pa.chunked_array([hashes]) if isinstance(hashes, np.ndarray) else hashes)
    codes = codes.combine_chunks() if isinstance(codes, pa.ChunkedArray) else codes
    _, first_idx, inverse = np.unique(codes.indices.to_numpy(), return_index=True, return_inverse=True)
    return first_idx[inverse]


def stratify(embeddings_path: str, output_path: str, config: StratifyConfig, reporter: Reporter,
             input_override: str | None = None, engine: Engine = ENGINES["local"],
             shard: Shard | None = None) -> ArtifactMeta | None:
    """Write the strata artifact (and return its metadata); with `shard`, write only that shard's part of the proxy
    loss pass beside `output_path` (slapcli.parts) and return None."""
    if shard is not None and not config.proxy_loss:
        raise UsageError("--shard splits the proxy loss pass; with --no-proxy-loss stratify is cheap: run it once")
    if config.allocation not in ALLOCATIONS:
        raise UsageError(f"--allocation must be one of {', '.join(ALLOCATIONS)}")
    if not 0.0 <= config.prune_hardest < 1.0:
        raise UsageError("--prune-hardest must be in [0, 1)")
    if config.loss_bins < 1:
        raise UsageError("--loss-bins must be >= 1")
    if not 0.0 <= config.near_dup_cosine <= 1.0:
        raise UsageError("--near-dup-cosine must be in [0, 1] (0: off)")
    emb_meta = read_meta(embeddings_path, "embeddings")
    table = read_table(embeddings_path, ["row", "line", "content_hash", "n_prompt_tokens", "n_response_tokens"])
    n = table.num_rows
    rows = table["row"].to_numpy()
    embeddings = read_embeddings(embeddings_path)
    n_tokens = (table["n_prompt_tokens"].to_numpy() + table["n_response_tokens"].to_numpy()).astype(np.int32)
    if config.proxy_loss:
        # Fail before clustering when the source data cannot be read back.
        src = source_path(emb_meta, input_override, embeddings_path)
        verify_source(emb_meta, src, embeddings_path)

    first = first_occurrence(table["content_hash"]) if config.dedup else np.arange(n)
    is_duplicate = first != np.arange(n)
    eligible = ~is_duplicate

    k = config.clusters or default_clusters(int(eligible.sum()))
    reporter.log(f"clustering {int(eligible.sum()):,} rows into {k} clusters (spherical k-means)")
    cluster = np.zeros(n, dtype=np.int32)
    distance = np.zeros(n, dtype=np.float32)
    # Without duplicates no copy of the (possibly multi-GB) matrix is made.
    points = embeddings if eligible.all() else embeddings[eligible]
    cluster[eligible], distance[eligible] = spherical_kmeans(points, k, config.kmeans_iters, config.seed)
    del points
    # A duplicate sits in its original's cluster, so per-cluster counts describe the whole input.
    cluster[is_duplicate], distance[is_duplicate] = cluster[first[is_duplicate]], distance[first[is_duplicate]]
    near_of = (near_duplicates(embeddings, cluster, eligible, config.near_dup_cosine) if config.near_dup_cosine > 0
               else np.full(n, -1, dtype=np.int64))
    del embeddings
    is_near = near_of >= 0
    eligible &= ~is_near

    terms = np.full((n, len(LOSS_TERMS)), np.nan, dtype=np.float32)
    direct = np.full(n, np.nan, dtype=np.float32)
    loss_identity = None
    from_parts = None
    if config.proxy_loss:
        loss_pass = LossPass(config.proxy_model, int(emb_meta.config.get("max_tokens", 1024)),
                             config.loss_batch_size, config.device)
        if shard is not None:  # only this shard's chunks of the pass, into a loss part; the unsharded run reads them
            write_loss_shard(emb_meta, src, embeddings_path, rows[eligible], loss_pass, config.screen, output_path,
                             shard, reporter, engine)
            return None
        from_parts = loss_terms_from_parts(output_path, embeddings_path, rows[eligible], loss_pass, config.screen,
                                           reporter)
    if from_parts is not None:
        terms[eligible], direct[eligible], loss_identity = from_parts
    elif config.proxy_loss:
        terms[eligible], loss_identity = cached_proxy_losses(emb_meta, src, embeddings_path, rows[eligible],
                                                             loss_pass, reporter, engine=engine)
        if config.screen:
            direct_pass = dataclasses.replace(loss_pass, label="proxy loss without prompt")
            direct[eligible] = cached_proxy_losses(emb_meta, src, embeddings_path, rows[eligible], direct_pass,
                                                   reporter, view=without_prompt, engine=engine)[0][:, 0]
    loss = terms[:, 0]
    n_bins = config.loss_bins if config.proxy_loss else 1
    loss_bin = np.zeros(n, dtype=np.int16)
    if config.proxy_loss:
        loss_bin[eligible] = loss_bins_within_clusters(cluster[eligible], loss[eligible], n_bins)
    # A near-copy sits in its original's stratum, as a duplicate does (it may come back to fill the budget).
    loss_bin[is_near] = loss_bin[near_of[is_near]]
    loss_bin[is_duplicate] = loss_bin[first[is_duplicate]]
    stratum = (cluster.astype(np.int64) * n_bins + loss_bin).astype(np.int32)

    screened: dict[str, np.ndarray] = {}
    suspicion = np.full(n, np.nan, dtype=np.float32)
    if config.proxy_loss and config.screen:
        signals = ScreenSignals(prompt_gain=prompt_gain(loss, direct), end_loss=terms[:, 1], mean_loss=loss,
                                tail_loss=terms[:, 2], response_tokens=table["n_response_tokens"].to_numpy(),
                                repeated_share=answer_repetition(emb_meta, src, embeddings_path, rows, eligible))
        reason, score = screen_flags(screen_scores(signals, eligible), eligible)
        suspicion[eligible] = score[eligible]
        screened = {name: reason == i for i, name in enumerate(SCREEN_REASONS)}
        flagged = reason >= 0
        eligible &= ~flagged
        reporter.log("screen: " + ", ".join(f"{int(v.sum()):,} {k}" for k, v in screened.items())
                     + f" of {int((eligible | flagged).sum()):,} rows")

    hardest = np.zeros(n, dtype=bool)
    if config.prune_hardest > 0 and config.proxy_loss:
        threshold = np.quantile(loss[eligible], 1.0 - config.prune_hardest)
        hardest = eligible & (loss > threshold)
        eligible &= ~hardest

    m = row_budget(n, config.keep, config.budget)
    # Screened rows and near-copies never shrink the budget: when it needs more rows than they left, the least
    # suspicious flagged rows come back first, then near-copies (in row order).
    short = m - int(eligible.sum())
    if short > 0:
        flagged = np.logical_or.reduce([np.zeros(n, dtype=bool), *screened.values()])
        back = restore_order(np.nan_to_num(suspicion, nan=np.inf), flagged, is_near)[:short]
        eligible[back] = True
        for mask in (*screened.values(), is_near):
            mask[back] = False
        if len(back):
            reporter.log(f"the budget needs {len(back):,} screened or near-duplicate rows back")
    n_strata = int(stratum.max()) + 1 if n else 0
    sizes = np.bincount(stratum[eligible], minlength=n_strata)
    budgets = allocate_budget(sizes, m, config.allocation)
    strata_table = _strata_summary(loss, stratum, eligible, sizes, budgets, n_bins)

    out = pa.table({
        "row": rows,
        "line": table["line"],
        "content_hash": table["content_hash"],
        "cluster": cluster,
        "centroid_distance": distance,
        "n_tokens": n_tokens,
        "loss": _nullable(loss),
        "loss_bin": loss_bin,
        "stratum": stratum,
        "pruned": prune_labels({"duplicate": is_duplicate, "near_duplicate": is_near, **screened,
                                "hardest": hardest}),
        "duplicate_of": pa.array(np.where(is_duplicate, rows[first], np.where(is_near, rows[near_of], 0)),
                                 pa.int64(), mask=~(is_duplicate | is_near)),
        "end_loss": _nullable(terms[:, 1]),
        "tail_loss": _nullable(terms[:, 2]),
        "direct_loss": _nullable(direct),
        "screen_score": _nullable(suspicion),
    }, schema=STRATA_SCHEMA)
    meta = ArtifactMeta(
        kind="strata",
        command="stratify",
        config={**asdict(config), "clusters_used": int(cluster.max()) + 1 if n else 0, "loss_bins_used": n_bins,
                "proxy_model_identity": loss_identity, "layout": emb_meta.config.get("layout", "auto"),
                "on_bad_line": emb_meta.config.get("on_bad_line", "error"),
                "max_tokens": emb_meta.config.get("max_tokens", 1024)},
        source=emb_meta.source,
        upstream=upstream_record(embeddings_path, emb_meta),
        stats={"rows": n, "duplicates": int(is_duplicate.sum()), "near_duplicates": int(is_near.sum()),
               "screened": {k: int(v.sum()) for k, v in screened.items()}, "hardest_pruned": int(hardest.sum()),
               "eligible": int(eligible.sum()), "budget": int(budgets.sum()), "requested_budget": m},
        extra={"strata": strata_table},
    )
    write_artifact(output_path, out, meta)
    return meta


def answer_repetition(emb_meta: ArtifactMeta, src: str, embeddings_path: str, rows: np.ndarray,
                      eligible: np.ndarray) -> np.ndarray:
    """Per row, the share of its answer in repeated word n-grams (slapcli.screen); NaN where not eligible. Reads the
    source once more: text only, no model, a small cost beside the proxy passes."""
    share = np.full(len(rows), np.nan, dtype=np.float32)
    position = {int(r): i for i, r in enumerate(rows.tolist())}
    for parsed in iter_source_rows(emb_meta, src, embeddings_path, set(rows[eligible].tolist())):
        share[position[parsed.record.index]] = repeated_ngram_share(answer_text(parsed.example))
    return share


def _nullable(values: np.ndarray) -> pa.Array:
    return pa.array(values, pa.float32(), mask=np.isnan(values))


def prune_labels(masks: dict[str, np.ndarray]) -> pa.Array:
    """A string column: the label of the (first) mask a row is in, null where it is in none.

    Built from integer codes (a dictionary array cast to string), so a million rows make no Python objects.
    """
    labels = list(masks)
    code = np.full(len(next(iter(masks.values()))), -1, dtype=np.int32)
    for i, label in reversed(list(enumerate(labels))):
        code[masks[label]] = i
    indices = pa.array(code, pa.int32(), mask=code < 0)
    return pa.DictionaryArray.from_arrays(indices, pa.array(labels, pa.string())).cast(pa.string())


def _strata_summary(loss: np.ndarray, stratum: np.ndarray, eligible: np.ndarray, sizes: np.ndarray,
                    budgets: np.ndarray, n_bins: int) -> list[dict[str, Any]]:
    """One entry per stratum (vectorised: a loop over strata with row masks would be O(strata x rows))."""
    has_loss = eligible & ~np.isnan(loss)
    loss_sum = np.bincount(stratum[has_loss], weights=loss[has_loss], minlength=len(sizes))
    loss_count = np.bincount(stratum[has_loss], minlength=len(sizes))
    return [
        {
            "stratum": s,
            "cluster": s // n_bins,
            "loss_bin": s % n_bins,
            "size": int(sizes[s]),
            "budget": int(budgets[s]),
            "mean_loss": float(loss_sum[s] / loss_count[s]) if loss_count[s] else None,
        }
        for s in range(len(sizes))
    ]
