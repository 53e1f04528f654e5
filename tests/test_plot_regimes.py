"""scripts/plot_regimes.py: a panel per regime report, one more for a noisy report's damage margin."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import plot_regimes


def report(regime: str, margin: bool) -> dict:
    def row(label: str, keep: float, mean: float) -> dict:
        out = {"label": label, "keep": keep, "loss": {"mean": mean, "min": mean - 0.01, "max": mean + 0.01}}
        if margin:
            out["margin"] = {"mean": 0.2, "min": 0.19, "max": 0.21}
        return out
    return {"regime": regime, "data": {"seed": 1}, "table": [row("full", 1.0, 1.8), row("random", 0.7, 1.83),
                                                             row("slap", 0.7, 1.82)]}


def test_noisy_reports_get_a_margin_panel_and_the_figure_is_written(tmp_path: Path) -> None:
    chosen = plot_regimes.panels([report("clean", False), report("noisy", True)])
    assert [(title, key) for title, key, _ in chosen] == [("clean, draw 1, keep 0.7", "loss"),
                                                          ("noisy, draw 1, keep 0.7", "loss"),
                                                          ("noisy, draw 1: damage margin", "margin")]
    pytest.importorskip("matplotlib")
    for i, r in enumerate((report("clean", False), report("noisy", True))):
        (tmp_path / f"w{i}").mkdir()
        (tmp_path / f"w{i}" / "results.json").write_text(json.dumps(r))
    out = tmp_path / "fig.png"
    assert plot_regimes.main([str(tmp_path / "w0"), str(tmp_path / "w1"), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_targeted_report_names_its_target_and_damage_in_its_titles() -> None:
    damaged = {**report("targeted", True), "data": {"seed": 0, "damaged_share": 0.3, "target_domain": "code"}}
    general = {**report("targeted", False), "data": {"seed": 1, "damaged_share": 0.0, "target_domain": "general"}}
    titles = [title for title, _, _ in plot_regimes.panels([report("targeted", False), damaged, general])]
    assert titles == ["targeted, draw 1, keep 0.7", "targeted (code) 30% damaged, draw 0, keep 0.7",
                      "targeted (code) 30% damaged, draw 0: damage margin", "targeted (general), draw 1, keep 0.7"]
