"""Stage 3, select: choose the coreset, batch by batch, and explain every pruned row.

This stage works out which rows may be chosen (stratify's labels, its damage screen) and how many per stratum,
hands that job to the method `--method` names (`slapcli.methods.registry` lists them and what each needs), and
writes the method's choice as the selection artifact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from slapcli.artifacts import SELECTION_SCHEMA, ArtifactMeta, read_meta, read_table, upstream_record, write_artifact
from slapcli.baselines import target_ranked
from slapcli.budgets import ALLOCATIONS, row_budget
from slapcli.errors import UsageError
from slapcli.methods.base import TERMS, SelectConfig, Selection, SelectionJob
from slapcli.methods.registry import method_entry
from slapcli.progress import Reporter
from slapcli.screen import SCREEN_REASONS, restore_order
from slapcli.slapmath import ETA_RULES, FEATURE_NORMS, allocate_budget

__all__ = ["SelectConfig", "select", "selection_table"]

SCREEN_LABELS = ("near_duplicate", *SCREEN_REASONS)


def check_config(config: SelectConfig) -> None:
    """Refuse settings no method can run with, in one line each, before anything is read."""
    try:
        entry = method_entry(config.method)
    except KeyError as e:
        raise UsageError(str(e.args[0])) from None
    if entry.needs.target == "required" and not config.target:
        raise UsageError(f"--method {config.method} needs a --target dev file (rows like the downstream task): "
                         "give --target FILE")
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
    if not config.target_candidates >= 1:
        raise UsageError("--target-candidates must be >= 1 (candidate rows per kept row)")


def select(strata_path: str, output_path: str, config: SelectConfig, reporter: Reporter,
           input_override: str | None = None) -> ArtifactMeta:
    check_config(config)
    entry = method_entry(config.method)
    strata_meta = read_meta(strata_path, "strata")
    table = read_table(strata_path)
    n = table.num_rows
    stratum = table["stratum"].to_numpy()
    eligible = pc.is_null(table["pruned"]).to_numpy()
    screened = pc.is_in(table["pruned"], pa.array(SCREEN_LABELS)).to_numpy(zero_copy_only=False)
    if screened.any():
        requested = (row_budget(n, config.keep, config.budget) if config.keep is not None or config.budget is not None
                     else int(strata_meta.stats.get("requested_budget", strata_meta.stats["budget"])))
        back = (screened if not entry.needs.screened
                else screened_rows_back(table, screened, requested - int(eligible.sum())))
        if back.any():
            eligible = eligible | back
            # Budgets recorded by stratify were split without these rows: split them again.
            if config.keep is None and config.budget is None:
                config = dataclasses.replace(config, budget=requested)
    budgets, allocation = resolve_budgets(strata_meta, stratum, eligible, config)
    job = SelectionJob(strata_meta, strata_path, table, eligible, budgets, config, reporter,
                       np.random.default_rng(config.seed), input_override, output_path)
    if entry.needs.target_budgets and config.target:
        job.eligible, job.budgets = target_scope(job)
        allocation = "target"
    reporter.log(f"selecting {job.m:,} of {n:,} rows with method {config.method!r}")
    result = entry.load()(job)
    out = selection_table(table, result.selection)
    meta = ArtifactMeta(
        kind="selection",
        command="select",
        config={**asdict(config), "allocation_used": allocation},
        source=strata_meta.source,
        upstream=upstream_record(strata_path, strata_meta),
        stats={"rows": n, "kept": len(result.selection), "budget": job.m, **result.stats,
               "pruned_by_reason": _count_reasons(out)},
        extra={"strata_budgets": job.budgets.tolist()},
    )
    write_artifact(output_path, out, meta)
    for path in result.leftovers:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return meta


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


def target_scope(job: SelectionJob) -> tuple[np.ndarray, np.ndarray]:
    """With a --target: (rows the method may choose, per-stratum budgets). Candidates are the pool rows nearest the
    dev rows, `target_candidates` per kept row, ranked as `--method nearest` ranks them (round-robin over dev rows,
    so every dev row gets neighbours) or, with `--target-ranking max`, by best similarity to any dev row; each
    stratum's budget is the number of the first `m` ranked rows in it. So the target moves the mix (coverage-first
    budgets would keep the pool's own mix and let a dev set choose only inside strata) and the replay chooses inside
    the region of the pool the dev rows point at."""
    eligible, m = job.eligible, job.m
    n_candidates = min(int(np.ceil(job.config.target_candidates * m)), int(eligible.sum()))
    ranked = target_ranked(job.config.target_ranking, job.target_embeddings(), job.embeddings(), eligible,
                           n_candidates)
    scope = np.zeros_like(eligible)
    scope[ranked] = True
    n_strata = len(job.budgets)
    budgets = np.bincount(job.table["stratum"].to_numpy()[ranked[:m]], minlength=n_strata).astype(np.int64)
    return scope, budgets


def screened_rows_back(table: pa.Table, screened: np.ndarray, short: int) -> np.ndarray:
    """Mask of the `short` screened rows that come back when the budget needs more rows than the screen left:
    the least suspicious first, near-copies last (as stratify does), so the screen never shrinks the budget."""
    back = np.zeros(len(screened), dtype=bool)
    if short <= 0:
        return back
    score = table["screen_score"].to_numpy(zero_copy_only=False).astype(np.float64) \
        if "screen_score" in table.column_names else np.zeros(len(screened))
    near = pc.fill_null(pc.equal(table["pruned"], "near_duplicate"), False).to_numpy(zero_copy_only=False)
    back[restore_order(np.nan_to_num(score, nan=np.inf), screened, screened & near)[:short]] = True
    return back


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
