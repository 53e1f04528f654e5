"""The one-screen summary printed after `select` / `run`, and what `inspect` shows."""

from __future__ import annotations

import json

import numpy as np
from rich.console import Console
from rich.table import Table

from slapcli.artifacts import ArtifactMeta, read_meta, read_table


def selection_summary(selection_path: str, strata_path: str | None, console: Console, max_clusters: int = 12) -> None:
    meta = read_meta(selection_path, "selection")
    sel = read_table(selection_path, ["row", "kept", "reason"])
    kept = sel["kept"].to_numpy(zero_copy_only=False)
    n = len(kept)
    console.print(f"[bold]rows in[/bold] {n:,}   [bold]rows kept[/bold] {int(kept.sum()):,} "
                  f"({kept.mean() if n else 0:.1%})   [bold]method[/bold] {meta.config.get('method')}")
    reasons = meta.stats.get("pruned_by_reason", {})
    console.print("why rows were dropped: " + ", ".join(f"{k} {v:,}" for k, v in sorted(reasons.items())
                                                          if k != "selected"))
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
