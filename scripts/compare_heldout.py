"""Which held-out rows decide a comparison: each subset's per-row held-out losses against one reference subset,
read paired, from a `benchmark_regimes.py` (or `benchmark_quality.py`) workdir's run files (docs/RESULTS.md,
"What decides slap against `nearest`").

A run file holds every held-out row's loss (`heldout_rows`); each selection seed's rows are averaged over its
training shuffles and compared with the reference's (its first seed: `nearest` is deterministic). No training.

    .venv/bin/python scripts/compare_heldout.py work/targeted_d0r --against nearest
    .venv/bin/python scripts/compare_heldout.py work/targeted_big_d0 --against nearest --equal-steps
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from benchlib.report import paired_rows
from benchlib.trainer import SUBSET_RUN


def per_seed_rows(workdir: Path, keep: str, equal_steps: bool) -> dict[tuple[str, int], np.ndarray]:
    """(label, selection seed) -> per held-out row loss, the mean over training shuffles."""
    shuffles: dict[tuple[str, int], list[np.ndarray]] = {}
    for path in sorted((workdir / "runs").glob("*.json")):
        m = SUBSET_RUN.fullmatch(path.name)
        if m and m["keep"] == keep and bool(m["eq"]) == equal_steps:
            rows = np.array(json.loads(path.read_text())["heldout_rows"], dtype=float)
            shuffles.setdefault((m["label"], int(m["seed"])), []).append(rows)
    return {key: np.mean(runs, axis=0) for key, runs in shuffles.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--against", default="nearest", help="reference subset label (its first seed)")
    p.add_argument("--keep", default="0.20", help="the subsets' keep, as in the run files' names")
    p.add_argument("--equal-steps", action="store_true", help="the equal-steps runs instead of the one-epoch ones")
    p.add_argument("--trim", type=int, default=3, help="rows dropped from each end for the trimmed mean")
    args = p.parse_args(argv)
    rows = per_seed_rows(args.workdir, args.keep, args.equal_steps)
    refs = sorted(seed for label, seed in rows if label == args.against)
    if not refs:
        raise SystemExit(f"{args.workdir}: no run files of {args.against!r} at keep {args.keep}")
    ref = rows[(args.against, refs[0])]
    print(f"{'subset':24s} seed  mean diff  median  lower on   trimmed  largest (row, diff)")
    for (label, seed), values in sorted(rows.items()):
        if label == args.against:
            continue
        r = paired_rows(values - ref, trim=args.trim)
        print(f"{label:24s} {seed:4d}  {r['mean']:+.4f}  {r['median']:+.4f}  {r['lower']:3d}/{r['rows']:<4d} "
              f"{r['trimmed_mean']:+.4f}  {[(i, round(d, 3)) for i, d in r['largest']]}")


if __name__ == "__main__":
    main()
