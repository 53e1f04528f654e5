"""The replay's split proxy: running the top blocks from cached hidden states equals the full model."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from slapcli.io.layouts import Example, Turn
from slapcli.models import load_causal_lm, resolve_model
from slapcli.proxy import collate, encode_examples, response_losses
from slapcli.proxy.split import PrefixCache, SplitProxy, row_features, train_step
from slapcli.slapmath import GradientProjector, calibrated_eta, stratified_sample

TEXTS = [("Write a haiku about rain", "Soft rain on the roof"), ("Add 2 and 3", "5"),
         ("Explain lists in python with an example please", "A list holds items: [1, 2, 3].")]


def _setup(tiny_proxy_dir, n_top=1):
    ref = resolve_model(str(tiny_proxy_dir))
    tokenizer, model = load_causal_lm(ref, torch.device("cpu"), torch.float32)
    examples = [Example((Turn("user", p), Turn("assistant", r))) for p, r in TEXTS]
    encoded = dict(enumerate(encode_examples(tokenizer, examples, 64)))
    split = SplitProxy(model, n_top)
    return tokenizer, model, split, PrefixCache(split, encoded, tokenizer.pad_token_id, torch.device("cpu")), encoded


def test_top_only_forward_equals_full_forward(tiny_proxy_dir):
    tokenizer, model, split, cache, encoded = _setup(tiny_proxy_dir)
    keys = list(encoded)
    batch = collate([encoded[k] for k in keys], tokenizer.pad_token_id)
    with torch.no_grad():
        full = response_losses(model, batch)
    cached_batch, hidden = cache.batch(keys)
    with torch.no_grad(), split.top_only(hidden):
        top = response_losses(model, cached_batch)
    torch.testing.assert_close(top, full, atol=2e-3, rtol=1e-3)  # float16 cache
    # The bottom blocks are restored afterwards.
    with torch.no_grad():
        torch.testing.assert_close(response_losses(model, batch), full)


def test_only_top_blocks_train(tiny_proxy_dir):
    _, model, split, _, _ = _setup(tiny_proxy_dir)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in split.parameters}
    assert all(id(p) in trainable for p in split.blocks[-1].parameters())
    assert not any(id(p) in trainable for p in split.blocks[0].parameters())


def test_row_features_match_full_model_gradients(tiny_proxy_dir):
    tokenizer, model, split, cache, encoded = _setup(tiny_proxy_dir)
    keys = list(encoded)
    with GradientProjector(model, split.linears, 64, seed=3) as projector:
        feats, losses = row_features(split, cache, projector, keys)
        # Reference: the full model, one row at a time.
        for i, k in enumerate(keys):
            batch = collate([encoded[k]], tokenizer.pad_token_id)
            model.zero_grad()
            loss = response_losses(model, batch)
            loss.sum().backward()
            ref = projector.features(batch["attention_mask"])[0]
            torch.testing.assert_close(feats[i], ref, atol=1e-3, rtol=1e-2)
            torch.testing.assert_close(losses[i], loss.detach()[0], atol=2e-3, rtol=1e-3)


def test_length_grouping_changes_neither_features_nor_the_training_step(tiny_proxy_dir):
    _, model, split, cache, _ = _setup(tiny_proxy_dir)
    keys = [2, 0, 1, 2]  # lengths out of order, and a repeated row
    with GradientProjector(model, split.linears, 64, seed=3) as projector:
        together, together_loss = row_features(split, cache, projector, keys, "unit")
        cache.token_budget = 1  # every row in a batch of its own
        alone, alone_loss = row_features(split, cache, projector, keys, "unit")
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone_loss, together_loss, atol=1e-6, rtol=1e-5)

    # One training step accumulated over per-row parts equals one step on the batch mean.
    start = [p.detach().clone() for p in split.parameters]
    train_step(split, cache, torch.optim.SGD(split.parameters, lr=0.5), keys)
    accumulated = [p.detach().clone() for p in split.parameters]
    with torch.no_grad():
        for p, s in zip(split.parameters, start, strict=True):
            p.copy_(s)
    optimizer = torch.optim.SGD(split.parameters, lr=0.5)
    batch, hidden = cache.batch(keys)
    with split.top_only(hidden):
        response_losses(model, batch).mean().backward()
    optimizer.step()
    assert any(not torch.equal(a, s) for a, s in zip(accumulated, start, strict=True))  # the step did move
    for a, p in zip(accumulated, split.parameters, strict=True):
        torch.testing.assert_close(a, p.detach(), atol=1e-6, rtol=1e-5)


def test_stratified_sample_is_proportional_and_fixed():
    stratum = np.array([0] * 50 + [1] * 30 + [2] * 20)
    eligible = np.ones(100, dtype=bool)
    eligible[:5] = False
    a = stratified_sample(stratum, eligible, 10, np.random.default_rng(0))
    b = stratified_sample(stratum, eligible, 10, np.random.default_rng(0))
    assert a.tolist() == b.tolist() and len(a) == 10
    assert eligible[a].all()
    counts = np.bincount(stratum[a], minlength=3)
    assert counts.min() >= 1 and counts[0] == counts.max()  # every stratum present, the largest most


def test_calibrated_eta_is_the_median_newton_step():
    feats = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    target = torch.tensor([1.0, 0.0], dtype=torch.float64)
    h = torch.ones(2, dtype=torch.float64)
    # Newton steps <g*, g>/g^T H g: 1 and 0.5 (the third is not aligned); torch's median is the lower one.
    assert abs(calibrated_eta(feats, target, h) - 0.5) < 1e-12
    assert calibrated_eta(-feats, target, h) == 1.0


def _tiny_strata(tmp_path, tiny_encoder_dir, tiny_proxy_dir, rows: int) -> None:
    """d.jsonl -> e.parquet -> s.parquet in tmp_path (3 clusters, keep 0.5) with the tiny models."""
    import json

    from slapcli.progress import Reporter
    from slapcli.stages.embed import EmbedConfig, embed
    from slapcli.stages.stratify import StratifyConfig, stratify

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"task {i} about {'abc'[i % 3]}", "output": f"answer {i * 7}"})
                            + "\n" for i in range(rows)))
    quiet = Reporter(quiet=True)
    embed(str(data), str(tmp_path / "e.parquet"),
          EmbedConfig(embed_model=str(tiny_encoder_dir), proxy_model=str(tiny_proxy_dir)), quiet)
    stratify(str(tmp_path / "e.parquet"), str(tmp_path / "s.parquet"),
             StratifyConfig(proxy_model=str(tiny_proxy_dir), clusters=3, keep=0.5), quiet)


def test_killed_select_resumes_to_the_same_selection(tmp_path, tiny_encoder_dir, tiny_proxy_dir, monkeypatch):
    """A replay interrupted mid-way and rerun from its checkpoint ends with the same artifact."""

    import pyarrow.parquet as pq

    from slapcli import replay
    from slapcli.artifacts import read_meta
    from slapcli.progress import Reporter
    from slapcli.stages.select import SelectConfig, select

    _tiny_strata(tmp_path, tiny_encoder_dir, tiny_proxy_dir, rows=40)
    quiet = Reporter(quiet=True)
    config = SelectConfig(proxy_model=str(tiny_proxy_dir), proj_dim=32, batch_size=4, checkpoint_seconds=0.0)
    select(str(tmp_path / "s.parquet"), str(tmp_path / "full.parquet"), config, quiet)

    real_step = replay.train_step
    calls = {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if killed during the third training step
        return real_step(*args, **kwargs)

    monkeypatch.setattr(replay, "train_step", dying_step)
    out = tmp_path / "resumed.parquet"
    with pytest.raises(KeyboardInterrupt):
        select(str(tmp_path / "s.parquet"), str(out), config, quiet)
    assert not out.exists() and os.path.exists(str(out) + ".ckpt")
    resumed_steps = {"n": 0}

    def counting_step(*args, **kwargs):
        resumed_steps["n"] += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(replay, "train_step", counting_step)
    select(str(tmp_path / "s.parquet"), str(out), config, quiet)
    full_steps = read_meta(str(tmp_path / "full.parquet")).stats["replay_steps"]
    assert resumed_steps["n"] == full_steps - 2  # two steps were done before the kill
    assert not os.path.exists(str(out) + ".ckpt")
    assert pq.read_table(out).equals(pq.read_table(tmp_path / "full.parquet"))


def test_hidden_store_round_trips_and_leaves_no_file(tmp_path):
    from slapcli.proxy.split import HiddenStore

    store = HiddenStore(str(tmp_path))
    rows = {k: torch.randn(n, 7) for k, n in ((3, 5), ("target", 1), (11, 40))}
    for k, v in rows.items():
        store.put(k, v)
    assert 3 in store and 4 not in store
    for k, v in rows.items():
        got = store.get(k)
        assert got.dtype == torch.float16 and got.shape == v.shape
        torch.testing.assert_close(got.float(), v.half().float())
    assert store.nbytes == 2 * 7 * (5 + 1 + 40)  # float16
    assert list(tmp_path.iterdir()) == []  # the file was unlinked at creation: nothing to clean up after a kill
    store.close()


def test_unit_features_are_the_raw_features_scaled_to_norm_one(tiny_proxy_dir):
    _, model, split, cache, encoded = _setup(tiny_proxy_dir)
    keys = list(encoded)
    with GradientProjector(model, split.linears, 64, seed=3) as projector:
        raw, raw_loss = row_features(split, cache, projector, keys, "raw")
        unit, unit_loss = row_features(split, cache, projector, keys, "unit")
    torch.testing.assert_close(unit, raw / raw.norm(dim=1, keepdim=True))
    torch.testing.assert_close(unit_loss, raw_loss)  # the loss recorded per row is not normalised


def test_select_without_curvature_records_no_curvature_term(tmp_path, tiny_encoder_dir, tiny_proxy_dir):
    import pyarrow.parquet as pq

    from slapcli.progress import Reporter
    from slapcli.stages.select import SelectConfig, select

    _tiny_strata(tmp_path, tiny_encoder_dir, tiny_proxy_dir, rows=24)
    quiet = Reporter(quiet=True)
    curv = {}
    for on in (True, False):
        out = tmp_path / f"sel_{on}.parquet"
        select(str(tmp_path / "s.parquet"), str(out), SelectConfig(proxy_model=str(tiny_proxy_dir), proj_dim=32,
                                                                   batch_size=4, curvature=on), quiet)
        table = pq.read_table(out)
        kept = table["kept"].to_numpy(zero_copy_only=False)
        assert kept.sum() == 12
        curv[on] = table["curvature"].to_numpy(zero_copy_only=False)[kept].astype(float)
    assert np.all(curv[False] == 0.0)
    assert np.any(curv[True] != 0.0)


def test_target_newton_eta_makes_the_target_itself_the_best_batch_mean():
    from slapcli.slapmath import score_step, target_newton_eta

    gen = torch.Generator().manual_seed(4)
    target = torch.randn(6, generator=gen, dtype=torch.float64)
    h = torch.rand(6, generator=gen, dtype=torch.float64) + 0.1
    eta = target_newton_eta(target, h)
    assert abs(eta - float(target @ target) / float((h * target * target).sum())) < 1e-12

    def utility(m):  # U without diversity, as batch_utility computes it
        return eta * float(target @ m) - 0.5 * eta**2 * float((h * m * m).sum())

    # Along the target's direction, U peaks at the target itself (m = c g*, c = 1).
    best = max((utility(c * target), c) for c in np.linspace(0.2, 3.0, 57))
    assert abs(best[1] - 1.0) < 1e-9
    feats = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    assert score_step("target", feats, target, h) == eta
    assert score_step("row", feats, target, h) == calibrated_eta(feats, target, h)
    assert target_newton_eta(torch.zeros(6, dtype=torch.float64), h) == 1.0
    with pytest.raises(ValueError):
        score_step("batch", feats, target, h)


def test_tokens_features_are_unit_features_weighted_by_sqrt_response_tokens(tiny_proxy_dir):
    _, model, split, cache, encoded = _setup(tiny_proxy_dir)
    keys = list(encoded)
    n = torch.tensor([int(np.sum(encoded[k].response_mask)) for k in keys], dtype=torch.float64)
    with GradientProjector(model, split.linears, 64, seed=3) as projector:
        unit, _ = row_features(split, cache, projector, keys, "unit")
        tokens, _ = row_features(split, cache, projector, keys, "tokens", reference_tokens=7.0)
    torch.testing.assert_close(tokens, unit * (n / 7.0).sqrt().unsqueeze(1).to(unit.dtype))


def test_eta_scale_changes_the_choice_and_is_validated(tmp_path, tiny_encoder_dir, tiny_proxy_dir):
    import pyarrow.parquet as pq

    from slapcli.errors import UsageError
    from slapcli.progress import Reporter
    from slapcli.stages.select import SelectConfig, select

    _tiny_strata(tmp_path, tiny_encoder_dir, tiny_proxy_dir, rows=24)
    quiet = Reporter(quiet=True)
    curv = {}
    for scale in (1.0, 3.0):
        out = tmp_path / f"sel_{scale}.parquet"
        select(str(tmp_path / "s.parquet"), str(out), SelectConfig(proxy_model=str(tiny_proxy_dir), proj_dim=32,
                                                                   batch_size=4, eta_scale=scale), quiet)
        table = pq.read_table(out)
        kept = table["kept"].to_numpy(zero_copy_only=False)
        curv[scale] = table["curvature"].to_numpy(zero_copy_only=False)[kept].astype(float)
    # Three times the step: the first pick of each batch pays nine times the curvature (eta^2), the same row or not.
    assert np.abs(curv[3.0]).sum() > np.abs(curv[1.0]).sum()
    with pytest.raises(UsageError):
        select(str(tmp_path / "s.parquet"), str(tmp_path / "bad.parquet"),
               SelectConfig(proxy_model=str(tiny_proxy_dir), eta_scale=0.0), quiet)


def test_bf16_proxy_trains_float32_top_blocks(tiny_proxy_dir):
    """On CUDA the proxy loads in bf16: the trainable blocks must still move at the replay's lr (issue 17).

    AdamW on bf16 weights rounds a 1e-4 step away for every weight above ~0.03 in magnitude; the split proxy keeps
    its top blocks in float32 and runs the passes under bf16 autocast (exercised here on the CPU)."""

    ref = resolve_model(str(tiny_proxy_dir))
    tokenizer, model = load_causal_lm(ref, torch.device("cpu"), torch.bfloat16)
    examples = [Example((Turn("user", p), Turn("assistant", r))) for p, r in TEXTS]
    encoded = dict(enumerate(encode_examples(tokenizer, examples, 64)))
    split = SplitProxy(model, 1)
    assert all(p.dtype == torch.float32 for p in split.parameters)
    assert split.blocks[0].self_attn.q_proj.weight.dtype == torch.bfloat16  # the frozen part stays as loaded
    cache = PrefixCache(split, encoded, tokenizer.pad_token_id, torch.device("cpu"))
    before = [p.detach().clone() for p in split.parameters]
    optimizer = torch.optim.AdamW(split.parameters, lr=1e-4, weight_decay=0.0)
    train_step(split, cache, optimizer, list(encoded))
    big = [(b.abs() > 0.03) for b in before]
    moved = [(p.detach() != b) & m for p, b, m in zip(split.parameters, before, big, strict=True)]
    share = sum(int(x.sum()) for x in moved) / max(1, sum(int(m.sum()) for m in big))
    assert share > 0.9  # Adam's first step moves every weight with a gradient by ~lr
    with GradientProjector(model, split.linears, 64, seed=3) as projector:
        feats, losses = row_features(split, cache, projector, list(encoded))
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all() and torch.isfinite(losses).all()
    cache.close()
