"""The one-screen summary printed after `select` / `run`, and what `inspect` shows."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from slapcli.artifacts import META_KEY, ArtifactMeta, read_meta, read_table

if TYPE_CHECKING:  # the diagnosis imports the encoder (torch): `slap inspect ARTIFACT` does without it
    from slapcli.report.diagnose import Diagnosis


def selection_summary(selection_path: str, strata_path: str | None, console: Console, max_clusters: int = 12) -> None:
    meta = read_meta(selection_path, "selection")
    sel = read_table(selection_path, ["row", "kept", "reason"])
    kept = sel["kept"].to_numpy(zero_copy_only=False)
    n = len(kept)
    console.print(f"[bold]rows in[/bold] {n:,}   [bold]rows kept[/bold] {int(kept.sum()):,} "
                  f"({kept.mean() if n else 0:.1%})   [bold]method[/bold] {meta.config.get('method')}")
    reasons = meta.stats.get("pruned_by_reason", {})
    dropped = ", ".join(f"{k} {v:,}" for k, v in sorted(reasons.items()) if k != "selected" and v)
    console.print(f"why rows were dropped: {dropped}" if dropped else "no rows were dropped")
    if strata_path is None:
        return
    cluster = read_table(strata_path, ["cluster"])["cluster"].to_numpy()
    sizes = np.bincount(cluster)
    kept_per = np.bincount(cluster[kept], minlength=len(sizes))
    share = np.divide(kept_per, sizes, out=np.zeros(len(sizes)), where=sizes > 0)
    table = Table(title=f"kept share per cluster ({len(sizes)} clusters; largest {min(max_clusters, len(sizes))})",
                  title_justify="left")
    for col in ("cluster", "rows", "kept", "share"):
        table.add_column(col, justify="right")
    for c in np.argsort(-sizes, kind="stable")[:max_clusters]:
        table.add_row(str(c), f"{sizes[c]:,}", f"{kept_per[c]:,}", f"{share[c]:.0%}")
    console.print(table)
    nonempty = sizes > 0
    console.print(f"kept share over clusters: min {share[nonempty].min():.0%}, "
                  f"median {np.median(share[nonempty]):.0%}, max {share[nonempty].max():.0%}")


def describe_artifact(path: str, console: Console) -> ArtifactMeta:
    meta = read_meta(path)
    table = read_table(path)
    console.print(f"[bold]{path}[/bold]: {meta.kind} artifact, schema v{meta.schema_version}, "
                  f"made by `slap {meta.command}` (slapcli {meta.tool_version})")
    console.print(f"rows: {table.num_rows:,}; columns: {', '.join(table.column_names)}")
    fp = meta.source.get("fingerprint", {})
    console.print(f"source: {meta.source.get('path')} ({fp.get('size', '?')} bytes, blake2b {fp.get('blake2b', '?')})")
    if meta.upstream:
        console.print(f"upstream: {meta.upstream['kind']} {meta.upstream['path']}")
    console.print("config: " + json.dumps(meta.config, sort_keys=True))
    console.print("stats: " + json.dumps(meta.stats, sort_keys=True))
    if meta.kind == "strata":
        strata = meta.extra.get("strata", [])
        nonempty = [s for s in strata if s["size"] > 0]
        budget = sum(s["budget"] for s in strata)
        console.print(f"strata: {len(nonempty)} non-empty of {len(strata)}; budget {budget:,}")
    return meta


def artifact_summary(path: str) -> dict[str, Any]:
    """What `slap inspect --json ARTIFACT` prints: the metadata plus a per-kind summary (README, "Inspect")."""
    meta = read_meta(path)
    parquet = pq.ParquetFile(path)
    summary: dict[str, Any] = {}
    if meta.kind == "embeddings":
        summary = {"dim": meta.stats.get("dim"), "truncated": meta.stats.get("truncated", 0)}
    elif meta.kind == "strata":
        strata = meta.extra.get("strata", [])
        pruned = read_table(path, ["pruned"])["pruned"].drop_null()
        summary = {"clusters": meta.config.get("clusters_used"), "strata": sum(s["size"] > 0 for s in strata),
                   "strata_total": len(strata), "budget": sum(s["budget"] for s in strata),
                   "pruned": dict(sorted(Counter(pruned.to_pylist()).items()))}
    elif meta.kind == "selection":
        kept = read_table(path, ["kept"])["kept"].to_numpy(zero_copy_only=False)
        summary = {"kept": int(kept.sum()), "kept_share": float(kept.mean()) if len(kept) else 0.0,
                   "reasons": meta.stats.get("pruned_by_reason", {})}
    return {"kind": meta.kind, "path": path, "schema_version": meta.schema_version,
            "tool_version": meta.tool_version, "command": meta.command, "rows": parquet.metadata.num_rows,
            "columns": parquet.schema_arrow.names, "source": meta.source, "upstream": meta.upstream,
            "config": meta.config, "stats": meta.stats, "summary": summary}


def _lines(lines: list[int]) -> str:
    return ", ".join(str(x) for x in lines)


def print_diagnosis(d: Diagnosis, console: Console) -> None:
    """The short diagnosis of `slap inspect DATA`."""
    console.print(f"[bold]{d.path}[/bold]: {d.rows:,} rows ({d.container}, {d.layout} layout)"
                  + (f"; {d.bad_rows:,} bad rows skipped, e.g. {d.bad_examples[0]}" if d.bad_rows else ""))
    exact = d.exact_duplicates
    console.print(f"exact duplicates: {exact['rows']:,} rows repeat an earlier row ({exact['groups']:,} groups"
                  + (f"; largest at lines {_lines(exact['largest'][0])}" if exact["largest"] else "") + ")")
    near = d.near_duplicates
    console.print(f"near duplicates (embedding cosine >= {near['threshold']}): {near['rows']:,} distinct rows in "
                  f"{near['groups']:,} groups, {near['redundant']:,} beyond one per group"
                  + (f"; largest at lines {_lines(near['largest'][0])}" if near["largest"] else ""))
    q = d.nearest_neighbour_cosine
    if not np.isnan(q["max"]):
        console.print("nearest-neighbour cosine of distinct rows: " + ", ".join(
            f"{'median' if k == 'p50' else k} {v:.3f}" for k, v in q.items()))
    console.print(f"suspected damaged rows: {d.damaged_rows:,}")
    for kind, finding in d.damaged.items():
        console.print(f"  {kind.replace('_', ' ')}: {finding.rows:,}"
                      + (f" (lines {_lines(finding.lines)}{', ...' if finding.rows > len(finding.lines) else ''})"
                         if finding.lines else ""))
    s = d.suggestion
    console.print(f"[bold]suggestion:[/bold] --keep {s['keep']}"
                  + (f" --prune-hardest {s['prune_hardest']}" if s["prune_hardest"] else ""))
    for line in s["why"]:
        console.print(f"  {line}")
    console.print(f"  e.g. {s['command']}")


def is_artifact(path: str) -> bool:
    """A Parquet file with slapcli metadata; anything else `inspect` treats as data to diagnose."""
    if path == "-" or not os.path.isfile(path):
        return False
    try:
        return META_KEY in (pq.read_metadata(path).metadata or {})
    except Exception:  # not Parquet at all (JSON Lines, a damaged file): data, and the reader will say what is wrong
        return False
