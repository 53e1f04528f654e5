"""`slap report`: the numbers behind each figure against naive references, the page's self-containment, the
command end to end on tiny models, and the page rendered in headless Chromium (marked `browser`)."""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from slapcli.cli import app
from slapcli.errors import MissingDependencyError
from slapcli.report import numbers
from slapcli.report.figures import KEPT_COLOUR
from slapcli.report.neighbours import (
    connected_groups,
    cosine_pairs,
    exact_duplicate_groups,
    near_duplicate_groups,
    nearest_neighbour_cosine,
)
from slapcli.report.page import Image, Section, Table, render

runner = CliRunner()


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- numbers -------------------------------------------------------------------------------------------------


def test_kept_share_counts_each_group():
    groups = np.array([3, 1, 3, 3, 7, 1])
    kept = np.array([True, False, False, True, True, True])
    share = numbers.kept_share(groups, kept)
    assert share.group.tolist() == [1, 3, 7]
    assert share.rows.tolist() == [2, 3, 1]
    assert share.kept.tolist() == [1, 2, 1]
    assert share.share.tolist() == pytest.approx([0.5, 2 / 3, 1.0])


def test_split_by_kept_drops_missing_values():
    values = np.array([1.0, np.nan, 3.0, 4.0, np.inf])
    kept = np.array([True, True, False, False, True])
    k, p = numbers.split_by_kept(values, kept)
    assert k.tolist() == [1.0]
    assert p.tolist() == [3.0, 4.0]


def test_spread_and_quantiles_match_numpy():
    v = np.random.default_rng(0).normal(size=101)
    s = numbers.spread(np.concatenate([v, [np.nan]]))
    assert s.count == 101
    assert s.mean == pytest.approx(v.mean())
    assert s.quantiles["p50"] == pytest.approx(np.median(v))
    assert s.quantiles["p90"] == pytest.approx(np.quantile(v, 0.9))
    assert s.quantiles["max"] == pytest.approx(v.max())
    empty = numbers.spread(np.array([np.nan]))
    assert empty.count == 0 and np.isnan(empty.quantiles["p50"])


def test_loss_by_step_is_the_mean_per_step():
    step = np.array([2, 0, 0, np.nan, 2, 1])
    loss = np.array([1.0, 2.0, 4.0, 9.0, 3.0, np.nan])
    curve = numbers.loss_by_step(step, loss)
    # Step 1's only row has no loss, and the row without a step is not part of the replay.
    assert curve.step.tolist() == [0, 2]
    assert curve.mean_loss.tolist() == [3.0, 2.0]
    assert curve.rows.tolist() == [2, 2]


def test_rolling_mean_is_a_trailing_mean():
    v = np.array([1.0, 2.0, 3.0, 10.0])
    expected = [np.mean(v[max(0, i - 1):i + 1]) for i in range(len(v))]
    assert numbers.rolling_mean(v, 2).tolist() == pytest.approx(expected)


def test_pca_2d_matches_the_covariance_eigenvectors():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    xy = numbers.pca_2d(x)
    centred = x - x.mean(axis=0)
    eigval, eigvec = np.linalg.eigh(np.cov(centred, rowvar=False))
    top = eigvec[:, ::-1][:, :2]
    reference = centred @ top
    for k in range(2):  # equal up to the sign of each component
        assert np.allclose(np.abs(xy[:, k]), np.abs(reference[:, k]), atol=1e-8)
    assert np.var(xy[:, 0], ddof=1) == pytest.approx(eigval[::-1][0])
    assert np.array_equal(numbers.pca_2d(x), xy)  # deterministic signs
    assert numbers.pca_2d(x[:1]).tolist() == [[0.0, 0.0]]


def test_sample_positions_is_seeded_and_bounded():
    assert numbers.sample_positions(5, 10, 0).tolist() == [0, 1, 2, 3, 4]
    a = numbers.sample_positions(1000, 50, 3)
    assert len(a) == 50 == len(set(a.tolist())) and np.all(np.diff(a) > 0)
    assert np.array_equal(a, numbers.sample_positions(1000, 50, 3))


def test_examples_per_reason_draws_only_pruned_rows_of_that_reason():
    reason = np.array(["selected", "budget", "duplicate", "budget", "budget", "selected", "duplicate"], dtype=object)
    kept = reason == "selected"
    out = numbers.examples_per_reason(reason, kept, 2, seed=0)
    assert sorted(out) == ["budget", "duplicate"]
    assert set(out["budget"].tolist()) <= {1, 3, 4} and len(out["budget"]) == 2
    assert out["duplicate"].tolist() == [2, 6]


def test_one_reasons_examples_do_not_depend_on_the_other_reasons():
    reason = np.array(["budget"] * 30 + ["cut_off"] * 30, dtype=object)
    kept = np.zeros(60, dtype=bool)
    both = numbers.examples_per_reason(reason, kept, 3, seed=0)
    alone = numbers.examples_per_reason(reason[30:], kept[30:], 3, seed=0)
    assert (both["cut_off"] - 30).tolist() == alone["cut_off"].tolist()
    assert both["budget"].tolist() != numbers.examples_per_reason(reason, kept, 3, seed=1)["budget"].tolist()


def test_each_reason_has_its_own_colour_and_none_is_kept_green():
    from slapcli.report.figures import reason_colours

    reasons = ["budget", "duplicate", "hardest", "cut_off", "ignores_prompt", "repetitive", "near_duplicate"]
    colours = reason_colours(reasons)
    assert len(set(colours.values())) == len(reasons) and KEPT_COLOUR not in colours.values()
    assert reason_colours(["repetitive", "budget"])["budget"] == colours["budget"]


def test_most_and_least_valuable_are_kept_scored_rows_without_overlap():
    gain = np.array([5.0, 1.0, np.nan, 9.0, -2.0, 7.0])
    kept = np.array([True, True, True, False, True, True])
    best, worst = numbers.most_and_least_valuable(gain, kept, 2)
    assert best.tolist() == [5, 0]  # 7, 5 (row 3 was not kept, row 2 has no score)
    assert worst.tolist() == [4, 1]  # -2, 1
    best, worst = numbers.most_and_least_valuable(gain, kept, 5)
    assert set(best.tolist()).isdisjoint(worst.tolist())
    assert len(best) + len(worst) == 4


# --- neighbours -----------------------------------------------------------------------------------------------


def test_nearest_neighbour_cosine_matches_brute_force():
    x = unit_rows(300, 16, 0)
    x[7] = x[3]  # an exact copy: its neighbour is at cosine 1, whichever of the two faiss returns first
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    assert np.allclose(nearest_neighbour_cosine(x), sims.max(axis=1), atol=1e-5)
    assert nearest_neighbour_cosine(x)[7] == pytest.approx(1.0, abs=1e-5)
    assert np.isnan(nearest_neighbour_cosine(x[:1])).all()


def test_cosine_pairs_match_brute_force():
    x = unit_rows(120, 4, 1)  # low dimension: many pairs above the threshold
    threshold = 0.8
    sims = x @ x.T
    expected = {(i, j) for i in range(len(x)) for j in range(i + 1, len(x)) if sims[i, j] >= threshold + 1e-5}
    maybe = {(i, j) for i in range(len(x)) for j in range(i + 1, len(x)) if abs(sims[i, j] - threshold) < 1e-5}
    got = {tuple(p) for p in cosine_pairs(x, threshold).tolist()}
    assert expected <= got <= expected | maybe
    assert len(expected) > 10


def test_large_pools_use_an_inverted_file_that_never_invents_a_pair(monkeypatch):
    from slapcli.report import neighbours

    rng = np.random.default_rng(3)
    centres = unit_rows(20, 16, 4)
    x = centres[rng.integers(0, 20, size=2000)] + 0.15 * rng.normal(size=(2000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    exact_pairs = {tuple(p) for p in cosine_pairs(x, 0.9).tolist()}
    exact_nn = nearest_neighbour_cosine(x)
    monkeypatch.setattr(neighbours, "EXACT_ROWS", 500)
    approx_pairs = {tuple(p) for p in cosine_pairs(x, 0.9).tolist()}
    approx_nn = nearest_neighbour_cosine(x)
    assert approx_pairs <= exact_pairs and len(approx_pairs) >= 0.9 * len(exact_pairs) > 0
    assert np.all(approx_nn <= exact_nn + 1e-5) and np.mean(np.isclose(approx_nn, exact_nn, atol=1e-5)) > 0.9


def test_connected_groups_follow_chains():
    groups = connected_groups(7, np.array([[0, 2], [2, 5], [3, 4]]))
    assert [g.tolist() for g in groups] == [[0, 2, 5], [3, 4]]
    assert connected_groups(3, np.zeros((0, 2), dtype=np.int64)) == []


def test_exact_duplicate_groups_largest_first():
    groups = exact_duplicate_groups(["a", "b", "a", "c", "b", "a", "d"])
    assert [g.tolist() for g in groups] == [[0, 2, 5], [1, 4]]


def test_near_duplicate_groups_only_among_candidates():
    x = unit_rows(50, 32, 2)
    x[10] = x[4]  # exact copy
    x[20] = (x[4] + 0.05 * x[30]) / np.linalg.norm(x[4] + 0.05 * x[30])  # a near copy
    candidates = np.ones(50, dtype=bool)
    candidates[10] = False
    groups = near_duplicate_groups(x, 0.95, candidates)
    assert [g.tolist() for g in groups] == [[4, 20]]
    assert [g.tolist() for g in near_duplicate_groups(x, 0.95)] == [[4, 10, 20]]


# --- page -----------------------------------------------------------------------------------------------------


def test_page_is_self_contained_and_escapes_text():
    png = b"\x89PNG\r\n\x1a\nfake"
    page = render("t <1>", [("rows", "3")], [Section(
        "s", "Section", "intro & more", images=[Image("fig", png, "a figure")],
        tables=[Table(["a", "text"], [["1", "<script>alert(1)</script>"]], "cap", text_columns=(1,))])])
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert 'id="fig-fig"' in page and 'href="#s"' in page


# --- the command ----------------------------------------------------------------------------------------------

TOPICS = ["python lists", "french cooking", "prime numbers", "poetry", "sql joins", "the moon"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_encoder_dir, tiny_proxy_dir):
    """A small `slap run` work folder (tiny models, slap method) over rows with exact duplicates."""
    tmp = tmp_path_factory.mktemp("report_run")
    rng = random.Random(0)
    rows = []
    for i in range(48):
        words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega"]) for _ in range(rng.randint(3, 10)))
        rows.append({"instruction": f"Explain {TOPICS[i % len(TOPICS)]} #{i}", "input": "",
                     "output": f"It is about {words} <b>bold</b>."})
    rows[9] = dict(rows[2])
    rows[17] = dict(rows[2])
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    work = tmp / "work"
    r = runner.invoke(app, ["run", str(data), "-o", str(tmp / "pruned.jsonl"), "--keep", "0.5", "--workdir",
                            str(work), "--embed-model", str(tiny_encoder_dir), "--proxy-model", str(tiny_proxy_dir),
                            "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    return tmp


def report(args: list) -> object:
    return runner.invoke(app, ["report", *[str(a) for a in args]], catch_exceptions=False)


def test_report_on_a_work_folder_has_every_section(run_dir, tmp_path):
    out, pngs = tmp_path / "report.html", tmp_path / "figures"
    r = report([run_dir / "work", "-o", out, "--png", pngs, "--examples", "2"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == ""
    page = out.read_text()
    for section in ("kept-share", "map", "distributions", "replay", "duplicates", "examples"):
        assert f'<section id="{section}">' in page
    images = re.findall(r'<img id="fig-(\w+)" alt="[^"]*" src="data:image/png;base64,([^"]+)"', page)
    assert [name for name, _ in images] == ["kept_share", "map", "distributions", "replay_loss"]
    for name, data in images:
        assert base64.b64decode(data) == (pngs / f"{name}.png").read_bytes()
        assert base64.b64decode(data).startswith(b"\x89PNG")
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    # The exact duplicate group (rows 2, 9, 17: lines 3, 10, 18) and the rows' text, escaped.
    assert "1 groups of exact duplicates" in page and "2 repeated rows" in page
    assert "pruned: duplicate" in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold</b>" not in page
    assert "most valuable kept rows" in page and "least valuable kept rows" in page
    assert "PROMPT: Explain" in page


def test_report_from_the_selection_finds_its_upstream_artifacts(run_dir, tmp_path):
    out = tmp_path / "r.html"
    r = report([run_dir / "work" / "selection.parquet", "-o", out])
    assert r.exit_code == 0, r.stderr
    page = out.read_text()
    assert "embeddings.parquet" in page and 'id="fig-map"' in page


def test_report_is_the_same_bytes_for_the_same_run_and_seed(run_dir, tmp_path):
    for name in ("a.html", "b.html"):
        assert report([run_dir / "work", "-o", tmp_path / name, "-q"]).exit_code == 0
    assert (tmp_path / "a.html").read_bytes() == (tmp_path / "b.html").read_bytes()


def test_report_to_stdout_is_the_page_alone(run_dir, tmp_path):
    r = report([run_dir / "work", "-o", "-", "-q"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith("<!DOCTYPE html>") and r.stdout.count("<img ") == 4


def test_report_refuses_an_existing_output_and_a_folder_without_a_selection(run_dir, tmp_path):
    out = tmp_path / "r.html"
    out.write_text("old")
    r = report([run_dir / "work", "-o", out])
    assert r.exit_code == 2 and out.read_text() == "old"
    empty = tmp_path / "empty"
    empty.mkdir()
    r = report([empty, "-o", tmp_path / "new.html"])
    assert r.exit_code == 2
    assert "no selection artifact" in r.stderr and "\n" not in r.stderr.strip()


def test_report_without_the_source_still_draws_the_figures(run_dir, tmp_path):
    moved = tmp_path / "work"
    shutil.copytree(run_dir / "work", moved)
    (run_dir / "data.jsonl").rename(tmp_path / "data.jsonl")
    try:
        out = tmp_path / "r.html"
        r = report([moved, "-o", out])
        assert r.exit_code == 0, r.stderr
        page = out.read_text()
        assert "row text not shown" in page and "--input" in page
        assert page.count("<img ") == 4
        r = report([moved, "-o", tmp_path / "r2.html", "--input", tmp_path / "data.jsonl"])
        assert r.exit_code == 0 and "PROMPT: Explain" in (tmp_path / "r2.html").read_text()
    finally:
        (tmp_path / "data.jsonl").rename(run_dir / "data.jsonl")


def test_missing_matplotlib_names_the_extra(run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    from slapcli.report.figures import require_matplotlib

    with pytest.raises(MissingDependencyError, match=r"pip install 'slapcli\[report\]'"):
        require_matplotlib()
    r = report([run_dir / "work", "-o", tmp_path / "r.html"])
    assert r.exit_code == 1
    assert "pip install 'slapcli[report]'" in r.stderr
    assert not (tmp_path / "r.html").exists()


# --- in a browser ---------------------------------------------------------------------------------------------


def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser")) if p), None)


@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH (apt-get install chromium)")
def test_page_renders_in_headless_chromium(run_dir, tmp_path):
    from PIL import Image as PILImage

    out = tmp_path / "report.html"
    assert report([run_dir / "work", "-o", out]).exit_code == 0
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,2400", out.as_uri()],
                   check=True, capture_output=True, timeout=120)
    image = np.asarray(PILImage.open(shot).convert("RGB"))
    assert image.shape[:2] == (2400, 1280)
    # Not blank: much of the page is not background white, and the kept-share bars (the green of "kept") were
    # decoded and painted, which only happens when the inline images load.
    assert (image.min(axis=2) < 200).mean() > 0.05
    green = np.array([int(KEPT_COLOUR[i:i + 2], 16) for i in (1, 3, 5)])
    assert (np.abs(image.astype(int) - green).sum(axis=2) < 30).sum() > 2000
    dom = subprocess.run([*flags, "--dump-dom", out.as_uri()], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    assert dom.count("<img ") == 4 and dom.count("<table") >= 5
    assert all(f'id="{s}"' in dom for s in ("kept-share", "map", "distributions", "replay", "duplicates",
                                             "examples"))


def test_load_run_aligns_every_artifact_by_row(run_dir):
    import pyarrow.parquet as pq

    from slapcli.report.inputs import find_artifacts, load_run

    work = run_dir / "work"
    found = find_artifacts([str(work / "selection.parquet")])
    assert found.strata is not None and found.embeddings is not None
    data = load_run(found)
    n = pq.read_metadata(work / "selection.parquet").num_rows
    for column in (data.kept, data.reason, data.step, data.cluster, data.proxy_loss, data.response_tokens):
        assert len(column) == n
    assert data.embeddings.shape[0] == n
    assert data.kept.sum() == pq.read_table(work / "selection.parquet", columns=["kept"])["kept"].to_numpy().sum()
    has_screen = "screen_score" in pq.read_schema(work / "strata.parquet").names
    assert (data.screen_score is not None) == has_screen


def test_report_refuses_an_upstream_that_changed(run_dir, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(run_dir / "work", work)
    import pyarrow.parquet as pq

    from slapcli.artifacts import read_meta

    # The selection records the strata file it was made from; point it at a copy and alter that copy.
    strata = read_meta(str(work / "selection.parquet")).upstream["path"]
    assert strata == str(run_dir / "work" / "strata.parquet")
    table = pq.read_table(work / "strata.parquet")
    meta = pq.read_metadata(work / "strata.parquet").metadata
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "other_strata.parquet")
    r = report([work / "selection.parquet", tmp_path / "other_strata.parquet", "-o", tmp_path / "r.html"])
    assert r.exit_code == 2  # rows match, but it is not the recorded file: a report of mixed runs is refused
