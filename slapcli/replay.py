"""The SLAP replay (METHOD.md stage 3): train a proxy on the batches as they are chosen.

Each step draws a stratified candidate pool, computes the candidates' projected gradient features under
the proxy's current state (the last decoder blocks are the trainable part), scores batches by the
second-order predicted drop of the target loss plus relative-distance diversity, composes one batch
greedily, and takes one AdamW step of the proxy on it. The proxy's parts are in `slapcli.proxy.split`, the
score's math in `slapcli.slapmath`; this module is the loop, its state and its checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slapcli.io.readers import ParsedRow, file_fingerprint
from slapcli.io.writers import discard, temp_path_beside
from slapcli.methods.base import Choice, SelectConfig, SelectionJob
from slapcli.methods.pool import StratifiedPool
from slapcli.models import load_causal_lm, pick_device, pick_dtype, resolve_model
from slapcli.proxy.chat import EncodedExample, encode_examples
from slapcli.proxy.split import PrefixCache, SplitProxy, row_features, train_step
from slapcli.runtime import scratch_dir
from slapcli.slapmath import (
    CurvatureState,
    GradientProjector,
    curvature_diagonal,
    greedy_batch,
    score_step,
    score_unit,
    single_scores,
    stratified_sample,
    update_curvature,
)
from slapcli.source import iter_source_rows, source_path
from slapcli.target import read_target_examples

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

RowKey = int | tuple[str, int]  # a strata position, or ("target", i) for the i-th --target dev row
TIMED_PHASES = ("features", "target", "greedy", "train")
# Settings that do not change the result: a checkpoint written under other values of these is resumed.
NOT_IN_CHECKPOINT_KEY = ("checkpoint_seconds", "resume", "device", "record_timings")


@dataclass
class ReplayState:
    """What the replay carries from step to step besides the proxy's weights, its optimizer and the pool.

    Its checkpoint holds those too (`save`/`load`), so a killed replay resumes where it stopped and ends with
    the same bytes as an uninterrupted one."""

    target: torch.Tensor  # the target direction g*, float64 [D]
    curvature: CurvatureState
    step: int = 0
    choices: list[Choice] = field(default_factory=list)
    # position -> (step its feature was computed at, feature, loss), reused for `refresh` steps
    feature_cache: dict[int, tuple[int, torch.Tensor, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMED_PHASES, 0.0))

    @classmethod
    def fresh(cls, dim: int) -> ReplayState:
        return cls(torch.zeros(dim, dtype=torch.float64), CurvatureState.empty(dim))

    def save(self, path: str, key: str, pool: StratifiedPool, split: SplitProxy,
             optimizer: torch.optim.Optimizer) -> None:
        """Atomically: a kill during the write leaves the previous checkpoint intact."""
        cache = self.feature_cache
        state = {
            "key": key, "step": self.step, "target": self.target, "curv_sum": self.curvature.sum_sq,
            "curv_count": self.curvature.count,
            "choices": [[c.position, c.step, c.batch, c.loss, c.first_order, c.curvature, c.diversity, c.gain]
                        for c in self.choices],
            "remaining": torch.from_numpy(pool.remaining.copy()),
            "queues": [list(q) for q in pool.queues],
            "fc_pos": list(cache), "fc_born": [v[0] for v in cache.values()],
            "fc_feat": [v[1] for v in cache.values()], "fc_loss": [v[2] for v in cache.values()],
            "params": [p.detach().clone() for p in split.parameters],
            "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
            "timings": self.timings,
        }
        tmp = temp_path_beside(path)
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        except BaseException:
            discard(tmp)
            raise

    @classmethod
    def load(cls, path: str, key: str, pool: StratifiedPool, split: SplitProxy,
             optimizer: torch.optim.Optimizer) -> ReplayState | None:
        """The state saved at `path` under `key`, with the pool, weights, optimizer and torch RNG put back as they
        were; None (nothing changed) when it was written with other settings or data, or cannot be read."""
        try:
            with warnings.catch_warnings():  # torch's remarks on a file that is not its own: it is refused anyway
                warnings.simplefilter("ignore")
                state = torch.load(path, weights_only=True)  # our own file, and still no unpickling of code
        except Exception:  # damaged or not ours (unpickling, zip, EOF errors): resume state, so start over
            return None
        if not isinstance(state, dict) or state.get("key") != key:
            return None
        pool.remaining = state["remaining"].numpy().astype(np.int64)
        pool.queues = [deque(q) for q in state["queues"]]
        with torch.no_grad():
            for param, saved in zip(split.parameters, state["params"], strict=True):
                param.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        return cls(
            target=state["target"], curvature=CurvatureState(state["curv_sum"], state["curv_count"]),
            step=state["step"], choices=[Choice(int(c[0]), int(c[1]), int(c[2]), *c[3:]) for c in state["choices"]],
            feature_cache={int(p): (int(b), f, float(loss)) for p, b, f, loss in
                           zip(state["fc_pos"], state["fc_born"], state["fc_feat"], state["fc_loss"], strict=True)},
            timings=dict(state["timings"]))


def run_replay(job: SelectionJob, pool: StratifiedPool, embeddings: np.ndarray,
               scales: np.ndarray) -> tuple[list[Choice], dict[str, Any]]:
    """Choose every row the pool's budgets allow, one replay step (one batch) at a time: (choices, stats)."""
    config, reporter = job.config, job.reporter
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed + 1)
    device = pick_device(config.device)
    ref = resolve_model(config.proxy_model)
    reporter.log(f"loading proxy {ref.spec}")
    tokenizer, model = load_causal_lm(ref, device, pick_dtype(device))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    max_tokens = int(config.max_tokens or job.strata_meta.config.get("max_tokens", 1024))
    split = SplitProxy(model, config.trainable_blocks)
    model.train()
    optimizer = torch.optim.AdamW(split.parameters, lr=config.lr, weight_decay=0.0)

    encoded: dict[RowKey, EncodedExample] = dict(_encode_rows(job, pool.eligible, tokenizer, max_tokens))
    # Norm "tokens" weighs a row's direction by sqrt(n / n_ref): n_ref is the data's mean response length, fixed
    # for the whole replay so that features of different steps stay on one scale.
    reference_tokens = float(np.mean([e.n_response_tokens for e in encoded.values()])) if encoded else 1.0
    target_keys: list[RowKey]
    if config.target:
        target_rows = encode_examples(tokenizer, read_target_examples(config.target, config.target_rows), max_tokens)
        target_keys = [("target", i) for i in range(len(target_rows))]
        encoded.update(zip(target_keys, target_rows, strict=True))
    else:
        target_keys = [int(p) for p in stratified_sample(job.stratum, pool.eligible, config.target_rows, rng)]

    # Hidden states spill to an anonymous file in --cache-dir, else beside the output: the user chose that disk.
    # Rows whose frozen-prefix states stratify's loss pass kept are read from its store (slapcli.proxy.prefix_store).
    cache = PrefixCache(split, encoded, pad_id, device, spill_dir=scratch_dir(job.output_path),
                        model_identity=ref.identity)
    projector = GradientProjector(model, split.linears, config.proj_dim, seed=config.seed)
    total = pool.left
    ckpt_path = checkpoint_path(job.output_path)
    ckpt_key = checkpoint_key(config, job.strata_path)
    state = ReplayState.fresh(projector.dim)
    if config.resume and os.path.exists(ckpt_path):
        saved = ReplayState.load(ckpt_path, ckpt_key, pool, split, optimizer)
        if saved is None:
            reporter.warn(f"{ckpt_path} was written with other settings or data, or is damaged: starting over")
        else:
            state = saved
            reporter.log(f"resuming from {ckpt_path}: step {state.step}, {len(state.choices):,} rows chosen")
    last_save = time.monotonic()
    step = _ReplayStep(config, pool, split, cache, projector, optimizer, embeddings, scales, target_keys,
                       reference_tokens, encoded)
    try:
        with reporter.progress("select (slap replay)", total) as bar:
            bar.update(advance=len(state.choices), rows_done=len(state.choices))
            while pool.left > 0:
                chosen = step(state)
                bar.update(advance=chosen, rows_done=len(state.choices))
                if pool.left > 0 and time.monotonic() - last_save >= config.checkpoint_seconds:
                    state.save(ckpt_path, ckpt_key, pool, split, optimizer)
                    last_save = time.monotonic()
    finally:
        projector.close()
        cache.close()
    reporter.log("replay time: " + ", ".join(f"{k} {v:.1f} s" for k, v in state.timings.items()))
    # Logged, not in stats: the artifact's bytes must not depend on what the cache held.
    reporter.log(f"frozen prefix: {cache.computed:,} rows computed, {cache.reused:,} read from "
                 "stratify's store")
    stats: dict[str, Any] = {"replay_steps": state.step, "proj_dim": projector.dim,
                             "trainable_linears": len(split.linears), "target_rows": len(target_keys),
                             "reference_response_tokens": round(reference_tokens, 3)}
    if config.record_timings:  # wall times differ run to run: only on request, so equal runs give equal bytes
        stats["seconds"] = {k: round(v, 3) for k, v in state.timings.items()}
    return state.choices, stats


@dataclass
class _ReplayStep:
    """One replay step: refresh the target, score a candidate pool, choose a batch, train on it."""

    config: SelectConfig
    pool: StratifiedPool
    split: SplitProxy
    cache: PrefixCache
    projector: GradientProjector
    optimizer: torch.optim.Optimizer
    embeddings: np.ndarray
    scales: np.ndarray
    target_keys: list[RowKey]
    reference_tokens: float
    encoded: dict[RowKey, EncodedExample]

    def __call__(self, state: ReplayState) -> int:
        """Advance `state` by one step; returns the number of rows chosen."""
        config, pool, feature_cache, step = self.config, self.pool, state.feature_cache, state.step
        t0 = time.perf_counter()
        if step % max(1, config.target_refresh) == 0:
            feats, _ = row_features(self.split, self.cache, self.projector, self.target_keys, config.feature_norm,
                                    self.reference_tokens)
            state.target = feats.double().mean(0)
        target = state.target
        t1 = time.perf_counter()
        candidates = pool.draw(config.pool_factor * config.batch_size)
        stale = [int(p) for p in candidates.tolist()
                 if p not in feature_cache or step - feature_cache[p][0] >= config.refresh]
        if stale:
            feats, losses = row_features(self.split, self.cache, self.projector, stale, config.feature_norm,
                                         self.reference_tokens)
            state.curvature = update_curvature(state.curvature, feats)
            for p, f, loss in zip(stale, feats, losses.tolist(), strict=True):
                feature_cache[p] = (step, f, loss)
        t2 = time.perf_counter()
        pool_feats = torch.stack([feature_cache[int(p)][1] for p in candidates]).double()
        h = curvature_diagonal(state.curvature, config.damping)
        if not config.curvature:  # first-order + diversity only
            h = torch.zeros_like(h)
        eta = config.eta_scale * score_step(config.eta, pool_feats, target, h)
        unit = score_unit(single_scores(pool_feats, target, h, eta))  # diversity and length prior are in these units
        gamma = config.diversity * unit
        b = min(config.batch_size, pool.left)
        groups, caps = pool.caps(candidates)
        content = None
        if config.length_prior:
            content = config.length_prior * unit * torch.from_numpy(
                response_content(self.encoded, candidates, self.reference_tokens))
        result = greedy_batch(pool_feats, target, h, eta, gamma, torch.from_numpy(self.embeddings[candidates]),
                              torch.from_numpy(self.scales[candidates]), b, config.diversity_clip,
                              groups=torch.from_numpy(groups), group_caps=torch.from_numpy(caps), content=content)
        t3 = time.perf_counter()
        chosen_positions = [int(candidates[j]) for j in result.chosen]
        for k, pos in enumerate(chosen_positions):
            state.choices.append(Choice(pos, step, step, feature_cache[pos][2], result.first_order[k],
                                        result.curvature[k], result.diversity[k], result.gains[k]))
        # Candidates whose features stay fresh next step are offered again; the rest rotate out.
        fresh = {p for p in candidates.tolist() if step + 1 - feature_cache[p][0] < config.refresh}
        pool.settle(candidates, result.chosen, retain=fresh)
        train_step(self.split, self.cache, self.optimizer, chosen_positions, self.projector)
        # Chosen rows leave the pool, and features past their refresh age would be recomputed anyway.
        for p in chosen_positions:
            feature_cache.pop(p, None)
        for p in [p for p, (born, _, _) in feature_cache.items() if step + 1 - born >= config.refresh]:
            del feature_cache[p]
        t4 = time.perf_counter()
        for key, dt in zip(TIMED_PHASES, (t2 - t1, t1 - t0, t3 - t2, t4 - t3), strict=True):
            state.timings[key] += dt
        state.step = step + 1
        return len(chosen_positions)


def _encode_rows(job: SelectionJob, eligible: np.ndarray, tokenizer: PreTrainedTokenizerBase,
                 max_tokens: int) -> dict[int, EncodedExample]:
    """Token ids of every eligible row by strata position, kept as compact numpy arrays (not padded tensors)."""
    rows = job.table["row"].to_numpy()
    position_of_row = {int(r): i for i, r in enumerate(rows.tolist())}
    src = source_path(job.strata_meta, job.input_override, job.strata_path)
    encoded: dict[int, EncodedExample] = {}
    wanted = set(rows[eligible].tolist())
    with job.reporter.progress("tokenize", len(wanted)) as bar:
        chunk: list[ParsedRow] = []
        for parsed in iter_source_rows(job.strata_meta, src, job.strata_path, wanted):
            chunk.append(parsed)
            if len(chunk) == 1024:
                _encode_chunk(chunk, tokenizer, max_tokens, position_of_row, encoded)
                bar.update(advance=len(chunk), rows_done=len(encoded))
                chunk = []
        _encode_chunk(chunk, tokenizer, max_tokens, position_of_row, encoded)
    return encoded


def response_content(encoded: dict[RowKey, EncodedExample], positions: np.ndarray,
                     reference_tokens: float) -> np.ndarray:
    """log(response tokens / reference_tokens) per row: the content term of `--length-prior`, before its weight.

    Why: the batch score is a one-step quantity on per-row MEAN losses, so it is blind to how much a row has to
    teach over the whole run, and inside one stratum (same topic, same loss level) that grows with the number of
    response tokens. On the quality benchmark the longest rows of each stratum trained better than random at
    keep 0.7 (not at 0.6), and the longest rows overall (coverage lost) worse (docs/RESULTS_clean300.md); Zhao et
    al. 2024 ("Long Is More for Alignment") report long responses helping instruction tuning. The log keeps a 2x
    longer row worth one fixed step.
    """
    counts = np.array([max(1, encoded[int(p)].n_response_tokens) for p in positions.tolist()], dtype=np.float64)
    return np.log(counts / reference_tokens)


def checkpoint_path(output_path: str) -> str:
    return output_path + ".ckpt"


def checkpoint_key(config: SelectConfig, strata_path: str) -> str:
    """What a checkpoint must match to be resumed: every setting that changes the result, and the strata."""
    settings = {k: v for k, v in asdict(config).items() if k not in NOT_IN_CHECKPOINT_KEY}
    blob = json.dumps([settings, file_fingerprint(strata_path).to_dict()], sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def _encode_chunk(chunk: list[ParsedRow], tokenizer: PreTrainedTokenizerBase, max_tokens: int,
                  position_of_row: dict[int, int], out: dict[int, EncodedExample]) -> None:
    if not chunk:
        return
    for parsed, enc in zip(chunk, encode_examples(tokenizer, [p.example for p in chunk], max_tokens), strict=True):
        # int32 / bool arrays: 5 bytes a token instead of a Python list's 8-byte pointer plus an int object.
        out[position_of_row[parsed.record.index]] = dataclasses.replace(
            enc, input_ids=np.asarray(enc.input_ids, dtype=np.int32),
            response_mask=np.asarray(enc.response_mask, dtype=bool))
