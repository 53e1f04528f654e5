"""The at-a-glance figure of docs/RESULTS.md: one panel per regime report of scripts/benchmark_regimes.py.

Each panel shows, per subset, the mean held-out loss over selection seeds with its [min, max] as a bar (one
point where there is one seed), full data as a dashed line; a noisy report adds a panel of its damage margin.

Usage:

    .venv/bin/python scripts/plot_regimes.py work/clean_d0s work/noisy_d0s work/targeted_d0t -o docs/results_regimes.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PANELS_PER_ROW = 4  # wider figures shrink below reading size on a docs page


def panels(results: list[dict[str, Any]]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(title, metric key, table rows) per panel: held-out loss for every report, the margin for noisy ones."""
    out = []
    for r in results:
        seed, keeps = r["data"]["seed"], sorted({row["keep"] for row in r["table"] if row["keep"] < 1})
        # A targeted panel names its target domain and any damage (--damaged-share), or two panels read alike.
        regime, data = r["regime"], r["data"]
        if regime == "targeted" and data.get("target_domain"):
            regime += f" ({data['target_domain']})"
        if regime.startswith("targeted") and data.get("damaged_share"):
            regime += f" {data['damaged_share']:.0%} damaged"
        title = f"{regime}, draw {seed}, keep {', '.join(f'{k:g}' for k in keeps)}"
        out.append((title, "loss", r["table"]))
        if any("margin" in row for row in r["table"]):
            out.append((f"{regime}, draw {seed}: damage margin", "margin",
                        [row for row in r["table"] if "margin" in row]))
    return out


def draw(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = panels(results)
    ncols = min(len(chosen), PANELS_PER_ROW)
    nrows = -(-len(chosen) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(chosen):]:
        ax.set_visible(False)
    for ax, (title, key, rows) in zip(axes.flat, chosen, strict=False):
        subsets = [row for row in rows if row["label"] != "full"]
        for i, row in enumerate(subsets):
            s = row[key]
            ax.errorbar([i], [s["mean"]], yerr=[[s["mean"] - s["min"]], [s["max"] - s["mean"]]], fmt="o",
                        capsize=4, color="tab:red" if row["label"].startswith("random") else "tab:blue")
        full = next((row for row in rows if row["label"] == "full"), None)
        if full is not None:
            ax.axhline(full[key]["mean"], ls="--", color="grey", lw=1, label="full data")
            ax.legend(loc="best", fontsize=8)
        ax.set_xticks(range(len(subsets)), [row["label"].replace("oracle: ", "oracle:\n") for row in subsets],
                      rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("held-out loss (lower is better)" if key == "loss" else "margin (higher is better)",
                      fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdirs", nargs="+", type=Path, help="work folders of benchmark_regimes.py runs")
    p.add_argument("-o", "--output", type=Path, required=True, help="the PNG to write")
    args = p.parse_args(argv)
    results = [json.loads((w / "results.json").read_text()) for w in args.workdirs]
    draw([r for r in results if r.get("table")], args.output)
    print(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
