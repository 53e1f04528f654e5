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
from slapcli.models import DEFAULT_PROXY_MODEL
from slapcli.progress import Reporter
from slapcli.slapmath import group_positions, stratum_nn_scale
from slapcli.target import embed_target, read_target_examples


@dataclass
class SelectConfig:
    method: str = "slap"
    keep: float | None = None  # None: the budget recorded by `stratify`
    budget: int | None = None
    allocation: str | None = None  # None: the allocation recorded by `stratify`
    seed: int = 0
    batch_size: int = 8  # rows per replay batch (b)
    pool_factor: int = 4  # candidates per batch = pool_factor * batch_size (c)
    diversity: float = 0.1  # gamma: weight of the relative-distance term, in units of the batch's score spread
    diversity_clip: float = 2.0
    # proxy replay (method "slap")
    proxy_model: str = DEFAULT_PROXY_MODEL
    proj_dim: int = 1024
    refresh: int = 4  # replay steps a candidate's gradient feature is reused before it is recomputed
    # Replay steps between recomputations of the target direction under the current proxy. Every 4 steps, as the
    # candidates' features: at 25, the 26-step replay of the quality benchmark computed it at steps 0 and 25 only,
    # so the scores aimed at what the untrained proxy lacked, not at what the trained one still lacks, and slap
    # lost to every random subset (docs/RESULTS.md). Costs ~30% more selection CPU.
    target_refresh: int = 4
    lr: float = 1e-4  # proxy learning rate (AdamW); the score's eta is set by `eta`, in feature units
    trainable_blocks: int = 2  # the last decoder blocks get trained and give the gradient features
    damping: float = 0.1  # curvature damping, relative to the mean curvature
    feature_norm: str = "unit"  # "unit": directions (cosine), "tokens": sqrt(n)-weighted directions, "raw"
    eta: str = "target"  # step of the batch score: "target" (Newton step along g*) or "row" (median per row)
    # Multiplies that step. Above 1 the curvature term weighs more: U(B) then peaks at a batch mean shorter than
    # the target's, i.e. batches whose rows' gradients cancel more (less redundant), below 1 at more aligned ones.
    eta_scale: float = 1.0
    # Weight of each row's log(response tokens / mean) in the batch score, in units of the pool's score spread:
    # inside a stratum, a longer response has more to teach than the one-step score sees (replay.response_content).
    length_prior: float = 0.0
    curvature: bool = True  # False drops the second-order term of the batch score (an ablation)
    max_tokens: int | None = None  # None: the --max-tokens recorded by `embed`
    target: str | None = None  # dev file whose rows define the target direction
    target_rows: int = 64  # reference rows when no --target: a fixed stratified sample of the data
    device: str = "auto"
    checkpoint_seconds: float = 300.0  # how often the replay saves its state beside the output
    resume: bool = True  # continue from a checkpoint written with the same settings and strata
    record_timings: bool = False  # store per-phase wall times in stats (the artifact's bytes then vary)
    embeddings: str | None = None  # override the embeddings path recorded in the strata artifact
    extra: dict[str, Any] = field(default_factory=dict)


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
