"""`slap inspect DATA`: before pruning, is there anything worth pruning? Rows, exact and near duplicates,
nearest-neighbour cosine quantiles, suspected damaged rows, and the flags that follow from them.

Embeddings come from the embed stage's encoder (the same model, text and pooling as `slap embed`), or from an
embeddings artifact made from the same data; loss outliers need a strata artifact (its untrained proxy losses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slapcli.artifacts import check_source, read_embeddings, read_meta, read_table
from slapcli.config import DiagnoseConfig
from slapcli.errors import DataError, UsageError
from slapcli.io.layouts import detect_layout
from slapcli.io.readers import ReadStats, SourceReader, iter_examples, record_value
from slapcli.models import load_encoder, pick_device, resolve_model
from slapcli.progress import Reporter
from slapcli.report.damage import damage_kinds
from slapcli.report.neighbours import exact_duplicate_groups, near_duplicate_groups, nearest_neighbour_cosine
from slapcli.report.numbers import quantiles
from slapcli.stages.embed import EmbedConfig, content_hash, encode_texts

# Loss outliers: above Q3 + 3 IQR (Tukey's "far out"), a rule fixed before looking at any data.
OUTLIER_IQR = 3.0
# The suggested --keep stays in this range, in steps of 0.05: below 0.5 a coreset loses coverage whatever the
# pool, and a suggestion above 0.95 would be noise.
KEEP_RANGE = (0.5, 0.95)
# Less than this share of redundant or damaged rows: the pool has little to prune.
LITTLE = 0.02


@dataclass
class Finding:
    rows: int
    lines: list[int]  # the first `examples` lines

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "lines": self.lines}


@dataclass
class Diagnosis:
    path: str
    container: str | None
    layout: str
    rows: int
    records: int
    bad_rows: int
    bad_examples: list[str]
    exact_duplicates: dict[str, Any]  # rows (repeats of an earlier row), groups, largest (lines per group)
    near_duplicates: dict[str, Any]  # threshold, rows (in groups), redundant (rows beyond one per group), ...
    nearest_neighbour_cosine: dict[str, float]  # quantiles over distinct rows
    damaged: dict[str, Finding]  # empty, repeated, refusal, cut_off, and loss_outlier with --strata
    damaged_rows: int  # rows with any kind of damage (a row may show several)
    suggestion: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "damaged"}
        out["damaged"] = {k: f.to_dict() for k, f in self.damaged.items()}
        # JSON has no NaN: quantiles of fewer than 2 distinct rows are null.
        out["nearest_neighbour_cosine"] = {k: None if math.isnan(v) else v
                                           for k, v in self.nearest_neighbour_cosine.items()}
        return {"kind": "data", **out}


def _finding(mask: np.ndarray, lines: np.ndarray, examples: int) -> Finding:
    return Finding(int(mask.sum()), [int(x) for x in lines[mask][:examples]])


def loss_outliers(loss: np.ndarray) -> np.ndarray:
    """Rows whose loss is above Q3 + 3 IQR of the finite losses."""
    finite = np.isfinite(loss)
    if finite.sum() < 4:
        return np.zeros(len(loss), dtype=bool)
    q1, q3 = np.quantile(loss[finite], [0.25, 0.75])
    return finite & (loss > q3 + OUTLIER_IQR * (q3 - q1))


def suggest(path: str, rows: int, redundant: int, damaged: int, outliers: int | None) -> dict[str, Any]:
    """--keep from the share of rows that repeat others or look damaged; --prune-hardest from loss outliers."""
    share = (redundant + damaged) / max(rows, 1)
    keep = min(max(math.floor((1.0 - share) * 20 + 1e-9) / 20, KEEP_RANGE[0]), KEEP_RANGE[1])
    prune_hardest = math.ceil(100 * outliers / max(rows, 1)) / 100 if outliers else 0.0
    why = [f"{redundant:,} rows ({redundant / max(rows, 1):.1%}) repeat another row exactly or nearly, "
           f"{damaged:,} ({damaged / max(rows, 1):.1%}) look damaged"]
    if share < LITTLE:
        why.append("little to prune: a coreset would drop mostly unique rows (on such a pool no subset matched "
                   "full data in docs/BOUND.md); keep most of it")
    if damaged:
        why.append("damaged rows are not dropped by slap's budget on purpose: look at the listed lines, fix or remove "
                   "them first")
    if prune_hardest:
        why.append(f"{outliers:,} rows have outlying proxy loss: --prune-hardest {prune_hardest} drops that share of "
                   "the highest-loss rows")
    elif outliers is None:
        why.append("pass --strata (a strata artifact of this data) to check proxy-loss outliers for --prune-hardest")
    command = (f"slap stratify EMBEDDINGS -o strata.parquet --keep {keep} --prune-hardest {prune_hardest}"
               if prune_hardest else f"slap run {path} -o pruned.jsonl --keep {keep}")
    return {"keep": keep, "prune_hardest": prune_hardest, "command": command, "why": why}


class _Encoder:
    def __init__(self, config: DiagnoseConfig, reporter: Reporter) -> None:
        self.config = config
        self.device = pick_device(config.device)
        ref = resolve_model(config.embed_model)
        reporter.log(f"loading encoder {ref.spec}")
        self.tokenizer, self.model = load_encoder(ref, self.device)

    def __call__(self, texts: list[str]) -> np.ndarray:
        return encode_texts(self.tokenizer, self.model, texts, self.config.batch_size,
                            EmbedConfig.encoder_max_tokens, self.device)


def _artifact_rows(path: str, kind: str, data_path: str, reader: SourceReader, rows: np.ndarray) -> None:
    """Refuse an artifact made from other data or with other read options (its rows must be ours)."""
    meta = read_meta(path, kind)
    assert reader.fingerprint is not None
    check_source(meta, reader.fingerprint, data_path, path)
    theirs = read_table(path, ["row"])["row"].to_numpy()
    if not np.array_equal(theirs, rows):
        raise DataError(f"its rows differ from this read of {data_path} ({len(theirs):,} vs {len(rows):,} rows): "
                        "pass the same --format the artifact was made with", path)


def diagnose(path: str, config: DiagnoseConfig, reporter: Reporter) -> Diagnosis:
    if not 0.0 < config.near_duplicate <= 1.0:
        raise UsageError("--near-duplicate must be in (0, 1]")
    index, lines, hashes, kinds, vectors, texts = [], [], [], [], [], []
    layout = f"--fields {config.fields}" if config.fields else config.layout
    stats = ReadStats()
    with SourceReader(path, config.input_format) as reader:  # a missing file fails here, before any model loads
        encoder = None if config.embeddings else _Encoder(config, reporter)
        with reporter.progress(f"inspect {reader.name}", reader.total_bytes, unit="bytes") as bar:
            # Bad rows are counted, not fatal: a diagnosis should say how many there are.
            for parsed in iter_examples(reader, config.layout, "skip", stats, config.fields):
                example = parsed.example
                if not index and layout == "auto":
                    layout = detect_layout(record_value(parsed.record)) or layout
                index.append(parsed.record.index)
                lines.append(parsed.record.line)
                hashes.append(content_hash(example))
                kinds.append(damage_kinds(example.response_text))
                if encoder is not None:
                    texts.append(example.full_text)
                    if len(texts) == config.chunk_rows:
                        vectors.append(encoder(texts))
                        texts = []
                bar.update(completed=reader.bytes_read, rows_done=len(index))
            if encoder is not None and texts:
                vectors.append(encoder(texts))
        rows = np.asarray(index, dtype=np.int64)
        if config.embeddings:
            _artifact_rows(config.embeddings, "embeddings", path, reader, rows)
            embeddings = read_embeddings(config.embeddings)
        else:
            embeddings = np.concatenate(vectors)
        loss = None
        if config.strata:
            _artifact_rows(config.strata, "strata", path, reader, rows)
            loss = read_table(config.strata, ["loss"])["loss"].to_numpy(zero_copy_only=False).astype(np.float64)
        container = reader.container
    line = np.asarray(lines, dtype=np.int64)
    n = len(rows)

    exact = exact_duplicate_groups(hashes)
    distinct = np.ones(n, dtype=bool)
    for g in exact:
        distinct[g[1:]] = False
    near = near_duplicate_groups(embeddings, config.near_duplicate, distinct)
    nn = nearest_neighbour_cosine(embeddings[distinct])

    damaged: dict[str, Finding] = {}
    any_damage = np.zeros(n, dtype=bool)
    for kind in ("empty", "repeated", "refusal", "cut_off"):
        mask = np.array([kind in k for k in kinds], dtype=bool)
        any_damage |= mask
        damaged[kind] = _finding(mask, line, config.examples)
    outliers = None
    if loss is not None:
        mask = loss_outliers(loss)
        damaged["loss_outlier"] = _finding(mask, line, config.examples)
        outliers = int(mask.sum())

    repeats = int(n - distinct.sum())
    near_redundant = sum(len(g) - 1 for g in near)
    return Diagnosis(
        path=path, container=container, layout=layout, rows=n, records=stats.records,
        bad_rows=stats.bad_skipped, bad_examples=stats.bad_examples,
        exact_duplicates={"rows": repeats, "groups": len(exact),
                          "largest": [[int(x) for x in line[g][:config.examples]] for g in exact[:config.examples]]},
        near_duplicates={"threshold": config.near_duplicate, "rows": sum(len(g) for g in near),
                         "redundant": near_redundant, "groups": len(near),
                         "largest": [[int(x) for x in line[g][:config.examples]] for g in near[:config.examples]]},
        nearest_neighbour_cosine=quantiles(nn),
        damaged=damaged, damaged_rows=int(any_damage.sum()),
        suggestion=suggest(path, n, repeats + near_redundant, int(any_damage.sum()), outliers),
    )
