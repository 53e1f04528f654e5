"""The upper-bound benchmark's math (scripts/benchmark_bound.py, scripts/benchlib/influence.py) and the trainer's
schedule and run keys (scripts/benchlib/trainer.py), against naive versions."""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import benchmark_bound as bb
from benchlib.influence import adam_direction, checkpoint_steps
from benchlib.trainer import lr_factor, recipe_key, recipe_of


def test_halves_take_half_of_each_domain_and_are_seeded() -> None:
    domains = ["code"] * 7 + ["general"] * 10 + ["math"] * 1
    a = bb.halves(domains, seed=3)
    d = np.array(domains)
    assert [int(a[d == x].sum()) for x in ("code", "general", "math")] == [3, 5, 0]
    assert np.array_equal(a, bb.halves(domains, seed=3))
    assert not np.array_equal(a, bb.halves(domains, seed=4))


def test_domain_mean_is_the_mean_of_per_domain_means() -> None:
    rng = np.random.default_rng(0)
    losses = rng.random(30)
    domains = np.array(["a"] * 5 + ["b"] * 25)
    where = rng.random(30) < 0.6
    where[0] = where[10] = True
    naive = np.mean([np.mean([x for x, d, w in zip(losses, domains, where, strict=True) if w and d == k])
                     for k in ("a", "b")])
    assert bb.domain_mean(losses, domains, where) == pytest.approx(naive)


def test_top_rows_keeps_the_highest_scores_ties_by_row() -> None:
    scores = np.array([0.5, 2.0, 2.0, -1.0, 0.7])
    assert bb.top_rows(scores, 0.6).tolist() == [1, 2, 4]
    assert bb.top_rows(scores, 0.2).tolist() == [1]


def test_checkpoint_steps_skip_step_zero_and_stay_in_range() -> None:
    assert checkpoint_steps(125, 4) == [1, 42, 83, 124]
    assert checkpoint_steps(3, 10) == [1, 2]
    assert checkpoint_steps(1, 4) == [0]


def test_nearest_neighbour_cosine_matches_a_naive_loop() -> None:
    rng = np.random.default_rng(1)
    e = rng.normal(size=(50, 8)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    naive = [max(float(e[i] @ e[j]) for j in range(50) if j != i) for i in range(50)]
    assert np.allclose(bb.nearest_neighbour_cosine(e), naive, atol=1e-6)


def test_random_subsets_are_seeded_sorted_and_sized() -> None:
    a = bb.random_subset(100, 0.7, 0)
    assert len(a) == 70 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, bb.random_subset(100, 0.7, 0))
    assert not np.array_equal(a, bb.random_subset(100, 0.7, 1))


def test_adam_direction_is_the_scaling_of_adamw_itself() -> None:
    """After some steps, AdamW's next update for gradient g (with zero momentum) is -lr * g / (sqrt(v_hat) + eps),
    v_hat including g; the direction we use is the same scaling with the current v_hat."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    assert torch.equal(adam_direction(opt, params, torch.ones(17)), torch.ones(17))  # no state yet
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    g = torch.randn(17)
    v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in params])
    expected = g / ((v / (1 - 0.999 ** 3)).sqrt() + 1e-8)
    assert torch.allclose(adam_direction(opt, params, g), expected)


def test_lr_factor_warms_up_then_decays_to_zero() -> None:
    total, warm = 100, 10
    values = [lr_factor(s, total, "cosine", warm) for s in range(total)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(b <= a for a, b in itertools.pairwise(values[10:]))
    assert [lr_factor(s, total, "constant", 0) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        lr_factor(0, 10, "linear", 0)


def test_the_default_recipe_keeps_the_run_files_of_earlier_reports() -> None:
    args = argparse.Namespace(epochs=1, batch_size=8, lr=1e-4, train_blocks=2, max_tokens=256, bf16=False,
                              schedule="constant", warmup=0.0)
    assert recipe_of(args) == {"epochs": 1, "batch_size": 8, "lr": 1e-4, "train_blocks": 2, "max_tokens": 256}
    caches = {"train": {"key": "t"}, "heldout": {"key": "h"}}
    cosine = argparse.Namespace(**{**vars(args), "schedule": "cosine", "warmup": 0.05})
    assert recipe_key(args, caches) != recipe_key(cosine, caches)
    # The keys themselves, as the run files of existing workdirs are named: moving the trainer must not rename them.
    assert recipe_key(args, caches) == "eaf01d9ee37e"
    assert recipe_key(argparse.Namespace(**{**vars(cosine), "bf16": True}), caches) == "3352ba377859"


def test_unknown_targets_are_refused() -> None:
    with pytest.raises(SystemExit):
        bb.parse_args(["--targets", "heldout-b"])
    assert bb.parse_args(["--targets", ""]).targets == []
