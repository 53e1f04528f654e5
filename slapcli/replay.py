"""The SLAP replay (METHOD.md stage 3): train a proxy on the batches as they are chosen.

Each step draws a stratified candidate pool, computes the candidates' projected gradient features under
the proxy's current state (the last decoder blocks are the trainable part), scores batches by the
second-order predicted drop of the target loss plus relative-distance diversity, composes one batch
greedily, and takes one AdamW step of the proxy on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from slapcli.artifacts import ArtifactMeta
from slapcli.errors import SlapError
from slapcli.io.readers import file_fingerprint
from slapcli.io.writers import discard, temp_path_beside
from slapcli.models import load_causal_lm, pick_device, pick_dtype, resolve_model
from slapcli.progress import Reporter
from slapcli.proxy import IGNORE_INDEX, EncodedExample, collate, encode_examples, response_losses, token_budget_batches
from slapcli.slapmath import (
    ETA_RULES,
    CurvatureState,
    GradientProjector,
    allocate_budget,
    curvature_diagonal,
    greedy_batch,
    normalize_features,
    update_curvature,
)
from slapcli.source import iter_source_rows, source_path
from slapcli.target import read_target_examples

FEATURE_BATCH = 16  # rows per forward/backward when computing gradient features (bigger GEMMs)
# Padded tokens per such batch on a CPU: each pass groups its rows by length under this budget
# (proxy.token_budget_batches). A pass of 16 candidates in the pool's random order padded 2.3 tokens per real
# one on the quality benchmark's data; grouped under 512 tokens, 1.17 (under 2048, 1.68), and the frozen-prefix
# and feature passes ran 28% and 22% faster than under 2048 (work in docs/PERFORMANCE.md). Accelerators keep
# batches of FEATURE_BATCH rows (only sorted by length): small batches would leave them idle.
CPU_FEATURE_TOKENS = 512


def feature_token_budget(device: torch.device) -> int:
    return CPU_FEATURE_TOKENS if device.type == "cpu" else sys.maxsize


class _PassThrough(nn.Module):
    """Stands in for a frozen bottom block whose output is already cached."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _StopForward(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks: the longest ModuleList (model.layers for Llama-like models)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise SlapError(f"{type(model).__name__}: no stack of decoder blocks found to train")
    return max(lists, key=len)


class SplitProxy:
    """The proxy as a frozen bottom, run once per row, and trainable top blocks, run at every replay step.

    Only the last `n_top` decoder blocks train, so the hidden states entering them never change: they are
    computed once per row (`prefix`) and cached, and every later forward/backward runs the top blocks alone
    (`top_only`). On SmolLM2-135M (30 blocks) with 2 trainable blocks this makes a replay step ~10x cheaper.
    """

    def __init__(self, model: nn.Module, n_top: int) -> None:
        self.model = model
        self.blocks = decoder_blocks(model)
        self.split = max(0, len(self.blocks) - max(1, n_top))
        for p in model.parameters():
            p.requires_grad_(False)
        top = list(self.blocks)[self.split:]
        # The model's own dtype (bf16 on CUDA) is what the frozen part computes in. The trainable blocks are kept
        # in float32: AdamW on bf16 weights rounds most updates of a 1e-4 step away (a weight above ~0.03 in
        # magnitude has a bf16 spacing larger than the step), so the proxy would barely train. `compute()` then
        # runs the passes under bf16 autocast, so matmuls stay fast and mixed dtypes meet safely.
        self.compute_dtype = next(model.parameters()).dtype
        for b in top:
            b.to(torch.float32)
        self.parameters = [p for b in top for p in b.parameters()]
        for p in self.parameters:
            p.requires_grad_(True)
        self.linears = [m for b in top for m in b.modules() if isinstance(m, nn.Linear)]

    def compute(self) -> contextlib.AbstractContextManager:
        """Autocast to the model's dtype for passes through the float32 top blocks (a no-op in float32)."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        device_type = next(self.model.parameters()).device.type
        return torch.autocast(device_type=device_type, dtype=self.compute_dtype)

    @torch.no_grad()
    def prefix(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states entering the first trainable block, [B, T, H]; the forward stops there."""
        def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
            raise _StopForward(args[0] if args else kwargs["hidden_states"])

        handle = self.blocks[self.split].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        except _StopForward as s:
            return s.hidden.detach()
        finally:
            handle.remove()
        raise SlapError("the proxy's forward pass never reached its trainable blocks")

    @contextlib.contextmanager
    def top_only(self, hidden: torch.Tensor) -> Iterator[None]:
        """Within this block, a forward of the model skips the bottom and starts from `hidden`."""
        bottom = [self.blocks[i] for i in range(self.split)]
        for i in range(self.split):
            self.blocks[i] = _PassThrough()

        def inject(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (hidden.to(args[0].dtype), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden.to(kwargs["hidden_states"].dtype)}

        handle = self.blocks[self.split].register_forward_pre_hook(inject, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            for i, block in enumerate(bottom):
                self.blocks[i] = block


class HiddenStore:
    """Per-row float16 hidden states in an anonymous file on disk, appended once and read back by offset.

    The replay would otherwise hold every offered row's [tokens, hidden] states in RAM (~6 GB for 50k rows of
    SmolLM2). The file is created already unlinked (`tempfile.TemporaryFile`), so nothing is left behind even
    after a SIGKILL; reads go through the page cache, which the OS can drop under memory pressure.
    """

    def __init__(self, directory: str | None = None) -> None:
        if directory:
            os.makedirs(directory, exist_ok=True)  # the output's folder, which the artifact writer would create too
        self._file = tempfile.TemporaryFile(dir=directory)
        self._fd = self._file.fileno()
        self._end = 0
        self._where: dict[Any, tuple[int, tuple[int, ...]]] = {}  # key -> (byte offset, shape)

    def __contains__(self, key: Any) -> bool:
        return key in self._where

    def put(self, key: Any, states: torch.Tensor) -> None:
        data = states.detach().to("cpu", torch.float16).contiguous().numpy()
        os.pwrite(self._fd, data.tobytes(), self._end)
        self._where[key] = (self._end, data.shape)
        self._end += data.nbytes

    def get(self, key: Any) -> torch.Tensor:
        offset, shape = self._where[key]
        out = np.empty(shape, dtype=np.float16)
        os.preadv(self._fd, [out], offset)
        return torch.from_numpy(out)

    def close(self) -> None:
        self._file.close()


class PrefixCache:
    """Per-row hidden states at the split, computed on first use and stored in float16 on disk (HiddenStore)."""

    def __init__(self, split: SplitProxy, encoded: dict[int, EncodedExample], pad_id: int,
                 device: torch.device, spill_dir: str | None = None) -> None:
        self.split, self.encoded, self.pad_id, self.device = split, encoded, pad_id, device
        self.hidden = HiddenStore(spill_dir)
        self.token_budget = feature_token_budget(device)  # padded tokens per batch of every pass on these rows

    def groups(self, keys: list[Any]) -> list[list[int]]:
        """Indices into `keys` in batches of similar length under the token budget, longest first."""
        return token_budget_batches([len(self.encoded[k].input_ids) for k in keys], FEATURE_BATCH,
                                    self.token_budget)

    def ensure(self, keys: list[Any]) -> None:
        missing = [k for k in keys if k not in self.hidden]
        for idx in self.groups(missing):
            chunk = [missing[i] for i in idx]
            batch = {k: v.to(self.device) for k, v in collate([self.encoded[k] for k in chunk], self.pad_id).items()}
            hidden = self.split.prefix(batch)
            for r, k in enumerate(chunk):
                self.hidden.put(k, hidden[r, : len(self.encoded[k].input_ids)])

    def batch(self, keys: list[Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """A collated batch of these rows and their padded cached hidden states."""
        self.ensure(keys)
        batch = {k: v.to(self.device) for k, v in collate([self.encoded[k] for k in keys], self.pad_id).items()}
        width = batch["input_ids"].shape[1]
        states = [self.hidden.get(k) for k in keys]
        hidden = torch.zeros(len(keys), width, states[0].shape[-1], dtype=torch.float32)
        for r, h in enumerate(states):
            hidden[r, : h.shape[0]] = h.float()
        return batch, hidden.to(self.device)

    def close(self) -> None:
        self.hidden.close()


def row_features(split: SplitProxy, cache: PrefixCache, projector: GradientProjector,
                 keys: list[Any], norm: str = "raw",
                 reference_tokens: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected per-row gradient features [n, D] (normalised per `norm`; `reference_tokens` is the typical
    response length of norm "tokens") and losses [n] under the proxy's current state."""
    feats: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []
    order: list[int] = []
    for idx in cache.groups(keys):
        order.extend(idx)
        batch, hidden = cache.batch([keys[i] for i in idx])
        split.model.zero_grad(set_to_none=True)
        projector.reset()  # drop captures of passes whose gradients were not for features (training steps)
        with split.top_only(hidden), split.compute():
            loss = response_losses(split.model, batch)
        loss.sum().backward()  # the sum keeps each row's gradient its own
        n_response = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)  # the tokens response_losses averages
        feats.append(normalize_features(projector.features(batch["attention_mask"]), norm, n_response,
                                        reference_tokens).cpu())
        losses.append(loss.detach().float().cpu())
    split.model.zero_grad(set_to_none=True)
    back = torch.empty(len(order), dtype=torch.long)
    # Batches ran longest first: back to the keys' order.
    back[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return torch.cat(feats)[back], torch.cat(losses)[back]


def stratified_sample(stratum: np.ndarray, eligible: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A fixed reference sample: rows spread over strata in proportion to their size."""
    sizes = np.bincount(stratum[eligible], minlength=int(stratum.max()) + 1)
    take = allocate_budget(sizes, n, "proportional")
    picks = []
    for s in np.flatnonzero(take).tolist():
        members = np.flatnonzero(eligible & (stratum == s))
        picks.extend(rng.choice(members, size=int(take[s]), replace=False).tolist())
    return np.sort(np.array(picks, dtype=np.int64))


def _encode_target_file(path: str, tokenizer: Any, max_tokens: int, limit: int) -> list[EncodedExample]:
    return encode_examples(tokenizer, read_target_examples(path, limit), max_tokens)


def run_replay(strata_meta: ArtifactMeta, strata_path: str, table: pa.Table, pool: Any, embeddings: np.ndarray,
               scales: np.ndarray, config: Any, reporter: Reporter, input_override: str | None,
               output_path: str) -> tuple[list[Any], dict[str, Any]]:
    from slapcli.select import Choice

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed + 1)
    device = pick_device(config.device)
    ref = resolve_model(config.proxy_model)
    reporter.log(f"loading proxy {ref.spec}")
    tokenizer, model = load_causal_lm(ref, device, pick_dtype(device))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    max_tokens = int(config.max_tokens or strata_meta.config.get("max_tokens", 1024))
    split = SplitProxy(model, config.trainable_blocks)
    model.train()
    optimizer = torch.optim.AdamW(split.parameters, lr=config.lr, weight_decay=0.0)

    # Token ids of every eligible row, kept as compact numpy arrays (not padded tensors).
    rows = table["row"].to_numpy()
    stratum = table["stratum"].to_numpy()
    eligible = pool.eligible
    position_of_row = {int(r): i for i, r in enumerate(rows.tolist())}
    src = source_path(strata_meta, input_override, strata_path)
    encoded: dict[Any, EncodedExample] = {}
    wanted = set(rows[eligible].tolist())
    with reporter.progress("tokenize", len(wanted)) as bar:
        chunk = []
        for parsed in iter_source_rows(strata_meta, src, strata_path, wanted):
            chunk.append(parsed)
            if len(chunk) == 1024:
                _encode_chunk(chunk, tokenizer, max_tokens, position_of_row, encoded)
                bar.update(advance=len(chunk), rows_done=len(encoded))
                chunk = []
        _encode_chunk(chunk, tokenizer, max_tokens, position_of_row, encoded)

    # Norm "tokens" weighs a row's direction by sqrt(n / n_ref): n_ref is the data's mean response length, fixed
    # for the whole replay so that features of different steps stay on one scale.
    reference_tokens = float(np.mean([e.n_response_tokens for e in encoded.values()])) if encoded else 1.0
    if config.target:
        target_rows = _encode_target_file(config.target, tokenizer, max_tokens, config.target_rows)
        target_keys: list[Any] = [("target", i) for i in range(len(target_rows))]
        encoded.update(zip(target_keys, target_rows, strict=True))
    else:
        target_keys = [int(p) for p in stratified_sample(stratum, eligible, config.target_rows, rng)]

    # Hidden states spill to an anonymous file beside the output: the user chose that disk for big files.
    cache = PrefixCache(split, encoded, pad_id, device, spill_dir=os.path.dirname(os.path.abspath(output_path)))
    projector = GradientProjector(model, split.linears, config.proj_dim, seed=config.seed)
    curvature = CurvatureState.empty(projector.dim)
    feature_cache: dict[int, tuple[int, torch.Tensor, float]] = {}  # position -> (step, feature, loss)
    choices: list[Choice] = []
    total = pool.left
    step = 0
    target_refresh = max(1, config.target_refresh)
    timings = {"features": 0.0, "target": 0.0, "greedy": 0.0, "train": 0.0}
    target = torch.zeros(projector.dim, dtype=torch.float64)
    ckpt_path = checkpoint_path(output_path)
    ckpt_key = checkpoint_key(config, strata_path)
    if config.resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, weights_only=True)  # our own file, and still no unpickling of code
        if state["key"] != ckpt_key:
            reporter.warn(f"{ckpt_path} was written with other settings or data: starting over")
        else:
            step, target, curvature = state["step"], state["target"], CurvatureState(state["curv_sum"],
                                                                                     state["curv_count"])
            choices = [Choice(int(c[0]), int(c[1]), int(c[2]), *c[3:]) for c in state["choices"]]
            pool.remaining = state["remaining"].numpy().astype(np.int64)
            pool.queues = [deque(q) for q in state["queues"]]
            feature_cache = {int(p): (int(b), f, float(loss)) for p, b, f, loss in
                             zip(state["fc_pos"], state["fc_born"], state["fc_feat"], state["fc_loss"], strict=True)}
            with torch.no_grad():
                for param, saved in zip(split.parameters, state["params"], strict=True):
                    param.copy_(saved)
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            timings = dict(state["timings"])
            reporter.log(f"resuming from {ckpt_path}: step {step}, {len(choices):,} rows chosen")
    last_save = time.monotonic()
    try:
        with reporter.progress("select (slap replay)", total) as bar:
            bar.update(advance=len(choices), rows_done=len(choices))
            while pool.left > 0:
                t0 = time.perf_counter()
                if step % target_refresh == 0:
                    feats, _ = row_features(split, cache, projector, target_keys, config.feature_norm,
                                            reference_tokens)
                    target = feats.double().mean(0)
                t1 = time.perf_counter()
                candidates = pool.draw(config.pool_factor * config.batch_size)
                stale = [int(p) for p in candidates.tolist()
                         if p not in feature_cache or step - feature_cache[p][0] >= config.refresh]
                if stale:
                    feats, losses = row_features(split, cache, projector, stale, config.feature_norm,
                                                   reference_tokens)
                    curvature = update_curvature(curvature, feats)
                    for p, f, loss in zip(stale, feats, losses.tolist(), strict=True):
                        feature_cache[p] = (step, f, loss)
                t2 = time.perf_counter()
                pool_feats = torch.stack([feature_cache[int(p)][1] for p in candidates]).double()
                h = curvature_diagonal(curvature, config.damping)
                if not config.curvature:  # first-order + diversity only
                    h = torch.zeros_like(h)
                eta = config.extra.get("score_lr") or config.eta_scale * score_step(config.eta, pool_feats, target, h)
                singles = eta * (pool_feats @ target) - 0.5 * eta**2 * (pool_feats.pow(2) @ h)
                spread = float(singles.std()) if len(singles) > 1 else 0.0
                score_unit = spread if spread > 0 else 1.0  # diversity and length prior are in these units
                gamma = config.diversity * score_unit
                b = min(config.batch_size, pool.left)
                groups, caps = pool.caps(candidates)
                content = None
                if config.length_prior:
                    content = config.length_prior * score_unit * torch.from_numpy(
                        response_content(encoded, candidates, reference_tokens))
                result = greedy_batch(pool_feats, target, h, eta, gamma, torch.from_numpy(embeddings[candidates]),
                                      torch.from_numpy(scales[candidates]), b, config.diversity_clip,
                                      groups=torch.from_numpy(groups), group_caps=torch.from_numpy(caps),
                                      content=content)
                t3 = time.perf_counter()
                chosen_positions = [int(candidates[j]) for j in result.chosen]
                for k, pos in enumerate(chosen_positions):
                    choices.append(Choice(pos, step, step, feature_cache[pos][2], result.first_order[k],
                                          result.curvature[k], result.diversity[k], result.gains[k]))
                # Candidates whose features stay fresh next step are offered again; the rest rotate out.
                fresh = {p for p in candidates.tolist() if step + 1 - feature_cache[p][0] < config.refresh}
                pool.settle(candidates, result.chosen, retain=fresh)
                _train_step(split, cache, optimizer, chosen_positions)
                # Chosen rows leave the pool, and features past their refresh age would be recomputed anyway.
                for p in chosen_positions:
                    feature_cache.pop(p, None)
                for p in [p for p, (born, _, _) in feature_cache.items() if step + 1 - born >= config.refresh]:
                    del feature_cache[p]
                t4 = time.perf_counter()
                for key, dt in zip(timings, (t2 - t1, t1 - t0, t3 - t2, t4 - t3), strict=True):
                    timings[key] += dt
                step += 1
                bar.update(advance=len(chosen_positions), rows_done=len(choices))
                if pool.left > 0 and time.monotonic() - last_save >= config.checkpoint_seconds:
                    _save_checkpoint(ckpt_path, {
                        "key": ckpt_key, "step": step, "target": target, "curv_sum": curvature.sum_sq,
                        "curv_count": curvature.count,
                        "choices": [[c.position, c.step, c.batch, c.loss, c.first_order, c.curvature, c.diversity,
                                     c.gain] for c in choices],
                        "remaining": torch.from_numpy(pool.remaining.copy()),
                        "queues": [list(q) for q in pool.queues],
                        "fc_pos": list(feature_cache), "fc_born": [v[0] for v in feature_cache.values()],
                        "fc_feat": [v[1] for v in feature_cache.values()],
                        "fc_loss": [v[2] for v in feature_cache.values()],
                        "params": [p.detach().clone() for p in split.parameters],
                        "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                        "timings": timings,
                    })
                    last_save = time.monotonic()
    finally:
        projector.close()
        cache.close()
    reporter.log("replay time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    stats: dict[str, Any] = {"replay_steps": step, "proj_dim": projector.dim, "trainable_linears": len(split.linears),
                             "target_rows": len(target_keys), "reference_response_tokens": round(reference_tokens, 3)}
    if config.record_timings:  # wall times differ run to run: only on request, so equal runs give equal bytes
        stats["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    return choices, stats


def response_content(encoded: dict[Any, EncodedExample], positions: np.ndarray, reference_tokens: float) -> np.ndarray:
    """log(response tokens / reference_tokens) per row: the content term of `--length-prior`, before its weight.

    Why: the batch score is a one-step quantity on per-row MEAN losses, so it is blind to how much a row has to
    teach over the whole run, and inside one stratum (same topic, same loss level) that grows with the number of
    response tokens. On the quality benchmark the longest rows of each stratum trained better than random at
    keep 0.7 (not at 0.6), and the longest rows overall (coverage lost) worse (docs/RESULTS.md); Zhao et al. 2024
    ("Long Is More for Alignment") report long responses helping instruction tuning. The log keeps a 2x longer
    row worth one fixed step.
    """
    counts = np.array([max(1, encoded[int(p)].n_response_tokens) for p in positions.tolist()], dtype=np.float64)
    return np.log(counts / reference_tokens)


def checkpoint_path(output_path: str) -> str:
    return output_path + ".ckpt"


def checkpoint_key(config: Any, strata_path: str) -> str:
    """What a checkpoint must match to be resumed: every setting that changes the result, and the strata."""
    settings = {k: v for k, v in asdict(config).items()
                if k not in ("checkpoint_seconds", "resume", "device", "record_timings")}
    blob = json.dumps([settings, file_fingerprint(strata_path).to_dict()], sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def _save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Atomically: a kill during the write leaves the previous checkpoint intact."""
    tmp = temp_path_beside(path)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        discard(tmp)
        raise


def calibrated_eta(pool_feats: torch.Tensor, target: torch.Tensor, h: torch.Tensor) -> float:
    """The step size in feature units at which the pool's typical candidate gains most.

    The proxy's AdamW learning rate has no meaning in the units of projected features, so the score's eta is
    the (lower) median over candidates of the Newton step <g*, g> / g^T H g (positive ones only): at that step the
    curvature term is half the first-order term, so both matter.
    """
    align = pool_feats @ target
    quad = pool_feats.pow(2) @ h
    ratios = align[(align > 0) & (quad > 0)] / quad[(align > 0) & (quad > 0)]
    return float(ratios.median()) if len(ratios) else 1.0


def target_newton_eta(target: torch.Tensor, h: torch.Tensor) -> float:
    """The Newton step along g* itself, <g*, g*> / g*^T H g* (1 when undefined).

    With this eta, U(B) = eta <g*, m> - eta^2/2 m^T H m peaks where the batch mean m equals H^-1 g* / eta, which
    for a flat H is g* itself: the best batch is one whose mean gradient stands for the target, not one that
    exaggerates its dominant direction. (The per-candidate median of `calibrated_eta` is smaller, so it rewards
    batches of rows that all point the same way: measured worse, see docs/RESULTS.md.)
    """
    quad = float(target.pow(2) @ h)
    return float(target @ target) / quad if quad > 0 else 1.0


def score_step(rule: str, pool_feats: torch.Tensor, target: torch.Tensor, h: torch.Tensor) -> float:
    """The eta of the batch score under `--eta`: "target" (Newton step along g*) or "row" (median per-row)."""
    if rule == "target":
        return target_newton_eta(target, h)
    if rule == "row":
        return calibrated_eta(pool_feats, target, h)
    raise ValueError(f"eta rule must be one of {ETA_RULES}, got {rule!r}")


def _train_step(split: SplitProxy, cache: PrefixCache, optimizer: torch.optim.Optimizer, keys: list[Any]) -> None:
    """One AdamW step of the trainable blocks on the chosen batch (mean of its rows' losses).

    The gradient is accumulated over length-grouped parts of the batch (each part's loss sum / batch size):
    the same mean, with less padding."""
    optimizer.zero_grad(set_to_none=True)
    for idx in cache.groups(keys):
        batch, hidden = cache.batch([keys[i] for i in idx])
        with split.top_only(hidden), split.compute():
            part = response_losses(split.model, batch).sum() / len(keys)
        part.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _encode_chunk(chunk: list[Any], tokenizer: Any, max_tokens: int, position_of_row: dict[int, int],
                  out: dict[int, EncodedExample]) -> None:
    if not chunk:
        return
    for parsed, enc in zip(chunk, encode_examples(tokenizer, [p.example for p in chunk], max_tokens), strict=True):
        # int32 / bool arrays: 5 bytes a token instead of a Python list's 8-byte pointer plus an int object.
        out[position_of_row[parsed.record.index]] = dataclasses.replace(
            enc, input_ids=np.asarray(enc.input_ids, dtype=np.int32),
            response_mask=np.asarray(enc.response_mask, dtype=bool))

