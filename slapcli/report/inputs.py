"""Finding a run's artifacts (a work folder or artifact paths) and reading the columns the report needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from slapcli.artifacts import ArtifactMeta, check_upstream, read_embeddings, read_meta, read_table
from slapcli.errors import DataError, UsageError

STAGE_FILES = {"embeddings": "embeddings.parquet", "strata": "strata.parquet", "selection": "selection.parquet"}


@dataclass(frozen=True)
class RunArtifacts:
    selection: str
    strata: str | None = None
    embeddings: str | None = None


def find_artifacts(paths: list[str]) -> RunArtifacts:
    """Each path is a work folder (`slap run --workdir`) or an artifact; what is missing is taken from the
    upstream paths recorded in the artifacts, when those files still exist and are the ones recorded."""
    found: dict[str, str] = {}
    for path in paths:
        if os.path.isdir(path):
            for kind, name in STAGE_FILES.items():
                candidate = os.path.join(path, name)
                if os.path.exists(candidate):
                    found.setdefault(kind, candidate)
        else:
            found.setdefault(read_meta(path).kind, path)
    if "selection" not in found:
        raise UsageError(f"no selection artifact in {', '.join(paths)}: run `slap select` (or `slap run`) first, "
                         "or pass the selection.parquet it wrote")
    for child, parent in (("selection", "strata"), ("strata", "embeddings")):
        if child not in found:
            continue
        meta = read_meta(found[child], child)
        if meta.upstream is None:
            continue
        if parent not in found and os.path.exists(meta.upstream["path"]):
            found[parent] = meta.upstream["path"]
        if parent in found:
            # Given or found, it must be the file this one was made from: a page mixing two runs would mislead.
            check_upstream(meta, found[parent], found[child])
    return RunArtifacts(found["selection"], found.get("strata"), found.get("embeddings"))


@dataclass
class RunData:
    """Per input row (selection order = source order), the columns behind the report; None where the artifact
    that holds them was not found."""

    artifacts: RunArtifacts
    selection_meta: ArtifactMeta
    source_meta: ArtifactMeta  # the earliest artifact found: its config says how to read the source again
    row: np.ndarray
    line: np.ndarray
    kept: np.ndarray
    reason: np.ndarray  # str objects
    step: np.ndarray  # float, NaN where not chosen by a replay step
    terms: dict[str, np.ndarray]  # loss (proxy loss when chosen), first_order, curvature, diversity, gain
    cluster: np.ndarray | None = None
    loss_bin: np.ndarray | None = None
    proxy_loss: np.ndarray | None = None  # untrained proxy (strata)
    screen_score: np.ndarray | None = None  # the damage screen's outlier score (strata of schema 2 and later)
    content_hash: np.ndarray | None = None
    response_tokens: np.ndarray | None = None
    embeddings: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.row)


TERM_COLUMNS = ("loss", "first_order", "curvature", "diversity", "gain")


def _floats(table, name: str) -> np.ndarray:
    return table[name].to_numpy(zero_copy_only=False).astype(np.float64)


def _check_rows(rows: np.ndarray, other: np.ndarray, path: str) -> None:
    if not np.array_equal(rows, other):
        raise DataError("its rows are not the selection's rows: pass artifacts of the same run", path)


def load_run(artifacts: RunArtifacts, with_embeddings: bool = True) -> RunData:
    meta = read_meta(artifacts.selection, "selection")
    sel = read_table(artifacts.selection)
    row = sel["row"].to_numpy()
    data = RunData(
        artifacts=artifacts, selection_meta=meta, source_meta=meta, row=row, line=sel["line"].to_numpy(),
        kept=sel["kept"].to_numpy(zero_copy_only=False).astype(bool),
        reason=np.asarray(sel["reason"].to_pylist(), dtype=object),
        step=_floats(sel, "step"), terms={name: _floats(sel, name) for name in TERM_COLUMNS})
    if artifacts.strata:
        data.source_meta = read_meta(artifacts.strata, "strata")
        # Older strata artifacts have no screen column: read it only where it exists.
        screen = [c for c in ("screen_score",) if c in pq.read_schema(artifacts.strata).names]
        strata = read_table(artifacts.strata, ["row", "cluster", "loss_bin", "loss", "content_hash", *screen])
        _check_rows(row, strata["row"].to_numpy(), artifacts.strata)
        data.cluster = strata["cluster"].to_numpy()
        data.loss_bin = strata["loss_bin"].to_numpy()
        data.proxy_loss = _floats(strata, "loss")
        data.content_hash = np.asarray(strata["content_hash"].to_pylist(), dtype=object)
        if screen:
            data.screen_score = _floats(strata, "screen_score")
    if artifacts.embeddings:
        data.source_meta = read_meta(artifacts.embeddings, "embeddings")
        emb = read_table(artifacts.embeddings, ["row", "content_hash", "n_response_tokens"])
        _check_rows(row, emb["row"].to_numpy(), artifacts.embeddings)
        data.response_tokens = emb["n_response_tokens"].to_numpy()
        data.content_hash = np.asarray(emb["content_hash"].to_pylist(), dtype=object)
        if with_embeddings:
            data.embeddings = read_embeddings(artifacts.embeddings)
    return data
