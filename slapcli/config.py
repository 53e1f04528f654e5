"""Every stage's settings, one dataclass per stage: each default is written here once, and the CLI builds its
options from these fields.

Light on purpose (no numpy, no torch, no models): `slap --help` imports this, not the stages. A stage module
imports its config from here and records `asdict(config)` in its artifact, so a field's name and order are part
of the artifacts' bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_EMBED_MODEL = "all-MiniLM-L6-v2"
DEFAULT_PROXY_MODEL = "SmolLM2-135M-Instruct"
ORDERS = ("source", "selection")  # export --order: the input's order, or the order the rows were chosen in
TARGET_RANKINGS = ("round-robin", "max", "classifier")  # select --target-ranking: slapcli.baselines.target_ranked


@dataclass
class EmbedConfig:
    embed_model: str = DEFAULT_EMBED_MODEL
    proxy_model: str = DEFAULT_PROXY_MODEL  # its tokenizer gives the token counts used downstream
    layout: str = "auto"
    input_format: str | None = None
    on_bad_line: str = "error"
    max_tokens: int = 1024  # proxy tokens per row; longer rows are truncated and counted
    encoder_max_tokens: int = 256  # all-MiniLM-L6-v2 was trained on 256-token inputs
    batch_size: int = 64
    chunk_rows: int = 2048  # rows per streamed chunk, Parquet row group and resumable part
    device: str = "auto"
    resume: bool = True  # reuse the chunks a killed run finished, when made from the same data and settings
    fields: str | None = None  # --fields: which of the row's fields are prompt, response, ... (sets the layout)


@dataclass
class StratifyConfig:
    clusters: int | None = None  # None: round(sqrt(N/2)) clamped to [8, 1024] (and to N)
    loss_bins: int = 3
    proxy_loss: bool = True  # False: strata from clusters alone (no proxy pass; for very large data)
    proxy_model: str = DEFAULT_PROXY_MODEL
    loss_batch_size: int = 16
    dedup: bool = True
    prune_hardest: float = 0.0  # drop this fraction of highest-loss rows (very high loss often means noise)
    # Rows whose embedding has at least this cosine with an earlier row of their cluster are near-copies of it
    # (SemDeDup); 0 turns it off. 0.95: lightly edited copies sit above it, paraphrases of one task below.
    near_dup_cosine: float = 0.95
    # The damage screen (slapcli.screen): flag answers that ignore their prompt, stop mid-sentence or repeat
    # themselves, before the budget is split. Needs the proxy loss; costs one more (prompt-free) proxy pass.
    screen: bool = True
    keep: float | None = 0.7  # budget as a share of the rows; `budget` wins when given
    budget: int | None = None
    allocation: str = "waterfill"
    kmeans_iters: int = 20
    seed: int = 0
    device: str = "auto"


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
    # lost to every random subset (docs/RESULTS_clean300.md). Costs ~30% more selection CPU.
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
    # With --target, slap chooses among the pool rows nearest the dev rows (ranked round-robin over the dev rows, as
    # --method nearest ranks them), this many per kept row: near enough to stay on the task, room for the replay to
    # choose. Strata budgets follow where the nearest kept-size set falls, so the target moves the mix.
    target_candidates: float = 2.0
    # How those candidates are ranked: "round-robin" (each dev row in turn takes its nearest row, as `nearest` does)
    # "max" (each pool row by its best cosine to any dev row, the max over target rows of LESS) or "classifier" (by
    # a dev-vs-pool logistic regression on the embeddings: what sets the dev rows apart from the pool, DSIR's view).
    target_ranking: str = "round-robin"
    target_rows: int = 64  # reference rows when no --target: a fixed stratified sample of the data
    device: str = "auto"
    checkpoint_seconds: float = 300.0  # how often the replay saves its state beside the output
    resume: bool = True  # continue from a checkpoint written with the same settings and strata
    record_timings: bool = False  # store per-phase wall times in stats (the artifact's bytes then vary)
    embeddings: str | None = None  # override the embeddings path recorded in the strata artifact


@dataclass
class ExportConfig:
    order: str = "source"
    input: str | None = None  # overrides the source path recorded in the selection artifact


@dataclass
class ReportConfig:
    near_duplicate: float = 0.9  # embedding cosine at or above which two rows are near duplicates
    examples: int = 3  # rows shown per pruning reason, and as most / least valuable kept rows
    groups: int = 5  # duplicate groups shown, largest first
    group_rows: int = 4  # rows shown per duplicate group
    map_points: int = 20_000  # the map draws a seeded sample of at most this many rows
    map_method: str = "auto"  # UMAP when the umap-learn package is installed, else PCA
    text_chars: int = 400  # prompt and response are each cut to this many characters
    input: str | None = None  # the source data, if not at the recorded path
    seed: int = 0


@dataclass
class DiagnoseConfig:
    layout: str = "auto"
    fields: str | None = None  # --fields: the row's own field names instead of a layout (as `slap embed`)
    input_format: str | None = None
    embed_model: str = DEFAULT_EMBED_MODEL
    embeddings: str | None = None  # an embeddings artifact of the same data, instead of running the encoder
    strata: str | None = None  # a strata artifact of the same data: loss outliers from its proxy losses
    near_duplicate: float = 0.9  # embedding cosine at or above which two distinct rows are near duplicates
    examples: int = 5  # lines listed per finding
    batch_size: int = EmbedConfig.batch_size
    chunk_rows: int = EmbedConfig.chunk_rows
    device: str = "auto"


@dataclass
class RuntimeConfig:
    """The process's threads and scratch folder (slapcli.runtime). Never in an artifact: they change how fast a
    command runs and where its temporary files go, not what it writes."""

    # torch, BLAS and OpenMP threads; None: torch's own default, one per physical core (a fixed count per machine:
    # the thread count can move the proxy's losses by a last bit, docs/PERFORMANCE.md)
    threads: int | None = None
    cache_dir: str | None = None  # the replay's prefix cache and temporary spools; None: beside the output, $TMPDIR


ENGINE_NAMES = ("local", "ray")  # --engine: where a stage's per-chunk work runs (slapcli.engine)


@dataclass
class EngineConfig:
    """Where embed's chunks and the proxy loss passes run. Not a stage's config, never in an artifact: every engine
    writes the same bytes, so a rerun with another engine reuses the artifacts."""

    engine: str = "local"
    workers: int | None = None  # ray: one actor each, with --threads CPUs; None: as many as the cluster holds
    num_gpus: float = 0.0  # ray: GPUs per worker (its models then run there in bf16, as `--device cuda` does)
    address: str | None = None  # ray: the cluster (`auto`, `HOST:6379`, `local`); None: ray.init's own choice
