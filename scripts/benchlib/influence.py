"""Per-row gradient signals of the benchmarks' trainer (trainable blocks only, through the prefix caches): the
cosine of each training row's gradient with the held-out one (benchmark_quality.py's diagnostic and probe), and
TracIn-style influence along the full-data run, preconditioned as AdamW steps (benchmark_bound.py's oracles)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchlib.common import log
from benchlib.trainer import EVAL_BATCH, HiddenCache, TopTrainer, response_token_counts
from slapcli.proxy import response_losses


def gradient_alignment(trainer: TopTrainer, train: HiddenCache, heldout: HiddenCache, path: Path,
                       key: str) -> dict[str, np.ndarray]:
    """Per training row: cosine of its loss gradient (trainable blocks, pretrained weights) with the held-out one.

    The held-out gradient is that of the mean row loss over all held-out rows. This is what a first-order
    data-selection score aims at (`slap`'s first-order term uses a projected version of it against its own
    target sample): a row with a high cosine is one whose training step lowers the held-out loss at the start.
    Cached in `path` (npz) under `key`.
    """
    if path.exists():
        cached = np.load(path)
        if str(cached["key"]) == key:
            return {"cos": cached["cos"], "response_tokens": cached["response_tokens"],
                    "seconds": float(cached["seconds"])}
    trainer.reset()
    model, params = trainer.model, trainer.split.parameters
    model.train()

    def grad(cache: HiddenCache, rows: list[int]) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        batch, hidden = cache.batch(rows, trainer.pad_id)
        with trainer.split.top_only(hidden):
            response_losses(model, batch).sum().backward()
        return torch.cat([q.grad.flatten() for q in params])

    t0 = time.perf_counter()
    target = torch.zeros(sum(q.numel() for q in params))
    for start in range(0, len(heldout), EVAL_BATCH):
        target += grad(heldout, list(range(start, min(len(heldout), start + EVAL_BATCH))))
    target /= len(heldout)
    cos = np.zeros(len(train))
    for i in range(len(train)):
        g = grad(train, [i])
        cos[i] = float(g @ target) / max(1e-30, float(g.norm() * target.norm()))
    model.zero_grad(set_to_none=True)
    resp = response_token_counts(train)
    seconds = round(time.perf_counter() - t0, 1)
    np.savez(path, key=key, cos=cos, response_tokens=resp, seconds=seconds)
    log(f"gradient alignment of {len(train)} rows: {seconds:.0f} s")
    return {"cos": cos, "response_tokens": resp, "seconds": seconds}


def flat_gradient(trainer: TopTrainer, cache: HiddenCache, rows: list[int]) -> torch.Tensor:
    """Gradient of the mean row loss over `rows` w.r.t. the trainable blocks, flattened."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    batch, hidden = cache.batch(rows, trainer.pad_id)
    with trainer.split.top_only(hidden):
        response_losses(model, batch).mean().backward()
    grad = torch.cat([q.grad.reshape(-1) for q in trainer.split.parameters])
    model.zero_grad(set_to_none=True)
    return grad


def metric_gradient(trainer: TopTrainer, cache: HiddenCache, domains: np.ndarray, where: np.ndarray,
                    chunk: int = 16) -> torch.Tensor:
    """Gradient of the metric (mean over domains of the mean row loss) restricted to the rows in `where`."""
    present = sorted(set(domains[where].tolist()))
    total = None
    for d in present:
        rows = np.flatnonzero(where & (domains == d)).tolist()
        for s in range(0, len(rows), chunk):
            part = rows[s:s + chunk]
            g = flat_gradient(trainer, cache, part) * (len(part) / len(rows) / len(present))
            total = g if total is None else total + g
    assert total is not None
    return total


def adam_direction(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
    """`grad` divided by AdamW's bias-corrected sqrt(second moment) + eps: the per-coordinate scaling the optimizer
    applies to a step, so that the inner product with a row's gradient is the first-order loss change of a step
    on that row."""
    group = optimizer.param_groups[0]
    states = [optimizer.state.get(p, {}) for p in params]
    if not states[0]:
        return grad
    beta2, eps = group["betas"][1], group["eps"]
    correction = 1.0 - beta2 ** float(states[0]["step"])
    v = torch.cat([s["exp_avg_sq"].reshape(-1) for s in states])
    return grad / ((v / correction).sqrt() + eps)


def checkpoint_steps(total: int, count: int) -> list[int]:
    """`count` optimizer steps spread evenly over 1..total-1 (step 0 has no second moments to precondition by)."""
    if total < 2:
        return [0]
    return sorted({int(x) for x in np.rint(np.linspace(1, total - 1, max(1, count)))})


def influence_scores(trainer: TopTrainer, caches: dict[str, HiddenCache], target: str, half_a: np.ndarray,
                     checkpoints: int, seed: int) -> dict[str, Any]:
    """Per training row: sum over checkpoints of lr * <g_row, P g_target> along the full-data run (shuffle `seed`);
    the target is the metric's gradient on held-out half A (`target` "heldout-a") or on the training rows."""
    train, heldout = caches["train"], caches["heldout"]
    n = len(train)
    rows = np.arange(n)
    optimizer, schedule, rng = trainer.start(n, seed)
    total = trainer.total_steps(n)
    at = checkpoint_steps(total, checkpoints)
    train_domains, held_domains = np.array(train.domains), np.array(heldout.domains)
    scores = np.zeros(n)
    per_checkpoint = []
    t0 = time.perf_counter()
    for step, batch_rows in enumerate(trainer.batches(rows, rng)):
        if step in at:
            if target == "heldout-a":
                g_target = metric_gradient(trainer, heldout, held_domains, half_a)
            else:
                g_target = metric_gradient(trainer, train, train_domains, np.ones(n, dtype=bool))
            direction = adam_direction(optimizer, trainer.split.parameters, g_target)
            lr = schedule.get_last_lr()[0]
            mine = np.array([float(flat_gradient(trainer, train, [i]) @ direction) for i in range(n)])
            scores += lr * mine
            per_checkpoint.append({"step": step, "lr": lr, "negative_share": float((mine < 0).mean())})
            log(f"  influence ({target}) at step {step}/{total}: {time.perf_counter() - t0:.0f} s")
        trainer.step(train, batch_rows, optimizer, schedule)
    return {"scores": scores, "checkpoints": per_checkpoint, "seconds": round(time.perf_counter() - t0, 1)}


def cached_influence(path: Path, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`compute()`'s scores, or those saved in `path` (npz) under the same `key`."""
    if path.exists():
        saved = np.load(path, allow_pickle=False)
        if str(saved["key"]) == key:
            return {"scores": saved["scores"], "checkpoints": json.loads(str(saved["checkpoints"])),
                    "seconds": float(saved["seconds"]), "cached": True}
    out = compute()
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, key=key, scores=out["scores"], checkpoints=json.dumps(out["checkpoints"]), seconds=out["seconds"])
    os.replace(tmp, path)
    return {**out, "cached": False}
