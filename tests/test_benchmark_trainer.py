"""The benchmarks' shared trainer (scripts/benchlib/trainer.py) and stages on a tiny random proxy: the prefix cache
holds what the proxy computes, training is seeded and restartable, evaluation is the per-domain mean of row losses,
and the names of cache keys and run files are those existing workdirs hold."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import benchmark_bound as bb
import benchmark_quality as bq
from benchlib.data import read_rows
from benchlib.stages import available_methods
from benchlib.trainer import (
    HiddenCache,
    TopTrainer,
    pad_token,
    prefix_cache_key,
    response_token_counts,
    run_file,
    token_weighted_loss,
    train_and_evaluate,
)

from slapcli.methods.registry import method_names
from slapcli.models import load_causal_lm, resolve_model
from slapcli.proxy import SplitProxy, collate, encode_examples, response_losses


def recipe(**kw: object) -> argparse.Namespace:
    base = dict(epochs=1, batch_size=4, lr=1e-2, train_blocks=1, max_tokens=64, bf16=False, schedule="constant",
                warmup=0.0)
    return argparse.Namespace(**{**base, **kw})


def write_rows(path: Path, n: int, offset: int = 0) -> Path:
    rows = [{"instruction": f"Say something about {i}.", "input": "",
             "output": " ".join(["word"] * (3 + i % 7)) + f" number {i}.", "domain": "code" if i % 3 else "general"}
            for i in range(offset, offset + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def setup(tiny_proxy_dir: Path, tmp_path: Path) -> tuple[TopTrainer, dict[str, HiddenCache], SplitProxy, object]:
    tokenizer, model = load_causal_lm(resolve_model(str(tiny_proxy_dir)), torch.device("cpu"), torch.float32)
    split = SplitProxy(model, 1)
    caches = {}
    for key, n, offset in (("train", 13, 0), ("heldout", 7, 100)):
        data = write_rows(tmp_path / f"{key}.jsonl", n, offset)
        meta = HiddenCache.build(tmp_path / f"prefix_{key}", data, split, tokenizer, 64, f"k-{key}")
        assert not meta["cached"] and meta["rows"] == n
        caches[key] = HiddenCache(tmp_path / f"prefix_{key}")
    return TopTrainer(split, pad_token(tokenizer), recipe()), caches, split, tokenizer


def test_prefix_cache_holds_the_proxys_tokens_and_hidden_states(setup, tmp_path: Path) -> None:
    trainer, caches, split, tokenizer = setup
    examples, domains = read_rows(tmp_path / "train.jsonl")
    encoded = encode_examples(tokenizer, examples, 64)
    cache = caches["train"]
    assert len(cache) == 13 and cache.domains == domains
    for i, e in enumerate(encoded):
        assert cache.example(i).input_ids == e.input_ids and cache.example(i).response_mask == e.response_mask
        alone = split.prefix(collate([e], trainer.pad_id))[0]  # one row, no padding
        assert torch.allclose(torch.from_numpy(np.asarray(cache.hidden[cache.offsets[i]:cache.offsets[i + 1]],
                                                          dtype=np.float32)), alone, atol=2e-2)
    assert response_token_counts(cache).tolist() == [e.n_response_tokens for e in encoded]
    # A batch rebuilt from the cache gives the full model's losses.
    batch, hidden = cache.batch([0, 5, 9], trainer.pad_id)
    with torch.no_grad(), split.top_only(hidden):
        cached = response_losses(split.model, batch)
    with torch.no_grad():
        full = response_losses(split.model, collate([encoded[i] for i in (0, 5, 9)], trainer.pad_id))
    assert torch.allclose(cached, full, atol=1e-2)
    # The same key reuses the cache; another key rebuilds it.
    data = tmp_path / "train.jsonl"
    assert HiddenCache.build(tmp_path / "prefix_train", data, split, tokenizer, 64, "k-train")["cached"]
    assert not HiddenCache.build(tmp_path / "prefix_train", data, split, tokenizer, 64, "other")["cached"]


def test_training_is_seeded_restarts_from_the_pretrained_blocks_and_evaluates_per_domain(setup) -> None:
    trainer, caches, _, _ = setup
    pretrained = train_and_evaluate(trainer, caches, None, None)
    rows = np.array([0, 2, 3, 5, 8, 11, 12])
    one = train_and_evaluate(trainer, caches, rows, 0)
    assert one["steps"] == math.ceil(len(rows) / 4) and one["mean"] != pretrained["mean"]
    assert train_and_evaluate(trainer, caches, rows, 0)["heldout_rows"] == one["heldout_rows"]
    assert train_and_evaluate(trainer, caches, rows, 1)["heldout_rows"] != one["heldout_rows"]
    assert train_and_evaluate(trainer, caches, None, None)["heldout_rows"] == pretrained["heldout_rows"]
    losses, domains = np.array(one["heldout_rows"]), np.array(caches["heldout"].domains)
    per_domain = {d: round(float(losses[domains == d].mean()), 5) for d in ("code", "general")}
    assert one["heldout"] == per_domain
    assert one["mean"] == round(float(np.mean(list(per_domain.values()))), 5)


def test_batches_shuffle_every_epoch_and_cover_every_row(setup) -> None:
    trainer, _, _, _ = setup
    trainer.args = recipe(epochs=2, batch_size=5)
    batches = list(trainer.batches(np.arange(12), np.random.default_rng(0)))
    assert [len(b) for b in batches] == [5, 5, 2, 5, 5, 2] and trainer.total_steps(12) == 6
    first, second = [r for b in batches[:3] for r in b], [r for b in batches[3:] for r in b]
    assert sorted(first) == sorted(second) == list(range(12)) and first != second


def test_cache_keys_and_run_files_keep_their_names(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"a": 1}\n')
    fp = hashlib.blake2b(b'{"a": 1}\n', digest_size=16).hexdigest()
    assert prefix_cache_key(data, "model@abc", 28, 256) == f"{fp}:model@abc:28:256"
    assert run_file(tmp_path, "full", None, "eaf01d9ee37e") == tmp_path / "runs" / "full.eaf01d9ee37e.json"
    assert run_file(tmp_path, "random_k0.70_s2", 1, "x") == tmp_path / "runs" / "random_k0.70_s2_t1.x.json"


def test_the_method_list_is_the_registry() -> None:
    assert available_methods() == list(method_names()) and "random" in available_methods()


def test_the_scripts_share_one_set_of_data_and_recipe_defaults() -> None:
    shared = ("train", "heldout", "domain_field", "on_bad_line", "train_rows", "heldout_per_domain", "code_share",
              "data_seed", "max_tokens", "train_blocks", "epochs", "batch_size", "lr", "schedule", "warmup")
    quality, bound = vars(bq.parse_args([])), vars(bb.parse_args([]))
    assert {k: quality[k] for k in shared} == {k: bound[k] for k in shared}


def test_token_weighted_loss_sums_token_losses_per_domain_then_averages_domains() -> None:
    losses, tokens = [2.0, 1.0, 4.0, 0.5], [1, 3, 2, 2]  # per-row mean losses and response tokens
    domains = ["code", "code", "general", "general"]
    naive_code = (2.0 * 1 + 1.0 * 3) / (1 + 3)  # one 1-token row at 2.0 and three tokens at 1.0
    naive_general = (4.0 * 2 + 0.5 * 2) / 4
    assert token_weighted_loss(losses, tokens, domains) == pytest.approx((naive_code + naive_general) / 2)
    # Equal lengths: the row mean, as evaluate() reports it.
    assert token_weighted_loss(losses, [5] * 4, domains) == pytest.approx((1.5 + 2.25) / 2)
