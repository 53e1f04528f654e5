"""`slap report`: read a run's artifacts, compute the numbers, draw the figures, write one HTML page."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np

from slapcli.config import ReportConfig
from slapcli.errors import MissingDependencyError, SlapError, UsageError
from slapcli.io.layouts import Example
from slapcli.io.readers import STDIN as STDOUT  # "-" names stdout for outputs as it names stdin for inputs
from slapcli.io.writers import atomic_path
from slapcli.progress import Reporter
from slapcli.report import figures, numbers
from slapcli.report.inputs import RunData, find_artifacts, load_run
from slapcli.report.neighbours import exact_duplicate_groups, near_duplicate_groups
from slapcli.report.page import Image, Section, Table, render
from slapcli.source import iter_source_rows, source_path

MAP_METHODS = ("auto", "pca", "umap")
SCORE_TERMS = ("first_order", "curvature", "diversity", "gain")


@dataclass
class ReportResult:
    html_path: str
    png_paths: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the page could not show, and why


def _status(data: RunData, pos: int) -> str:
    return "kept" if data.kept[pos] else f"pruned: {data.reason[pos]}"


def _fmt(value: float, digits: int = 3) -> str:
    return "" if not np.isfinite(value) else f"{value:.{digits}f}"


def _cut(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[:chars].rstrip() + " …"


class _Texts:
    """The source rows' text for the positions the page shows, read in one pass over the source."""

    def __init__(self, data: RunData, positions: set[int], config: ReportConfig, reporter: Reporter) -> None:
        self.config = config
        self.by_row: dict[int, Example] = {}
        self.note = ""
        if not positions:
            return
        name = data.artifacts.embeddings or data.artifacts.strata or data.artifacts.selection
        wanted = {int(data.row[p]) for p in positions}
        try:
            path = source_path(data.source_meta, config.input, name)
            for parsed in iter_source_rows(data.source_meta, path, name, wanted):
                self.by_row[parsed.record.index] = parsed.example
        except (SlapError, OSError) as e:
            # The figures do not need the source; the page says why the rows' text is missing.
            self.note = f"row text not shown: {e} (pass --input FILE with the same data)"
            reporter.warn(self.note)

    def text(self, data: RunData, pos: int) -> str:
        example = self.by_row.get(int(data.row[pos]))
        if example is None:
            return ""
        return (f"PROMPT: {_cut(example.prompt_text, self.config.text_chars)}\n"
                f"RESPONSE: {_cut(example.response_text, self.config.text_chars)}")


def _project(x: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, str]:
    if method not in MAP_METHODS:
        raise UsageError(f"--map must be one of {', '.join(MAP_METHODS)}")
    if method in ("auto", "umap"):
        try:
            import umap  # optional: nicer neighbourhoods than PCA, not a dependency
        except ImportError:
            if method == "umap":
                raise MissingDependencyError("--map umap needs umap-learn: pip install umap-learn") from None
        else:
            if len(x) > 15:  # UMAP's default 15 neighbours need more rows than that
                return umap.UMAP(n_components=2, random_state=seed).fit_transform(x), "UMAP"
    return numbers.pca_2d(x), "PCA"


def _summary(data: RunData) -> list[tuple[str, str]]:
    meta = data.selection_meta
    kept = int(data.kept.sum())
    reasons = meta.stats.get("pruned_by_reason", {})
    artifacts = data.artifacts
    return [
        ("source", str(meta.source.get("path"))),
        ("method", f"{meta.config.get('method')} (`slap {meta.command}`, slapcli {meta.tool_version})"),
        ("rows", f"{data.n:,}"),
        ("kept", f"{kept:,} ({kept / max(data.n, 1):.1%})"),
        ("why rows were dropped", ", ".join(f"{k} {v:,}" for k, v in sorted(reasons.items())
                                            if k != "selected" and v) or "none"),
        ("artifacts", ", ".join(p for p in (artifacts.embeddings, artifacts.strata, artifacts.selection) if p)),
    ]


def _share_section(data: RunData) -> Section:
    section = Section("kept-share", "Kept share per cluster and loss bin")
    if data.cluster is None or data.loss_bin is None:
        section.intro = "No strata artifact was found, so clusters and loss bins are unknown."
        return section
    by_cluster = numbers.kept_share(data.cluster, data.kept)
    by_bin = numbers.kept_share(data.loss_bin, data.kept)
    overall = float(data.kept.mean()) if data.n else 0.0
    section.intro = ("Share of each cluster's and each loss bin's rows that were kept; the dashed line is the "
                     "overall share. Water-filling keeps small clusters whole, so they sit above it.")
    section.images.append(Image("kept_share", figures.png_bytes(
        figures.kept_share_figure(by_cluster, by_bin if len(by_bin.group) > 1 else None, overall)),
        "bar charts of the kept share per cluster and per loss bin"))
    section.tables.append(Table(
        ["loss bin", "rows", "kept", "share"],
        [[str(g), f"{r:,}", f"{k:,}", f"{s:.0%}"] for g, r, k, s in
         zip(by_bin.group, by_bin.rows, by_bin.kept, by_bin.share, strict=True)], "per loss bin"))
    return section


def _map_section(data: RunData, config: ReportConfig) -> Section:
    section = Section("map", "Map of the embeddings")
    if data.embeddings is None:
        section.intro = "No embeddings artifact was found, so there is no map."
        return section
    pos = numbers.sample_positions(data.n, config.map_points, config.seed)
    xy, method = _project(data.embeddings[pos], config.map_method, config.seed)
    label = np.where(data.kept[pos], "kept", data.reason[pos]).astype(str)
    section.intro = (f"Each dot is a row, placed by the {method} projection of its sentence embedding, coloured "
                     "kept or by why it was pruned" + (f" ({len(pos):,} of {data.n:,} rows drawn)."
                                                       if len(pos) < data.n else "."))
    section.images.append(Image("map", figures.png_bytes(figures.map_figure(xy, label, method)),
                                f"{method} map of the embeddings, kept and pruned rows"))
    return section


def _distribution_section(data: RunData) -> Section:
    section = Section("distributions", "Distributions, kept vs pruned")
    panels: list[tuple[str, np.ndarray, np.ndarray]] = []
    if data.proxy_loss is not None and np.isfinite(data.proxy_loss).any():
        panels.append(("proxy loss (untrained)", *numbers.split_by_kept(data.proxy_loss, data.kept)))
    if data.response_tokens is not None:
        panels.append(("response length (tokens)", *numbers.split_by_kept(data.response_tokens, data.kept)))
    if data.screen_score is not None and np.isfinite(data.screen_score).any():
        panels.append(("damage screen score", *numbers.split_by_kept(data.screen_score, data.kept)))
    for term in SCORE_TERMS:
        if np.isfinite(data.terms[term]).any():
            panels.append((f"score term: {term}", *numbers.split_by_kept(data.terms[term], data.kept)))
    if not panels:
        section.intro = "Neither proxy losses, response lengths nor replay scores are recorded for this run."
        return section
    section.intro = ("Histograms (each group normalised to area 1). The replay records the terms of the gain only "
                     "for the rows it chose, so the score terms have no pruned curve.")
    section.images.append(Image("distributions", figures.png_bytes(figures.distributions_figure(panels)),
                                "histograms of proxy loss, response length and score terms, kept vs pruned"))
    rows = []
    for title, kept, pruned in panels:
        for group, values in (("kept", kept), ("pruned", pruned)):
            s = numbers.spread(values)
            if s.count:
                rows.append([title, group, f"{s.count:,}", _fmt(s.mean), *(_fmt(s.quantiles[q]) for q in
                                                                             ("p10", "p50", "p90"))])
    section.tables.append(Table(["quantity", "rows", "count", "mean", "p10", "median", "p90"], rows))
    return section


def _replay_section(data: RunData) -> Section:
    section = Section("replay", "The replay's proxy loss over steps")
    curve = numbers.loss_by_step(data.step, data.terms["loss"])
    if len(curve.step) < 2:
        section.intro = (f"Method {data.selection_meta.config.get('method')!r} records no proxy loss per replay "
                         "step (only `--method slap` trains the proxy while it selects).")
        return section
    window = max(1, len(curve.step) // 10)
    smoothed = numbers.rolling_mean(curve.mean_loss, window)
    section.intro = (f"Mean proxy loss of the rows chosen at each of {len(curve.step):,} replay steps, when chosen "
                     f"(the proxy trains on each batch); line: trailing mean over {window} steps. First step "
                     f"{_fmt(curve.mean_loss[0])}, last {_fmt(curve.mean_loss[-1])}.")
    section.images.append(Image("replay_loss", figures.png_bytes(figures.replay_figure(curve, smoothed)),
                                "line chart of the proxy loss over replay steps"))
    return section


def _group_table(data: RunData, groups: list[np.ndarray], texts: _Texts, config: ReportConfig,
                 caption: str) -> Table:
    rows = []
    for i, group in enumerate(groups[:config.groups], start=1):
        kept = int(data.kept[group].sum())
        for pos in group[:config.group_rows]:
            rows.append([f"{i} ({len(group)} rows, {kept} kept)", str(data.line[pos]), _status(data, pos),
                         texts.text(data, pos)])
    return Table(["group", "line", "status", "text"], rows, caption, text_columns=(3,))


def _duplicate_groups(data: RunData, config: ReportConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    exact = exact_duplicate_groups(data.content_hash) if data.content_hash is not None else []
    near: list[np.ndarray] = []
    if data.embeddings is not None:
        first = np.ones(data.n, dtype=bool)
        for g in exact:
            first[g[1:]] = False  # near duplicates differ in text: one row per exact group takes part
        near = near_duplicate_groups(data.embeddings, config.near_duplicate, first)
    return exact, near


def _duplicate_section(data: RunData, exact: list[np.ndarray], near: list[np.ndarray], texts: _Texts,
                       config: ReportConfig) -> Section:
    section = Section("duplicates", "Largest duplicate and near-duplicate groups")
    parts = [f"{len(exact):,} groups of exact duplicates (same prompt and response; "
             f"{sum(len(g) - 1 for g in exact):,} repeated rows)" if data.content_hash is not None
             else "exact duplicates unknown (no strata or embeddings artifact)"]
    if data.embeddings is not None:
        parts.append(f"{len(near):,} groups of near duplicates (embedding cosine >= {config.near_duplicate}, "
                     f"linked in chains, {sum(len(g) for g in near):,} rows)")
    section.intro = "; ".join(parts) + "."
    if exact:
        section.tables.append(_group_table(data, exact, texts, config, "exact duplicates"))
    if near:
        section.tables.append(_group_table(data, near, texts, config, "near duplicates"))
    return section


def _example_section(data: RunData, per_reason: dict[str, np.ndarray], best: np.ndarray, worst: np.ndarray,
                     texts: _Texts) -> Section:
    section = Section("examples", "Example rows")
    section.intro = texts.note or ("A few pruned rows for each reason (drawn at random), and the kept rows with the "
                                   "highest and lowest gain when the replay chose them.")

    def cols(pos: int) -> list[str]:
        loss = data.proxy_loss[pos] if data.proxy_loss is not None else np.nan
        tokens = str(data.response_tokens[pos]) if data.response_tokens is not None else ""
        cluster = str(data.cluster[pos]) if data.cluster is not None else ""
        return [str(data.line[pos]), cluster, _fmt(loss), tokens]

    base = ["line", "cluster", "proxy loss", "response tokens"]
    for reason, positions in per_reason.items():
        section.tables.append(Table([*base, "text"], [[*cols(p), texts.text(data, p)] for p in positions],
                                    f"pruned: {reason}", text_columns=(4,)))
    terms = ("gain", "first_order", "curvature", "diversity", "loss")
    for caption, positions in (("most valuable kept rows", best), ("least valuable kept rows", worst)):
        if len(positions):
            rows = [[*cols(p), *(_fmt(data.terms[t][p], 4) for t in terms), texts.text(data, p)] for p in positions]
            section.tables.append(Table([*base, *terms[:-1], "loss when chosen", "text"], rows, caption,
                                        text_columns=(len(base) + len(terms),)))
    return section


def build_report(paths: list[str], output: str, config: ReportConfig, reporter: Reporter,
                 png_dir: str | None = None) -> ReportResult:
    if not 0.0 < config.near_duplicate <= 1.0:
        raise UsageError("--near-duplicate must be in (0, 1]")
    figures.require_matplotlib()
    data = load_run(find_artifacts(paths))
    reporter.log(f"report on {data.n:,} rows from {data.artifacts.selection}")
    exact, near = _duplicate_groups(data, config)
    per_reason = numbers.examples_per_reason(data.reason, data.kept, config.examples, config.seed)
    best, worst = numbers.most_and_least_valuable(data.terms["gain"], data.kept, config.examples)
    shown = {int(p) for g in (*exact[:config.groups], *near[:config.groups]) for p in g[:config.group_rows]}
    shown |= {int(p) for ps in (*per_reason.values(), best, worst) for p in ps}
    texts = _Texts(data, shown, config, reporter)
    sections = [_share_section(data), _map_section(data, config), _distribution_section(data),
                _replay_section(data), _duplicate_section(data, exact, near, texts, config),
                _example_section(data, per_reason, best, worst, texts)]
    result = ReportResult(output, notes=[texts.note] if texts.note else [])
    page = render(f"slap report: {os.path.basename(str(data.selection_meta.source.get('path')))}",
                  _summary(data), sections)
    if output == STDOUT:
        sys.stdout.write(page)
    else:
        with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
    if png_dir is not None:
        os.makedirs(png_dir, exist_ok=True)
        for image in (img for s in sections for img in s.images):
            path = os.path.join(png_dir, f"{image.name}.png")
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                f.write(image.png)
            result.png_paths.append(path)
    return result
