"""What every selection method shares: the select settings, the job a method gets, the chosen rows it returns.

A method is a top-level function `(SelectionJob) -> MethodResult` named in `slapcli.methods.registry`. The job holds
the strata artifact, the eligible rows and the per-stratum budgets `select` worked out; the method only chooses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
from threadpoolctl import threadpool_limits

from slapcli.artifacts import ArtifactMeta, check_upstream, read_embeddings, read_meta
from slapcli.config import SelectConfig
from slapcli.progress import Reporter
from slapcli.slapmath import group_positions, stratum_nn_scale
from slapcli.target import embed_target, read_target_examples


@dataclass
class Choice:
    """One chosen row and the terms of the marginal gain that chose it."""

    position: int  # index into the strata table
    step: int
    batch: int
    loss: float | None = None
    first_order: float | None = None
    curvature: float | None = None
    diversity: float | None = None
    gain: float | None = None


@dataclass
class Selection:
    """The chosen rows as columns, in selection order (NaN where a term does not apply).

    Methods that choose hundreds of thousands of rows build these arrays directly; a list of `Choice`
    objects would cost seconds of Python per million rows.
    """

    position: np.ndarray  # int64 index into the strata table
    step: np.ndarray  # int32
    batch: np.ndarray  # int32
    terms: dict[str, np.ndarray] = field(default_factory=dict)  # loss, first_order, ...: float32, NaN = none

    def __len__(self) -> int:
        return len(self.position)

    @classmethod
    def plain(cls, positions: np.ndarray) -> Selection:
        """Rows chosen without a score (random, stratified): no step, batch 0, no terms."""
        zeros = np.zeros(len(positions), dtype=np.int32)
        return cls(np.asarray(positions, dtype=np.int64), zeros, zeros.copy())

    @classmethod
    def from_choices(cls, choices: list[Choice]) -> Selection:
        def column(name: str) -> np.ndarray:
            return np.array([np.nan if (v := getattr(c, name)) is None else v for c in choices], dtype=np.float32)

        return cls(np.array([c.position for c in choices], dtype=np.int64),
                   np.array([c.step for c in choices], dtype=np.int32),
                   np.array([c.batch for c in choices], dtype=np.int32),
                   {name: column(name) for name in TERMS})


TERMS = ("loss", "first_order", "curvature", "diversity", "gain")


@dataclass
class SelectionJob:
    """One selection to make: the strata artifact, which rows may be chosen and how many per stratum."""

    strata_meta: ArtifactMeta
    strata_path: str
    table: pa.Table  # the strata table
    eligible: np.ndarray  # bool per strata row: may be chosen
    budgets: np.ndarray  # rows to choose per stratum (methods that ignore strata choose their sum)
    config: SelectConfig
    reporter: Reporter
    rng: np.random.Generator  # seeded with config.seed; the one source of randomness of the job
    input_override: str | None  # --input: the source file when it moved
    output_path: str  # where the selection goes (the replay keeps its checkpoint and spill files beside it)

    @property
    def m(self) -> int:
        return int(self.budgets.sum())

    @property
    def stratum(self) -> np.ndarray:
        return self.table["stratum"].to_numpy()

    def embeddings(self) -> np.ndarray:
        return load_embeddings(self.strata_meta, self.strata_path, self.config.embeddings)

    def embeddings_config(self) -> dict[str, Any]:
        """The settings the embeddings were made with (encoder, max tokens), to embed other rows the same way."""
        assert self.strata_meta.upstream is not None
        return read_meta(self.config.embeddings or self.strata_meta.upstream["path"], "embeddings").config

    def target_embeddings(self) -> np.ndarray:
        """The --target dev rows' embeddings, by the encoder and settings of the pool's embeddings."""
        assert self.config.target is not None
        return embed_target(read_target_examples(self.config.target, self.config.target_rows),
                            self.embeddings_config(), self.config.device)

    def losses(self) -> np.ndarray:
        """stratify's proxy loss per strata row (float32, NaN where not computed)."""
        return self.table["loss"].to_numpy(zero_copy_only=False).astype(np.float32)


@dataclass
class MethodResult:
    selection: Selection
    stats: dict[str, Any] = field(default_factory=dict)  # merged into the artifact's stats
    # Files of the method's own (a checkpoint) to delete once the artifact is written: it then holds all they did.
    leftovers: tuple[str, ...] = ()


class Method(Protocol):
    def __call__(self, job: SelectionJob) -> MethodResult: ...


def ranked_selection(positions: np.ndarray, batch_size: int, terms: dict[str, np.ndarray]) -> Selection:
    """Rows chosen in one ranked pass, cut into batches of `batch_size` in that order."""
    batch = (np.arange(len(positions)) // batch_size).astype(np.int32)
    columns = {name: np.full(len(positions), np.nan, dtype=np.float32) for name in TERMS}
    columns.update({name: np.asarray(values, dtype=np.float32) for name, values in terms.items()})
    return Selection(np.asarray(positions, dtype=np.int64), batch, batch.copy(), columns)


def members_by_stratum(stratum: np.ndarray, eligible: np.ndarray) -> dict[int, np.ndarray]:
    positions = np.flatnonzero(eligible)
    return {s: positions[part] for s, part in group_positions(stratum[positions]).items()}


def load_embeddings(strata_meta: ArtifactMeta, strata_path: str, override: str | None) -> np.ndarray:
    assert strata_meta.upstream is not None
    path = override or strata_meta.upstream["path"]
    check_upstream(strata_meta, path, strata_path)
    return read_embeddings(path)




def stratum_scales(job: SelectionJob, embeddings: np.ndarray) -> np.ndarray:
    """Per strata row, its stratum's typical nearest-neighbour distance (the unit of the diversity terms)."""
    stratum = job.stratum
    with threadpool_limits(1, "blas"):  # small per-stratum products: threads add no speed (see select_embedding)
        scale_by_stratum = stratum_nn_scale(embeddings, np.where(job.eligible, stratum, -1), seed=job.config.seed)
    scale_of = np.ones(int(stratum.max()) + 1, dtype=np.float32)
    scale_of[list(scale_by_stratum)] = list(scale_by_stratum.values())
    return scale_of[stratum]
