"""Stratify's loss pass keeps the frozen prefix's states, and select's replay reads them instead of recomputing:
the same features and losses, never a stale row, and no projection or weight-gradient work that is thrown away."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from slapcli.config import EmbedConfig, SelectConfig, StratifyConfig
from slapcli.io.layouts import Example, Turn
from slapcli.models import load_causal_lm, resolve_model
from slapcli.progress import Reporter
from slapcli.proxy import compute_loss_terms, encode_examples
from slapcli.proxy import prefix_store as ps
from slapcli.proxy.prefix_store import PrefixCapture, PrefixKey, PrefixWriter, StoredPrefixes
from slapcli.proxy.split import PrefixCache, SplitProxy, decoder_blocks, prefix_key, row_features, train_step
from slapcli.slapmath import GradientProjector
from slapcli.stages.embed import embed
from slapcli.stages.select import select
from slapcli.stages.stratify import stratify

QUIET = Reporter(quiet=True)
TEXTS = [("Write a haiku about rain", "Soft rain on the roof, again and again"), ("Add 2 and 3", "5"),
         ("Explain lists in python with an example please", "A list holds items: [1, 2, 3]."),
         ("Name a colour", "Blue, like the sky on a clear summer day")]
N_TOP = 1


def _examples(texts=TEXTS) -> list[Example]:
    return [Example((Turn("user", p), Turn("assistant", r))) for p, r in texts]


def _load(tiny_proxy_dir, dtype=torch.float32):
    ref = resolve_model(str(tiny_proxy_dir))
    tokenizer, model = load_causal_lm(ref, torch.device("cpu"), dtype)
    return ref, tokenizer, model


def _store_loss_pass(tiny_proxy_dir, examples, max_tokens=64, identity=None, dtype=torch.float32) -> None:
    """What stratify's loss pass does: score the rows and keep their prefix states on the way."""
    ref, tokenizer, model = _load(tiny_proxy_dir, dtype)
    key = prefix_key(model, identity or ref.identity, N_TOP)
    writer = PrefixWriter(key)
    capture = PrefixCapture(decoder_blocks(model)[key.split], writer)
    compute_loss_terms(model, tokenizer, examples, max_tokens, 2, torch.device("cpu"), around_batch=capture.batch)
    assert writer.finish() is not None


def _replay_features(tiny_proxy_dir, examples, reuse: bool, max_tokens=64, n_top=N_TOP, dtype=torch.float32):
    ref, tokenizer, model = _load(tiny_proxy_dir, dtype)
    encoded = dict(enumerate(encode_examples(tokenizer, examples, max_tokens)))
    split = SplitProxy(model, n_top)
    cache = PrefixCache(split, encoded, tokenizer.pad_token_id, torch.device("cpu"),
                        model_identity=ref.identity if reuse else None)
    with GradientProjector(model, split.linears, 64, seed=3) as projector:
        feats, losses = row_features(split, cache, projector, list(encoded), "unit")
    reused, computed = cache.reused, cache.computed
    cache.close()
    return feats, losses, reused, computed


def test_reused_prefix_gives_the_features_and_losses_of_a_recomputed_one(tiny_proxy_dir):
    _store_loss_pass(tiny_proxy_dir, _examples())
    feats, losses, reused, computed = _replay_features(tiny_proxy_dir, _examples(), reuse=True)
    assert (reused, computed) == (len(TEXTS), 0)
    ref_feats, ref_losses, reused, computed = _replay_features(tiny_proxy_dir, _examples(), reuse=False)
    assert (reused, computed) == (0, len(TEXTS))
    # Both are float16 copies of the same float32 states; other batch shapes may round a last bit differently.
    torch.testing.assert_close(losses, ref_losses, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(feats, ref_feats, atol=1e-3, rtol=1e-3)


def test_a_stale_store_is_not_reused(tiny_proxy_dir):
    _store_loss_pass(tiny_proxy_dir, _examples(), identity="another-model")  # other weights, same architecture
    assert _replay_features(tiny_proxy_dir, _examples(), reuse=True)[2:] == (0, len(TEXTS))
    _store_loss_pass(tiny_proxy_dir, _examples())
    # Another split (more trainable blocks): the states at another block.
    assert _replay_features(tiny_proxy_dir, _examples(), reuse=True, n_top=N_TOP + 1)[2:] == (0, len(TEXTS))
    # Another input: a changed row misses, the others are found.
    changed = [*TEXTS[:-1], ("Name a colour", "Red")]
    assert _replay_features(tiny_proxy_dir, _examples(changed), reuse=True)[2:] == (len(TEXTS) - 1, 1)
    # Another --max-tokens: the truncated rows hold other token ids; a row that fits is the same row.
    _, tokenizer, _ = _load(tiny_proxy_dir)
    lengths = [len(e) for e in encode_examples(tokenizer, _examples(), 64)]
    short = sorted(lengths)[1]
    fits = sum(n <= short for n in lengths)
    assert _replay_features(tiny_proxy_dir, _examples(), reuse=True, max_tokens=short)[2:] == (
        fits, len(TEXTS) - fits)


def test_bf16_replay_reuses_a_bf16_pass_only(tiny_proxy_dir):
    """The accelerator path (bf16 proxy, float32 trainable blocks under autocast), exercised on the CPU: the prefix
    a bf16 loss pass keeps is what a bf16 replay computes, and a float32 replay does not take it."""
    _store_loss_pass(tiny_proxy_dir, _examples(), dtype=torch.bfloat16)
    assert _replay_features(tiny_proxy_dir, _examples(), reuse=True)[2:] == (0, len(TEXTS))
    feats, losses, reused, _ = _replay_features(tiny_proxy_dir, _examples(), reuse=True, dtype=torch.bfloat16)
    ref_feats, ref_losses, _, _ = _replay_features(tiny_proxy_dir, _examples(), reuse=False, dtype=torch.bfloat16)
    assert reused == len(TEXTS)
    torch.testing.assert_close(losses, ref_losses, atol=2e-2, rtol=2e-2)  # bf16 compute: its own rounding
    torch.testing.assert_close(feats, ref_feats, atol=2e-2, rtol=2e-2)


def test_a_store_is_complete_or_absent(tiny_proxy_dir, tmp_path):
    key = PrefixKey("m", "torch.float32", "cpu", 1, 2)
    writer = PrefixWriter(key, tmp_path)
    writer.put([1, 2, 3], torch.ones(3, 4))
    assert len(StoredPrefixes(key, tmp_path)) == 0  # not renamed into place yet: invisible
    writer.abandon()
    assert list(tmp_path.iterdir()) == []
    for i in range(ps.KEEP_STORES + 1):
        writer = PrefixWriter(key, tmp_path)
        writer.put([i], torch.full((1, 4), float(i)))
        writer.finish()
    stores = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(stores) == ps.KEEP_STORES  # the oldest went
    stored = StoredPrefixes(key, tmp_path)
    assert [0] not in stored and [ps.KEEP_STORES] in stored
    assert stored.get([ps.KEEP_STORES]).tolist() == [[float(ps.KEEP_STORES)] * 4]
    stored.close()


def test_a_full_disk_gives_the_store_up(tmp_path, monkeypatch):
    key = PrefixKey("m", "torch.float32", "cpu", 1, 2)
    writer = PrefixWriter(key, tmp_path)
    monkeypatch.setattr(ps, "DISK_RESERVE", 1 << 62)
    writer.put([1], torch.ones(1, 4))
    assert writer.finish() is None and list(tmp_path.iterdir()) == []


def test_training_step_projects_nothing_and_trains_the_same(tiny_proxy_dir):
    def step(with_projector: bool):
        torch.manual_seed(0)
        _, tokenizer, model = _load(tiny_proxy_dir)
        encoded = dict(enumerate(encode_examples(tokenizer, _examples(), 64)))
        split = SplitProxy(model, N_TOP)
        cache = PrefixCache(split, encoded, tokenizer.pad_token_id, torch.device("cpu"))
        optimizer = torch.optim.AdamW(split.parameters, lr=1e-2)
        projector = GradientProjector(model, split.linears, 64, seed=3)
        train_step(split, cache, optimizer, list(encoded), projector if with_projector else None)
        if with_projector:
            with pytest.raises(RuntimeError, match="no forward pass with gradients"):
                projector.features()  # the step's forward captured nothing
            row_features(split, cache, projector, [0, 1])  # and the hooks are back for the features
        projector.close()
        return [p.detach().clone() for p in split.parameters]

    for a, b in zip(step(True), step(False), strict=True):
        assert torch.equal(a, b)


def test_feature_passes_compute_no_weight_gradient(tiny_proxy_dir):
    _, tokenizer, model = _load(tiny_proxy_dir)
    encoded = dict(enumerate(encode_examples(tokenizer, _examples(), 64)))
    split = SplitProxy(model, N_TOP)
    cache = PrefixCache(split, encoded, tokenizer.pad_token_id, torch.device("cpu"))
    seen: list[bool] = []
    hook = split.linears[0].register_forward_hook(lambda m, a, o: seen.append(m.weight.requires_grad))
    with GradientProjector(model, split.linears, 64, seed=3) as projector:
        row_features(split, cache, projector, list(encoded))
    hook.remove()
    assert seen and not any(seen)  # frozen while the features ran ...
    assert all(p.requires_grad and p.grad is None for p in split.parameters)  # ... trainable again after


def test_stratify_keeps_the_prefix_and_select_chooses_the_same_rows(tmp_path: Path, tiny_encoder_dir: Path,
                                                                    tiny_proxy_dir: Path, slap_cache_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    rows = [{"instruction": f"Say {i} in words", "output": f"number {i} " * (1 + i % 4)} for i in range(30)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    emb, strata = tmp_path / "e.parquet", tmp_path / "s.parquet"
    embed(str(data), str(emb), EmbedConfig(embed_model=str(tiny_encoder_dir), proxy_model=str(tiny_proxy_dir),
                                           device="cpu"), QUIET)
    # No near-copies: they skip the loss pass (and its store) and may come back to fill the budget.
    stratify(str(emb), str(strata), StratifyConfig(proxy_model=str(tiny_proxy_dir), clusters=2, keep=0.5,
                                                   near_dup_cosine=0, device="cpu"), QUIET)
    stores = [p for p in (slap_cache_dir / "prefix").iterdir() if not p.name.startswith(".")]
    assert len(stores) == 1  # the pass with the prompt kept its prefix; the prompt-free one did not
    counts: list[tuple[int, int]] = []
    close = PrefixCache.close
    monkeypatch.setattr(PrefixCache, "close", lambda self: (counts.append((self.reused, self.computed)), close(self)))
    config = SelectConfig(method="slap", proxy_model=str(tiny_proxy_dir), device="cpu", proj_dim=64)
    select(str(strata), str(tmp_path / "a.parquet"), config, QUIET)
    for f in stores[0].iterdir():
        f.unlink()
    stores[0].rmdir()
    select(str(strata), str(tmp_path / "b.parquet"), config, QUIET)
    assert counts[0][0] > 0 and counts[0][1] == 0  # every row the replay offered came from the store ...
    assert counts[1][0] == 0 and counts[1][1] == counts[0][0]  # ... and ran the frozen bottom without it
    a, b = (pq.read_table(tmp_path / n).to_pydict() for n in ("a.parquet", "b.parquet"))
    assert a["row"] == b["row"]
