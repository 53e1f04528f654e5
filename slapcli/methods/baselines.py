"""The published baselines `slap` must beat, as methods: the choices themselves are the pure functions of
`slapcli.baselines`; here they get their inputs from the job. They ignore the strata (ccs has its own) and choose
the whole budget. `loss` records each kept row's proxy loss; `gain` the score that ranked it."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from slapcli.baselines import ccs_order, ifd_order, ifd_scores, kcenter_order, middle_loss_order, nearest_order
from slapcli.errors import UsageError
from slapcli.io.readers import file_fingerprint
from slapcli.io.writers import atomic_path
from slapcli.methods.base import MethodResult, SelectionJob, ranked_selection
from slapcli.models import cache_dir, resolve_model
from slapcli.proxy.passes import LossPass, proxy_losses
from slapcli.screen import without_prompt
from slapcli.source import source_path


def select_nearest(job: SelectionJob) -> MethodResult:
    """Pool rows nearest to the --target dev rows in embedding space, round-robin over the dev rows; `gain`
    records each row's cosine with the dev row that took it."""
    embeddings, target_emb = job.embeddings(), job.target_embeddings()
    positions = nearest_order(target_emb, embeddings, job.eligible, job.m)
    cosine = (embeddings[positions] @ target_emb.T).max(1) if len(positions) else np.zeros(0, dtype=np.float32)
    return MethodResult(ranked_selection(positions, job.config.batch_size, {"gain": cosine}))


def select_kcenter(job: SelectionJob) -> MethodResult:
    positions, gaps = kcenter_order(job.embeddings(), job.eligible, job.m, job.rng)
    return MethodResult(ranked_selection(positions, job.config.batch_size, {"diversity": gaps, "gain": gaps}))


def select_ccs(job: SelectionJob) -> MethodResult:
    loss = _ranking_losses(job)
    positions = ccs_order(loss, job.eligible, job.m, job.rng)
    return MethodResult(ranked_selection(positions, job.config.batch_size, {"loss": loss[positions]}))


def select_loss(job: SelectionJob) -> MethodResult:
    loss = _ranking_losses(job)
    positions = middle_loss_order(loss, job.eligible, job.m)
    return MethodResult(ranked_selection(positions, job.config.batch_size, {"loss": loss[positions]}))


def select_ifd(job: SelectionJob) -> MethodResult:
    """IFD needs each row's response loss without its prompt: recorded by stratify's damage screen when it ran,
    else one prompt-free pass of the proxy (cached)."""
    loss = _ranking_losses(job)
    table, eligible, config, strata_meta = job.table, job.eligible, job.config, job.strata_meta
    direct = None
    if "direct_loss" in table.column_names:  # stratify's damage screen scored the answers without their prompts
        recorded = table["direct_loss"].to_numpy(zero_copy_only=False).astype(np.float32)
        if not np.isnan(recorded[eligible]).any():
            direct = recorded
    if direct is None:
        loss_pass = LossPass(strata_meta.config.get("proxy_model", config.proxy_model),
                             int(config.max_tokens or strata_meta.config.get("max_tokens", 1024)),
                             int(strata_meta.config.get("loss_batch_size", 16)), config.device,
                             label="response loss without prompt")
        direct = _direct_losses(job, table["row"].to_numpy(), loss_pass)
    ifd = ifd_scores(loss, direct)
    positions = ifd_order(ifd, eligible, job.m)
    terms = {"loss": loss[positions], "gain": ifd[positions]}
    return MethodResult(ranked_selection(positions, config.batch_size, terms))


def _ranking_losses(job: SelectionJob) -> np.ndarray:
    loss = job.losses()
    if np.isnan(loss[job.eligible]).all() and job.eligible.any():
        raise UsageError(f"--method {job.config.method} ranks rows by proxy loss, but {job.strata_path} has none "
                         "(it was stratified with --no-proxy-loss); stratify again with the proxy loss on")
    return loss


def _direct_losses(job: SelectionJob, rows: np.ndarray, loss_pass: LossPass) -> np.ndarray:
    """IFD's prompt-free response losses, cached per (strata file, proxy, max tokens) in the slapcli cache.

    The pass costs as much as stratify's loss pass and does not depend on --keep, so trying several keep ratios
    (as the quality benchmark does) pays for it once. The strata file's fingerprint covers the source data.
    """
    identity = resolve_model(loss_pass.proxy_model).identity
    strata_meta, strata_path, eligible, reporter = job.strata_meta, job.strata_path, job.eligible, job.reporter
    key = hashlib.blake2b(json.dumps([file_fingerprint(strata_path).to_dict(), identity, loss_pass.max_tokens,
                                      "ifd-direct-v1"]).encode(), digest_size=16).hexdigest()
    cached = cache_dir() / "ifd" / f"{key}.npy"
    if cached.exists():
        direct = np.load(cached, allow_pickle=False)
        if direct.shape == rows.shape:
            reporter.log(f"prompt-free losses from the cache ({cached})")
            return direct
    direct = np.full(len(rows), np.nan, dtype=np.float32)
    terms, _ = proxy_losses(strata_meta, source_path(strata_meta, job.input_override, strata_path), strata_path,
                            rows[eligible], loss_pass, reporter, view=without_prompt)
    direct[eligible] = terms[:, 0]
    cached.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(str(cached)) as tmp, open(tmp, "wb") as f:
        np.save(f, direct, allow_pickle=False)
    return direct
