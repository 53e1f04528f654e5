"""The `slap` method: the proxy-training replay (`slapcli.replay`) over stratified candidate pools."""

from __future__ import annotations

from slapcli.methods.base import MethodResult, Selection, SelectionJob, stratum_scales
from slapcli.methods.pool import StratifiedPool
from slapcli.replay import checkpoint_path, run_replay


def select_slap(job: SelectionJob) -> MethodResult:
    embeddings = job.embeddings()
    scales = stratum_scales(job, embeddings)
    pool = StratifiedPool(job.stratum, job.eligible, job.budgets, job.rng, oversample=job.config.pool_factor)
    choices, stats = run_replay(job, pool, embeddings, scales)
    # The artifact holds everything the checkpoint did: it goes once the artifact is written.
    return MethodResult(Selection.from_choices(choices), stats, leftovers=(checkpoint_path(job.output_path),))
