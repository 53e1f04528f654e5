"""slapmath against naive references: loops, recomputation from scratch, explicit Kronecker matrices."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slapcli.slapmath import (
    ALLOCATIONS,
    CurvatureState,
    GradientProjector,
    allocate_budget,
    batch_utility,
    curvature_diagonal,
    farthest_point_order,
    greedy_batch,
    group_positions,
    make_layer_projection,
    normalize_features,
    project_linear_grads,
    relative_diversity,
    score_unit,
    single_scores,
    split_projection_dim,
    stratum_nn_scale,
    update_curvature,
)

# ---------------------------------------------------------------------------------------------- budget


def naive_waterfill(sizes: list[int], budget: int) -> np.ndarray:
    """One row at a time to the non-full stratum with the smallest allocation; ties: most rows left, then
    lower index (the remainder rule of allocate_budget)."""
    alloc = [0] * len(sizes)
    for _ in range(min(budget, sum(sizes))):
        open_ = [i for i in range(len(sizes)) if alloc[i] < sizes[i]]
        best = min(open_, key=lambda i: (alloc[i], -(sizes[i] - alloc[i]), i))
        alloc[best] += 1
    return np.array(alloc, dtype=np.int64)


sizes_st = st.lists(st.integers(0, 40), min_size=0, max_size=10)


@settings(max_examples=300, deadline=None)
@given(sizes=sizes_st, budget=st.integers(0, 450), method=st.sampled_from(ALLOCATIONS))
def test_allocation_invariants(sizes: list[int], budget: int, method: str) -> None:
    arr = np.array(sizes, dtype=np.int64)
    alloc = allocate_budget(arr, budget, method)
    assert alloc.dtype == np.int64 and alloc.shape == arr.shape
    assert (alloc >= 0).all() and (alloc <= arr).all()
    assert alloc.sum() == min(budget, arr.sum())
    np.testing.assert_array_equal(alloc, allocate_budget(arr.copy(), budget, method))
    nonempty = arr > 0
    if budget >= nonempty.sum():
        assert (alloc[nonempty] >= 1).all()
    # A larger stratum never gets fewer rows than a smaller one.
    for i, j in itertools.permutations(range(len(sizes)), 2):
        if sizes[i] < sizes[j]:
            assert alloc[i] <= alloc[j]


@settings(max_examples=300, deadline=None)
@given(sizes=sizes_st, budget=st.integers(0, 450))
def test_waterfill_equals_row_by_row(sizes: list[int], budget: int) -> None:
    np.testing.assert_array_equal(allocate_budget(np.array(sizes, dtype=np.int64), budget),
                                  naive_waterfill(sizes, budget))


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 60), min_size=2, max_size=10), data=st.data())
def test_proportional_below_stratum_count_is_largest_remainder(sizes: list[int], data: st.DataObject) -> None:
    budget = data.draw(st.integers(0, len(sizes) - 1))
    alloc = allocate_budget(np.array(sizes), budget, "proportional")
    quota = budget * np.array(sizes) / sum(sizes)
    assert (alloc >= np.floor(quota)).all() and (alloc <= np.ceil(quota)).all()


def test_allocation_examples() -> None:
    np.testing.assert_array_equal(allocate_budget(np.array([2, 10, 10]), 12), [2, 5, 5])
    np.testing.assert_array_equal(allocate_budget(np.array([2, 10, 11]), 13), [2, 5, 6])
    # Ties in the remainder: equal sizes -> lower index first.
    np.testing.assert_array_equal(allocate_budget(np.array([5, 5, 5]), 4), [2, 1, 1])
    np.testing.assert_array_equal(allocate_budget(np.array([100, 300, 600]), 100, "proportional"),
                                  [11, 30, 59])
    np.testing.assert_array_equal(allocate_budget(np.array([1, 10000]), 2, "sqrt"), [1, 1])
    np.testing.assert_array_equal(allocate_budget(np.array([4, 0, 3]), 100), [4, 0, 3])
    assert allocate_budget(np.array([], dtype=np.int64), 5).shape == (0,)
    np.testing.assert_array_equal(allocate_budget(np.array([3, 4]), 0, "sqrt"), [0, 0])


def test_allocation_errors() -> None:
    with pytest.raises(ValueError):
        allocate_budget(np.array([1, 2]), 1, "uniform")
    with pytest.raises(ValueError):
        allocate_budget(np.array([1, 2]), -1)
    with pytest.raises(ValueError):
        allocate_budget(np.array([1, -2]), 1)


# ------------------------------------------------------------------------------------------ projection


def test_projection_is_seeded_and_scaled() -> None:
    torch.manual_seed(1)
    a1, b1 = make_layer_projection(30, 20, 4, 5, seed=7)
    torch.manual_seed(2)
    torch.randn(10)
    a2, b2 = make_layer_projection(30, 20, 4, 5, seed=7)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert a1.shape == (4, 30) and b1.shape == (5, 20) and a1.dtype == torch.float32
    a3, _ = make_layer_projection(30, 20, 4, 5, seed=8)
    assert not torch.equal(a1, a3)
    big, _ = make_layer_projection(50, 2, 400, 1, seed=0, dtype=torch.float64)
    assert abs(float((big**2).sum(0).mean()) - 1.0) < 0.05  # E||A v||^2 = ||v||^2


def test_project_linear_grads_matches_explicit_kron() -> None:
    gen = torch.Generator().manual_seed(0)
    bsz, t, d_in, d_out = 3, 6, 7, 5
    x = torch.randn(bsz, t, d_in, generator=gen, dtype=torch.float64)
    delta = torch.randn(bsz, t, d_out, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5], dtype=torch.bool)
    x[~mask] = float("nan")  # a padded position must not leak, whatever it holds
    a, b = make_layer_projection(d_out, d_in, 3, 4, seed=1, dtype=torch.float64)
    got = project_linear_grads(x, delta, a, b, mask)
    kron = torch.kron(a, b)
    for r in range(bsz):
        grad = torch.zeros(d_out, d_in, dtype=torch.float64)
        for tok in range(t):
            if mask[r, tok]:
                grad += torch.outer(delta[r, tok], x[r, tok])
        torch.testing.assert_close(got[r], kron @ grad.flatten(), atol=1e-12, rtol=1e-10)
    assert got.shape == (bsz, 12)


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 20000), n_layers=st.integers(1, 12))
def test_split_projection_dim(total: int, n_layers: int) -> None:
    if total < n_layers:
        with pytest.raises(ValueError):
            split_projection_dim(total, n_layers)
        return
    split = split_projection_dim(total, n_layers)
    assert len(split) == n_layers
    used = sum(ko * ki for ko, ki in split)
    assert used <= total
    assert used >= total - n_layers * math.isqrt(total // n_layers + 1)
    assert all(1 <= ko <= ki for ko, ki in split)


def test_split_projection_examples() -> None:
    assert split_projection_dim(1024, 1) == [(32, 32)]
    assert split_projection_dim(4096, 2) == [(32, 64), (32, 64)]
    assert sum(ko * ki for ko, ki in split_projection_dim(10, 3)) == 10


class TinyLM(nn.Module):
    """Embedding -> Linear -> tanh -> causal running mean (tokens mix, like attention) -> Linear."""

    def __init__(self, vocab: int = 11, hidden: int = 6, width: int = 9) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.up = nn.Linear(hidden, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(self.up(self.emb(ids)))
        steps = torch.arange(1, ids.shape[1] + 1, dtype=z.dtype).reshape(1, -1, 1)
        return self.head(z.cumsum(1) / steps)


def row_losses(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each row's real tokens: [B]."""
    ce = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    keep = (mask[:, 1:] & mask[:, :-1]).to(ce.dtype)
    return (ce * keep).sum(1) / keep.sum(1)


def reference_features(model: nn.Module, layers: list[nn.Linear], projector: GradientProjector,
                       losses: torch.Tensor) -> torch.Tensor:
    """Per-row autograd gradient of each weight, flattened, times the explicit kron(A, B)."""
    rows = []
    for r in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[r], [lin.weight for lin in layers], retain_graph=True)
        rows.append(torch.cat([torch.kron(a.double(), b.double()) @ gw.double().flatten()
                               for gw, (a, b) in zip(grads, projector._sketches, strict=True)]))
    return torch.stack(rows)


def padded_batch(vocab: int, lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(lengths), max(lengths)), generator=gen)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask


def test_projector_matches_per_row_gradients() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    ids, mask = padded_batch(11, [7, 4, 5, 2], seed=3)
    with GradientProjector(model, [model.up, "head"], total_dim=40, seed=5) as proj:
        assert proj.layer_dims == [min(4, 9) * min(5, 6), 4 * 5] and proj.dim == 40
        losses = row_losses(model(ids), ids, mask)
        want = reference_features(model, proj.layers, proj, losses)
        losses.sum().backward()
        got = proj.features(mask)
    assert got.dtype == torch.float32 and got.shape == (4, 40)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    assert not model.up._forward_hooks  # closed


def test_projector_features_are_float32_for_bf16_model() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    ids, mask = padded_batch(11, [5, 3], seed=2)
    with GradientProjector(model, ["up", "head"], total_dim=40) as proj:
        row_losses(model(ids), ids, mask).sum().backward()
        want = proj.features(mask)
        model.to(torch.bfloat16)
        row_losses(model(ids).float(), ids, mask).sum().backward()
        got = proj.features(mask)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert float(torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)) > 0.95


def test_projector_ignores_inference_and_requires_backward() -> None:
    model = TinyLM()
    ids, mask = padded_batch(11, [3, 3], seed=0)
    proj = GradientProjector(model, ["up"], total_dim=16)
    with torch.no_grad():
        model(ids)
    with pytest.raises(RuntimeError):
        proj.features(mask)
    row_losses(model(ids), ids, mask).sum()
    with pytest.raises(RuntimeError):
        proj.features(mask)
    proj.reset()
    row_losses(model(ids), ids, mask).sum().backward()
    assert proj.features(mask).shape == (2, proj.dim)
    proj.close()
    with pytest.raises(ValueError):
        GradientProjector(model, ["emb"], total_dim=16)


def test_projector_on_tiny_llama() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids, mask = padded_batch(32, [6, 3, 5], seed=1)
    names = ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj", "lm_head"]
    with GradientProjector(model, names, total_dim=60, seed=2) as proj:
        losses = row_losses(model(input_ids=ids, attention_mask=mask.long()).logits, ids, mask)
        want = reference_features(model, proj.layers, proj, losses)
        losses.sum().backward()
        got = proj.features(mask)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------- curvature


def test_curvature_running_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, 5, generator=gen) for n in (3, 1, 7)]
    state = CurvatureState.empty(5)
    h0 = curvature_diagonal(state, 0.1)
    assert (h0 > 0).all()
    for c in chunks:
        state = update_curvature(state, c)
    allrows = torch.cat(chunks).double()
    mean = (allrows**2).mean(0)
    assert state.count == 11
    torch.testing.assert_close(curvature_diagonal(state, 0.1), mean + 0.1 * mean.mean())
    with pytest.raises(ValueError):
        curvature_diagonal(state, 0.0)
    zero = update_curvature(CurvatureState.empty(3), torch.zeros(2, 3))
    assert (curvature_diagonal(zero, 1e-3) > 0).all()


def test_normalize_features_unit_rows_vs_loop() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 5, generator=gen, dtype=torch.float64) * torch.rand(7, 1, generator=gen, dtype=torch.float64)
    x[3] = 0.0  # an all-zero feature (a row with no gradient) must stay zero, not become NaN
    unit = normalize_features(x, "unit")
    for i in range(7):
        norm = math.sqrt(sum(float(v) ** 2 for v in x[i]))
        expected = x[i] / norm if norm > 0 else x[i]
        torch.testing.assert_close(unit[i], expected)
    assert torch.equal(normalize_features(x, "raw"), x)
    # Scoring directions: a row's weight no longer depends on its gradient's length.
    torch.testing.assert_close(normalize_features(x * 9.0, "unit"), unit)
    with pytest.raises(ValueError):
        normalize_features(x, "cosine")


def test_normalize_features_tokens_weighs_directions_by_sqrt_length() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64) * torch.rand(6, 1, generator=gen, dtype=torch.float64)
    x[2] = 0.0
    n = torch.tensor([10, 40, 5, 160, 1, 90])
    out = normalize_features(x, "tokens", n, reference_tokens=40.0)
    for i in range(6):
        norm = math.sqrt(sum(float(v) ** 2 for v in x[i]))
        expected = x[i] / norm * math.sqrt(int(n[i]) / 40.0) if norm > 0 else x[i]
        torch.testing.assert_close(out[i], expected)
    # The gradient's own length still does not count, only the evidence (tokens) behind its direction.
    torch.testing.assert_close(normalize_features(x * 5.0, "tokens", n, 40.0), out)
    with pytest.raises(ValueError):
        normalize_features(x, "tokens")  # the counts are required
    with pytest.raises(ValueError):
        normalize_features(x, "tokens", n, reference_tokens=0.0)


# ------------------------------------------------------------------------------------------- diversity


def naive_nn_median(x: np.ndarray) -> float:
    nn_d = []
    for i in range(len(x)):
        nn_d.append(min(math.dist(x[i], x[j]) for j in range(len(x)) if j != i))
    return max(float(np.median(nn_d)), 1e-6)


def test_stratum_nn_scale_vs_double_loop() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(60, 4)).astype(np.float32)
    strata = rng.integers(0, 4, size=60)
    strata[:3] = 9  # and one single-row stratum
    strata[3] = 7
    emb[10] = emb[11]
    got = stratum_nn_scale(emb, strata)
    multi = {}
    for label in np.unique(strata):
        rows = emb[strata == label].astype(np.float64)
        if len(rows) > 1:
            multi[int(label)] = naive_nn_median(rows)
            assert got[int(label)] == pytest.approx(multi[int(label)], abs=1e-6)
    assert got[7] == pytest.approx(float(np.median(list(multi.values()))))
    # Sampled: deterministic, and a stratum's scale ignores other strata.
    s1 = stratum_nn_scale(emb, strata, max_per_stratum=5, seed=3)
    assert s1 == stratum_nn_scale(emb, strata, max_per_stratum=5, seed=3)
    keep = strata != 9
    assert stratum_nn_scale(emb[keep], strata[keep], max_per_stratum=5, seed=3)[0] == s1[0]
    assert stratum_nn_scale(np.zeros((1, 3), np.float32), np.array([0])) == {0: 1.0}
    assert stratum_nn_scale(np.zeros((4, 3), np.float32), np.zeros(4, int)) == {0: 1e-6}


def naive_relative_diversity(emb: torch.Tensor, scale: torch.Tensor, clip: float) -> float:
    s = len(emb)
    if s < 2:
        return float(s)
    total = 0.0
    for i in range(s):
        nn_d = min(float(torch.linalg.norm(emb[i] - emb[j])) for j in range(s) if j != i)
        total += min(nn_d / float(scale[i]), clip)
    return total / s


def test_relative_diversity() -> None:
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    scale = torch.rand(7, generator=gen, dtype=torch.float64) + 0.3
    for s in range(8):
        assert relative_diversity(emb[:s], scale[:s], 1.5) == pytest.approx(
            naive_relative_diversity(emb[:s], scale[:s], 1.5))
    far = torch.tensor([[0.0, 0.0], [100.0, 0.0]])
    assert relative_diversity(far, torch.ones(2), clip=2.0) == 2.0
    assert relative_diversity(torch.ones(2, 3), torch.ones(2)) == 0.0


# ------------------------------------------------------------------------------------ batch composition


def random_pool(n: int = 40, dim: int = 16, d: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return {"pool_features": r(n, dim), "target": r(dim), "h": r(dim).abs() + 0.1,
            "pool_emb": r(n, d), "pool_scale": torch.rand(n, generator=gen, dtype=torch.float64) + 1.0}


def utility(pool: dict[str, torch.Tensor], members: list[int], eta: float, gamma: float,
            clip: float, content: torch.Tensor | None = None) -> dict[str, float]:
    return batch_utility(pool["pool_features"][members], pool["target"], pool["h"], eta, gamma,
                         pool["pool_emb"][members], pool["pool_scale"][members], clip,
                         None if content is None else content[members])


@pytest.mark.parametrize(("eta", "gamma", "seed", "with_content"),
                         [(0.5, 0.3, 0, False), (1.0, 2.0, 1, True), (0.1, 0.0, 2, False), (2.0, 1.0, 3, True)])
def test_greedy_gains_match_recomputation(eta: float, gamma: float, seed: int, with_content: bool) -> None:
    pool = random_pool(seed=seed)
    content = torch.randn(40, generator=torch.Generator().manual_seed(seed + 50), dtype=torch.float64) \
        if with_content else None
    clip = 1.7
    res = greedy_batch(**pool, eta=eta, gamma=gamma, batch_size=12, clip=clip, keep_candidate_gains=True,
                       content=content)
    naive: list[int] = []
    for step, j in enumerate(res.chosen):
        before = utility(pool, naive, eta, gamma, clip, content)
        gains = []
        for c in range(40):
            after = utility(pool, [*naive, c], eta, gamma, clip, content) if c not in naive else None
            gains.append(-math.inf if after is None else after["total"] - before["total"])
        # Every candidate's vectorised gain, not only the winner's, equals the recomputed one.
        torch.testing.assert_close(res.candidate_gains[step], torch.tensor(gains, dtype=torch.float64),
                                   atol=1e-9, rtol=0)
        best = max(range(40), key=lambda c, g=gains: (g[c], -c))
        assert j == best
        after = utility(pool, [*naive, j], eta, gamma, clip, content)
        assert res.gains[step] == pytest.approx(gains[j], abs=1e-9)
        for key, attr in [("first_order", res.first_order), ("curvature", res.curvature),
                          ("diversity", res.diversity), ("content", res.content)]:
            assert attr[step] == pytest.approx(after[key] - before[key], abs=1e-9)
        naive.append(j)
    final = utility(pool, naive, eta, gamma, clip, content)
    for key, value in final.items():
        assert res.totals[key] == pytest.approx(value, abs=1e-9)


def test_greedy_edge_cases() -> None:
    pool = random_pool(n=5, seed=5)
    res = greedy_batch(**pool, eta=0.3, gamma=0.2, batch_size=9)
    assert sorted(res.chosen) == list(range(5))
    empty = greedy_batch(**pool, eta=0.3, gamma=0.2, batch_size=0)
    assert empty.chosen == [] and empty.totals["total"] == 0.0
    assert len(set(greedy_batch(**pool, eta=0.3, gamma=0.2, batch_size=3).chosen)) == 3
    with pytest.raises(ValueError):
        greedy_batch(**pool, eta=0.3, gamma=0.2, batch_size=-1)


def test_greedy_first_pick_is_best_alignment_for_tiny_eta() -> None:
    pool = random_pool(seed=6)
    res = greedy_batch(**pool, eta=1e-8, gamma=0.0, batch_size=1)
    assert res.chosen[0] == int(torch.argmax(pool["pool_features"] @ pool["target"]))


def test_greedy_ties_go_to_lowest_index() -> None:
    feats = torch.ones(4, 2, dtype=torch.float64)
    res = greedy_batch(feats, torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), 0.1, 0.0,
                       torch.zeros(4, 2, dtype=torch.float64), torch.ones(4, dtype=torch.float64), 4)
    assert res.chosen == [0, 1, 2, 3]


def test_greedy_avoids_exact_duplicate_of_member() -> None:
    # 0 is the best; 1 duplicates it exactly (and aligns a bit better than 2); 2 is near but distinct.
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.99, 0.0], [0.0, -1.0]], dtype=torch.float64)
    emb = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    args = {"pool_features": feats, "target": torch.tensor([1.0, 0.0], dtype=torch.float64),
            "h": torch.ones(2, dtype=torch.float64), "pool_emb": emb,
            "pool_scale": torch.ones(4, dtype=torch.float64), "batch_size": 2, "eta": 0.1}
    assert greedy_batch(**args, gamma=0.0).chosen == [0, 1]
    picked = greedy_batch(**args, gamma=0.5)
    assert picked.chosen == [0, 2]
    assert picked.diversity[1] == pytest.approx(0.0)  # D({0,2}) = 1 = D({0})


def test_greedy_curvature_penalises_redundant_directions() -> None:
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    args = {"pool_features": feats, "target": torch.tensor([1.0, 0.5], dtype=torch.float64),
            "pool_emb": torch.eye(3, dtype=torch.float64), "pool_scale": torch.ones(3, dtype=torch.float64),
            "eta": 0.1, "gamma": 0.0, "batch_size": 2}
    assert greedy_batch(**args, h=torch.full((2,), 1e-3, dtype=torch.float64)).chosen == [0, 1]
    assert greedy_batch(**args, h=torch.full((2,), 1e3, dtype=torch.float64)).chosen[1] == 2


def test_greedy_respects_group_caps_like_a_naive_capped_greedy() -> None:
    pool = random_pool(n=30, seed=7)
    groups = torch.arange(30) % 3
    caps = torch.tensor([1, 3, 0])
    res = greedy_batch(**pool, eta=0.7, gamma=0.5, batch_size=8, groups=groups, group_caps=caps)
    counts = torch.bincount(groups[res.chosen], minlength=3)
    assert counts.tolist() == [1, 3, 0]  # stops early: only 4 rows are allowed in all
    naive: list[int] = []
    while True:
        allowed = [c for c in range(30) if c not in naive
                   and sum(int(groups[m]) == int(groups[c]) for m in naive) < int(caps[groups[c]])]
        if not allowed:
            break
        before = utility(pool, naive, 0.7, 0.5, 2.0)["total"]
        naive.append(max(allowed, key=lambda c: (utility(pool, [*naive, c], 0.7, 0.5, 2.0)["total"] - before, -c)))
    assert res.chosen == naive


def _naive_k_center(points: np.ndarray, k: int, first: int) -> tuple[list[int], list[float]]:
    naive, gaps = [first], [float("inf")]
    while len(naive) < min(k, len(points)):
        dist = [min(float(np.linalg.norm(points[i] - points[j])) for j in naive) if i not in naive else -1.0
                for i in range(len(points))]
        naive.append(int(np.argmax(dist)))
        gaps.append(max(dist))
    return naive, gaps


@pytest.mark.parametrize("n, k, batch", [(30, 10, 128), (30, 30, 2), (57, 40, 3), (80, 79, 7), (64, 20, 1)])
def test_farthest_point_order_matches_naive_k_center(n: int, k: int, batch: int) -> None:
    # Small batches force many lazy rounds, so the tau bound and the round updates are exercised.
    rng = np.random.default_rng(n + k)
    points = rng.normal(size=(n, 6)).astype(np.float32)
    first = int(rng.integers(n))
    picks, gaps = farthest_point_order(points, k, first=first, batch=batch)
    naive, naive_gaps = _naive_k_center(points.astype(np.float64), k, first)
    assert picks == naive
    np.testing.assert_allclose(gaps[1:], naive_gaps[1:], rtol=1e-4)


def test_farthest_point_order_edges() -> None:
    points = np.random.default_rng(0).normal(size=(30, 5))
    assert farthest_point_order(points, 0, first=0) == ([], [])
    assert sorted(farthest_point_order(points, 99, first=0)[0]) == list(range(30))
    # Exact duplicates: every row is still taken once, the duplicates last, at gap ~0 (float32 Gram trick).
    dup = np.repeat(points[:3], 2, axis=0)
    picks, gaps = farthest_point_order(dup, 6, first=0, batch=2)
    assert sorted(picks) == list(range(6)) and max(gaps[3:]) < 1e-2 < min(gaps[1:3])


def test_group_positions_matches_scan() -> None:
    labels = np.random.default_rng(1).integers(0, 9, size=200)
    groups = group_positions(labels)
    assert sorted(groups) == sorted(set(labels.tolist()))
    for label, idx in groups.items():
        np.testing.assert_array_equal(idx, np.flatnonzero(labels == label))


def test_single_scores_are_the_batch_score_of_each_row_alone():
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    target = torch.randn(4, generator=gen, dtype=torch.float64)
    h = torch.rand(4, generator=gen, dtype=torch.float64)
    emb, scale = torch.randn(1, 3, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    singles = single_scores(feats, target, h, 0.7)
    expected = [batch_utility(feats[i:i + 1], target, h, 0.7, 0.0, emb, scale)["total"] for i in range(6)]
    torch.testing.assert_close(singles, torch.tensor(expected, dtype=torch.float64))
    assert score_unit(singles) == pytest.approx(float(torch.tensor(expected).std()))
    assert score_unit(singles[:1]) == 1.0 and score_unit(torch.zeros(3, dtype=torch.float64)) == 1.0

