"""The report's figures, drawn with matplotlib (the optional `report` extra) into PNG bytes.

Only `Figure` objects and the Agg canvas are used, never pyplot: no global state, no display needed.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from slapcli.errors import MissingDependencyError
from slapcli.report.numbers import GroupShare, StepCurve

KEPT_COLOUR = "#2f9e44"
REASON_COLOURS = {"budget": "#adb5bd", "duplicate": "#f08c00", "hardest": "#e03131"}
# Other reasons (the damage screen's, future ones) in order of name; no green, which means kept.
OTHER_COLOURS = ("#1971c2", "#9c36b5", "#e64980", "#0c8599", "#5f3dc4", "#f59f00")
PRUNED_COLOUR = "#868e96"
DPI = 100


def require_matplotlib() -> None:
    """Fail before any work when the `report` extra is missing (matplotlib is imported only here)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependencyError("slap report draws its figures with matplotlib: "
                                     "pip install 'slapcli[report]'") from None


def _figure(width: float, height: float) -> Any:
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def reason_colours(reasons: list[str]) -> dict[str, str]:
    """A colour per pruning reason: fixed ones for budget, duplicate and hardest, a distinct one for the rest."""
    others = sorted(r for r in set(reasons) if r not in REASON_COLOURS)
    return {r: REASON_COLOURS.get(r) or OTHER_COLOURS[others.index(r) % len(OTHER_COLOURS)] for r in set(reasons)}


def kept_share_figure(by_cluster: GroupShare, by_bin: GroupShare | None, overall: float) -> Any:
    """Bars of the kept share per cluster (largest clusters first) and per loss bin, the overall share dashed."""
    panels = [("cluster", by_cluster)] + ([("loss bin (0 = easiest)", by_bin)] if by_bin is not None else [])
    fig = _figure(11, 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False, width_ratios=[3, 1][:len(panels)])[0]
    for ax, (name, share) in zip(axes, panels, strict=True):
        order = np.argsort(-share.rows, kind="stable") if name == "cluster" else np.arange(len(share.group))
        x = np.arange(len(order))
        ax.bar(x, share.share[order], color=KEPT_COLOUR)
        ax.axhline(overall, color="black", linestyle="--", linewidth=1, label=f"overall {overall:.0%}")
        ax.set_xticks(x, [str(g) for g in share.group[order]], fontsize=8 if len(x) > 30 else 9,
                      rotation=90 if len(x) > 30 else 0)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel(f"{name}" + (" (largest first)" if name == "cluster" else ""))
        ax.set_ylabel("kept share")
        if len(x) <= 40:
            for xi, o in zip(x, order, strict=True):
                ax.text(xi, min(share.share[o] + 0.02, 1.0), str(share.rows[o]), ha="center", fontsize=7)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("kept share (numbers on bars: rows)", fontsize=11)
    return fig


def map_figure(xy: np.ndarray, label: np.ndarray, method: str) -> Any:
    """The 2-D map of the embeddings, one colour per label ("kept" or the pruning reason)."""
    fig = _figure(7.5, 6)
    ax = fig.subplots()
    names = sorted(set(label.tolist()), key=lambda s: (s != "kept", s))
    colours = {"kept": KEPT_COLOUR, **reason_colours([n for n in names if n != "kept"])}
    for name in names:
        mask = label == name
        colour = colours[name]
        ax.scatter(xy[mask, 0], xy[mask, 1], s=9 if len(xy) < 5000 else 2, c=colour, alpha=0.8,
                   label=f"{name if name == 'kept' else 'pruned: ' + name} ({int(mask.sum()):,})", linewidths=0)
    ax.set_xlabel(f"{method} 1")
    ax.set_ylabel(f"{method} 2")
    ax.legend(fontsize=8, markerscale=2)
    ax.set_title(f"embeddings, {method} map", fontsize=11)
    return fig


def distributions_figure(panels: list[tuple[str, np.ndarray, np.ndarray]]) -> Any:
    """One histogram per (title, kept values, pruned values); a panel without pruned values shows kept only."""
    cols = 4 if len(panels) in (7, 8) else min(3, len(panels))  # no row with a lone panel
    rows = -(-len(panels) // cols)
    fig = _figure(4 * cols, 3 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax, (title, kept, pruned) in zip(axes, panels, strict=False):
        both = np.concatenate([kept, pruned])
        bins = np.histogram_bin_edges(both, bins=30) if len(both) else 10
        ax.hist(kept, bins=bins, density=True, histtype="stepfilled", alpha=0.5, color=KEPT_COLOUR,
                label=f"kept ({len(kept):,})")
        if len(pruned):
            ax.hist(pruned, bins=bins, density=True, histtype="step", linewidth=1.5, color=PRUNED_COLOUR,
                    label=f"pruned ({len(pruned):,})")
        ax.set_title(title, fontsize=10)
        ax.set_yticks([])
        ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig


def replay_figure(curve: StepCurve, smoothed: np.ndarray) -> Any:
    """Mean proxy loss of each replay step's chosen rows, and its trailing mean."""
    fig = _figure(8, 3.4)
    ax = fig.subplots()
    ax.plot(curve.step, curve.mean_loss, ".", color=PRUNED_COLOUR, markersize=4, label="mean loss of the step's rows")
    ax.plot(curve.step, smoothed, "-", color=KEPT_COLOUR, linewidth=2, label="trailing mean")
    ax.set_xlabel("replay step")
    ax.set_ylabel("proxy loss when chosen")
    ax.legend(fontsize=8)
    ax.set_title("the replay's proxy loss over steps", fontsize=11)
    return fig
