"""The pure math of SLAP (METHOD.md stages 2.4 and 3.2-3.6), kept free of I/O and models.

Budget allocation over strata, factored random projection of per-row Linear-layer gradients,
a diagonal curvature estimate, relative-distance diversity, and the greedy batch composition that
maximises the second-order batch utility

    U(B) = eta * <g*, m_B> - eta^2/2 * m_B^T diag(h) m_B + gamma * D(B),   m_B = mean of members' features.

Every piece has a from-scratch reference in tests/test_slapmath.py; the fast paths here must agree with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from slapcli.budgets import ALLOCATIONS

# Floor for a typical nearest-neighbour distance: a stratum of exact duplicates would otherwise divide by 0.
MIN_SCALE = 1e-6


# ---------------------------------------------------------------------------------------------- budget


def allocate_budget(sizes: np.ndarray, budget: int, method: str = "waterfill") -> np.ndarray:
    """Split `budget` rows over strata of the given sizes; returns int64 allocations.

    Always 0 <= alloc <= size and alloc.sum() == min(budget, sizes.sum()), deterministically.
    `waterfill` (Coverage-centric Coreset Selection) protects rare strata: equal shares, a stratum smaller
    than its share keeps all its rows and the rest is shared again; the integer remainder goes one row each
    to the strata with the most rows left (ties: lower index), since those lose most to an equal split.
    `proportional` and `sqrt` first give every non-empty stratum one row when the budget allows it (so no
    stratum vanishes, as under waterfill), then split the rest with weights size resp. sqrt(size), capped at
    size with the excess shared again, rounded by largest remainder (ties: lower index).
    """
    if method not in ALLOCATIONS:
        raise ValueError(f"unknown allocation method {method!r}; expected one of {', '.join(ALLOCATIONS)}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.ndim != 1 or (sizes < 0).any():
        raise ValueError("sizes must be a 1-D array of non-negative counts")
    budget = min(int(budget), int(sizes.sum()))
    if budget == 0:
        return np.zeros(len(sizes), dtype=np.int64)
    if method == "waterfill":
        return _waterfill(sizes, budget)
    nonempty = sizes > 0
    base = nonempty.astype(np.int64) if budget >= int(nonempty.sum()) else np.zeros_like(sizes)
    weights = sizes.astype(np.float64) if method == "proportional" else np.sqrt(sizes.astype(np.float64))
    return base + _capped_share(weights, sizes - base, budget - int(base.sum()))


def stratified_sample(stratum: np.ndarray, eligible: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A fixed reference sample: rows spread over strata in proportion to their size."""
    sizes = np.bincount(stratum[eligible], minlength=int(stratum.max()) + 1)
    take = allocate_budget(sizes, n, "proportional")
    picks = []
    for s in np.flatnonzero(take).tolist():
        members = np.flatnonzero(eligible & (stratum == s))
        picks.extend(rng.choice(members, size=int(take[s]), replace=False).tolist())
    return np.sort(np.array(picks, dtype=np.int64))


def _waterfill(sizes: np.ndarray, budget: int) -> np.ndarray:
    # The largest level L with sum(min(size, L)) <= budget; the sum is monotone in L, so bisect.
    lo, hi = 0, int(sizes.max())
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(np.minimum(sizes, mid).sum()) <= budget:
            lo = mid
        else:
            hi = mid - 1
    alloc = np.minimum(sizes, lo)
    rest = budget - int(alloc.sum())
    # rest < #strata above L, because level L + 1 would overshoot the budget.
    open_ = np.flatnonzero(sizes > lo)
    order = open_[np.lexsort((open_, -sizes[open_]))]
    alloc[order[:rest]] += 1
    return alloc


def _capped_share(weights: np.ndarray, cap: np.ndarray, total: int) -> np.ndarray:
    """Share `total` in proportion to `weights`, never above `cap`; capped strata release their excess."""
    alloc = np.zeros_like(cap)
    active = (cap > 0) & (weights > 0)
    left = total
    quota = np.zeros(len(cap))
    while left > 0 and active.any():
        quota = np.zeros(len(cap))
        quota[active] = left * weights[active] / weights[active].sum()
        full = active & (quota >= cap)
        if not full.any():
            break
        alloc[full] = cap[full]
        left -= int(cap[full].sum())
        active &= ~full
    if left > 0:
        # Every active quota is < its integer cap, so floor + 1 still fits.
        idx = np.flatnonzero(active)
        floors = np.floor(quota[idx]).astype(np.int64)
        frac = quota[idx] - floors
        alloc[idx] += floors
        order = idx[np.lexsort((idx, -frac))]
        extra = left - int(floors.sum())
        if extra >= 0:
            alloc[order[:extra]] += 1
        else:
            # Only reachable if float rounding pushed a near-integer quota one over; undo at the smallest
            # fractions so the total stays exact.
            alloc[order[::-1][:-extra]] -= 1
    return alloc


# ------------------------------------------------------------------------------------------ projection


def make_layer_projection(out_features: int, in_features: int, k_out: int, k_in: int, seed: int,
                          dtype: torch.dtype = torch.float32,
                          device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """Seeded Gaussian sketches A (k_out x out) and B (k_in x in), scaled so E||A v||^2 = ||v||^2.

    Drawn on the CPU from a private generator, so the projection depends on the seed alone: not on the
    global RNG, the device, or what ran before. Then cast and moved.
    """
    if min(out_features, in_features, k_out, k_in) < 1:
        raise ValueError("all dimensions of a layer projection must be >= 1")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    a = torch.randn(k_out, out_features, generator=gen, dtype=torch.float64) / math.sqrt(k_out)
    b = torch.randn(k_in, in_features, generator=gen, dtype=torch.float64) / math.sqrt(k_in)
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def _project_tokens(x: Tensor, m: Tensor) -> Tensor:
    # The sketch follows the activations (a no-op when already there), so a model moved after the
    # projector was built still works. In the sketch's dtype even under autocast (a bf16 proxy): the forward
    # hook runs inside it, the gradient hook outside, and both halves of a feature must agree.
    with torch.autocast(device_type=x.device.type, enabled=False):
        return x.to(m.dtype) @ m.to(x.device).T


def _kron_features(a: Tensor, b: Tensor, token_mask: Tensor | None) -> Tensor:
    """sum_t a_t ⊗ b_t per row, i.e. row-major vec(A G B^T) = kron(A, B) @ vec(G)."""
    if a.dim() == 2:  # a Linear applied to [B, in] has one "token" per row
        a, b = a.unsqueeze(1), b.unsqueeze(1)
    if token_mask is not None:
        keep = token_mask.to(device=a.device, dtype=torch.bool).reshape(a.shape[0], a.shape[1], 1)
        # where() on both factors, not a multiply: a padded position may hold NaN (a fully masked
        # attention row), and 0 * NaN would leak into the sum.
        a = torch.where(keep, a, torch.zeros((), dtype=a.dtype, device=a.device))
        b = torch.where(keep, b, torch.zeros((), dtype=b.dtype, device=b.device))
    return torch.bmm(a.transpose(1, 2), b).reshape(a.shape[0], -1)


def project_linear_grads(inputs: Tensor, grad_outputs: Tensor, A: Tensor, B_: Tensor,
                         token_mask: Tensor | None = None) -> Tensor:
    """Per-row vec(A G B^T), G = sum_t delta_t x_t^T the row's weight gradient, without forming G.

    inputs [B, T, in], grad_outputs [B, T, out] -> [B, k_out * k_in] in A's dtype. Cost is O(T (out k_out +
    in k_in + k_out k_in)) per row instead of O(T out in). Masked tokens contribute nothing; the bias
    gradient is left out (it is a small part of the layer and would need its own sketch).
    """
    if inputs.shape[:-1] != grad_outputs.shape[:-1]:
        raise ValueError(f"inputs {tuple(inputs.shape)} and grad_outputs {tuple(grad_outputs.shape)} differ")
    if inputs.shape[-1] != B_.shape[1] or grad_outputs.shape[-1] != A.shape[1]:
        raise ValueError("projection matrices do not match the layer's in/out features")
    return _kron_features(_project_tokens(grad_outputs, A), _project_tokens(inputs, B_), token_mask)


def split_projection_dim(total_dim: int, n_layers: int) -> list[tuple[int, int]]:
    """(k_out, k_in) per layer, k_out <= k_in, with sum k_out * k_in <= total_dim and as close as can be.

    Square-ish on purpose: a 1 x k sketch would squeeze the whole output side of a layer into one random
    direction. So k_out only ranges over [sqrt(d)/2, sqrt(d)] for a layer share d, which loses < sqrt(d).
    """
    if n_layers < 1 or total_dim < n_layers:
        raise ValueError(f"need n_layers >= 1 and total_dim >= n_layers, got {total_dim}, {n_layers}")
    out = []
    for layer in range(n_layers):
        d = total_dim // n_layers + (1 if layer < total_dim % n_layers else 0)
        top = math.isqrt(d)
        best = max(range(max(1, top // 2), top + 1), key=lambda k, d=d: (k * (d // k), k))
        out.append((best, d // best))
    return out


@dataclass
class _Capture:
    b: Tensor  # B x_t per token, projected at forward time so the raw activations are not kept
    a: Tensor | None = None  # A delta_t per token, filled by the output's gradient hook


class GradientProjector:
    """Per-row projected gradients of chosen Linear layers, from one batched backward pass.

    Usage: `with GradientProjector(model, layers, 4096) as p: loss.backward(); feats = p.features(mask)`.
    The loss the caller backpropagates must be the SUM of the rows' own losses (not a batch mean, and no
    cross-row ops such as batch norm), so delta_t of each row is that row's own gradient and rows do not mix.
    `token_mask` should mark real (non-padding) tokens, NOT only the loss tokens: prompt tokens carry
    gradient too, through attention. Features are float32 whatever the model's dtype (bf16 included), as
    the sketches are float32 and activations are cast before projecting. Per-layer sketch sizes come from
    `split_projection_dim`, clamped to the layer's own out/in features (a larger sketch adds no rank), so
    `dim <= total_dim`. Not for use with activation checkpointing (the forward would be captured twice).
    """

    def __init__(self, model: nn.Module, layers: Sequence[nn.Linear | str], total_dim: int,
                 seed: int = 0) -> None:
        named = dict(model.named_modules())
        self.layers: list[nn.Linear] = []
        for layer in layers:
            mod = named.get(layer) if isinstance(layer, str) else layer
            if not isinstance(mod, nn.Linear):
                raise ValueError(f"{layer!r} is not a torch.nn.Linear of the model")
            self.layers.append(mod)
        self._sketches: list[tuple[Tensor, Tensor]] = []
        for i, (lin, (k_out, k_in)) in enumerate(zip(self.layers, split_projection_dim(total_dim, len(layers)),
                                                      strict=True)):
            # Distinct seeds per layer, so two layers of equal shape get independent sketches.
            self._sketches.append(make_layer_projection(
                lin.out_features, lin.in_features, min(k_out, lin.out_features), min(k_in, lin.in_features),
                seed=seed * 1_000_003 + i, device=lin.weight.device))
        self.layer_dims = [a.shape[0] * b.shape[0] for a, b in self._sketches]
        self.dim = sum(self.layer_dims)
        self._captures: list[list[_Capture]] = [[] for _ in self.layers]
        self._handles = [lin.register_forward_hook(self._hook(i)) for i, lin in enumerate(self.layers)]

    def _hook(self, idx: int) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        a_mat, b_mat = self._sketches[idx]

        def forward_hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            if not (torch.is_grad_enabled() and output.requires_grad):
                return  # an inference pass: no gradient will come, keep nothing
            with torch.no_grad():
                cap = _Capture(b=_project_tokens(args[0].detach(), b_mat))
            self._captures[idx].append(cap)

            def grad_hook(grad: Tensor) -> None:
                with torch.no_grad():
                    cap.a = _project_tokens(grad.detach(), a_mat)

            output.register_hook(grad_hook)

        return forward_hook

    def features(self, token_mask: Tensor | None = None) -> Tensor:
        """[B, dim] float32 features of the last forward+backward, then forget them (ready for the next)."""
        if not any(self._captures):
            raise RuntimeError("no forward pass with gradients was captured")
        parts = []
        for idx, caps in enumerate(self._captures):
            if not caps or any(c.a is None for c in caps):
                raise RuntimeError(f"no gradient reached layer {idx}; call loss.backward() before features()")
            # A layer called several times in one forward (shared weights) sums its calls' gradients.
            parts.append(sum(_kron_features(c.a, c.b, token_mask) for c in caps))
        self.reset()
        return torch.cat(parts, dim=1)

    def reset(self) -> None:
        """Drop captured activations, e.g. after a forward pass whose gradients will not be used."""
        self._captures = [[] for _ in self.layers]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.reset()

    def __enter__(self) -> GradientProjector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------- curvature


@dataclass(frozen=True)
class CurvatureState:
    """Running sum of squared features: a diagonal empirical-Fisher / Gauss-Newton estimate."""

    sum_sq: Tensor
    count: int = 0

    @classmethod
    def empty(cls, dim: int, dtype: torch.dtype = torch.float64,
              device: str | torch.device = "cpu") -> CurvatureState:
        # float64 by default: the sum runs over the whole selection, float32 would lose the late rows.
        return cls(torch.zeros(dim, dtype=dtype, device=device), 0)


def update_curvature(state: CurvatureState, features: Tensor) -> CurvatureState:
    """A new state that also counts these rows (the mean of g^2 is over every row ever seen)."""
    f = features.to(dtype=state.sum_sq.dtype, device=state.sum_sq.device)
    return CurvatureState(state.sum_sq + f.pow(2).sum(0), state.count + f.shape[0])


def curvature_diagonal(state: CurvatureState, damping: float) -> Tensor:
    """mean(g^2) + damping * mean over dims of mean(g^2).

    Damping is relative so one setting works whatever the feature scale (it depends on the model, the
    layers and the sketch size); before any update, or if all features were 0, the scale is taken as 1,
    so the result is always > 0.
    """
    if damping <= 0:
        raise ValueError(f"damping must be > 0, got {damping}")
    mean = state.sum_sq / max(state.count, 1)
    level = float(mean.mean()) if state.count > 0 and mean.numel() > 0 else 0.0
    return mean + damping * (level if level > 0 else 1.0)


FEATURE_NORMS = ("unit", "tokens", "raw")
ETA_RULES = ("target", "row")  # how the batch score's step size is set (score_step)


def calibrated_eta(pool_feats: Tensor, target: Tensor, h: Tensor) -> float:
    """The step size in feature units at which the pool's typical candidate gains most.

    The proxy's AdamW learning rate has no meaning in the units of projected features, so the score's eta is
    the (lower) median over candidates of the Newton step <g*, g> / g^T H g (positive ones only): at that step the
    curvature term is half the first-order term, so both matter.
    """
    align = pool_feats @ target
    quad = pool_feats.pow(2) @ h
    ratios = align[(align > 0) & (quad > 0)] / quad[(align > 0) & (quad > 0)]
    return float(ratios.median()) if len(ratios) else 1.0


def target_newton_eta(target: Tensor, h: Tensor) -> float:
    """The Newton step along g* itself, <g*, g*> / g*^T H g* (1 when undefined).

    With this eta, U(B) = eta <g*, m> - eta^2/2 m^T H m peaks where the batch mean m equals H^-1 g* / eta, which
    for a flat H is g* itself: the best batch is one whose mean gradient stands for the target, not one that
    exaggerates its dominant direction. (The per-candidate median of `calibrated_eta` is smaller, so it rewards
    batches of rows that all point the same way: measured worse, see docs/RESULTS_clean300.md.)
    """
    quad = float(target.pow(2) @ h)
    return float(target @ target) / quad if quad > 0 else 1.0


def single_scores(pool_feats: Tensor, target: Tensor, h: Tensor, eta: float) -> Tensor:
    """Each candidate's batch score alone, U({g}) = eta <g*, g> - eta^2/2 g^T diag(h) g, per row of `pool_feats`."""
    return eta * (pool_feats @ target) - 0.5 * eta**2 * (pool_feats.pow(2) @ h)


def score_unit(singles: Tensor) -> float:
    """The pool's score spread (std of its single scores; 1 when they do not vary): the unit in which the
    diversity weight and the length prior are given, so they mean the same at any scale of the features."""
    spread = float(singles.std()) if len(singles) > 1 else 0.0
    return spread if spread > 0 else 1.0


def score_step(rule: str, pool_feats: Tensor, target: Tensor, h: Tensor) -> float:
    """The eta of the batch score under `--eta`: "target" (Newton step along g*) or "row" (median per-row)."""
    if rule == "target":
        return target_newton_eta(target, h)
    if rule == "row":
        return calibrated_eta(pool_feats, target, h)
    raise ValueError(f"eta rule must be one of {ETA_RULES}, got {rule!r}")


def normalize_features(features: Tensor, mode: str, response_tokens: Tensor | None = None,
                       reference_tokens: float = 1.0) -> Tensor:
    """Per-row gradient features as the score sees them: "raw", "unit" (each row scaled to norm 1), or
    "tokens" (the unit direction scaled by sqrt(response_tokens / reference_tokens)).

    Why "unit": a row's loss is the MEAN over its response tokens, so a short response's gradient is
    dominated by a few tokens every row shares (the end-of-turn token) and has a much larger norm; with raw
    features the inner product with the target rewards that norm and the selection drifts to one-line
    answers. Scoring directions instead of magnitudes (cosine, as LESS does for the same reason) removes the
    length bias.
    Why "tokens": a unit direction throws away how much evidence stands behind it. A row's gradient is the
    mean of its n response tokens' gradients, so its direction is measured with a signal-to-noise ratio that
    grows like sqrt(n): a 200-token answer says sqrt(20) times more surely where training should go than a
    10-token one. Weighting each direction by sqrt(n / n_ref) (n_ref: a fixed typical count, so the scale
    does not drift between calls) lets the score count that evidence without the EOS-norm bias of "raw".
    All-zero rows stay zero.
    """
    if mode == "raw":
        return features
    if mode not in FEATURE_NORMS:
        raise ValueError(f"feature normalisation must be one of {FEATURE_NORMS}, got {mode!r}")
    norms = features.norm(dim=1, keepdim=True)
    unit = features / torch.where(norms > 0, norms, torch.ones_like(norms))
    if mode == "unit":
        return unit
    if response_tokens is None or response_tokens.shape != (features.shape[0],):
        raise ValueError("feature normalisation 'tokens' needs one response-token count per row")
    if reference_tokens <= 0:
        raise ValueError(f"reference_tokens must be > 0, got {reference_tokens}")
    weight = (response_tokens.to(unit.dtype).clamp_min(0) / reference_tokens).sqrt()
    return unit * weight.to(unit.device).unsqueeze(1)


# ------------------------------------------------------------------------------------------- diversity


def stratum_nn_scale(embeddings: np.ndarray, strata: np.ndarray, max_per_stratum: int = 512,
                     seed: int = 0) -> dict[int, float]:
    """Median nearest-neighbour Euclidean distance inside each stratum: how dense its region is.

    Dividing by it makes "far apart" mean the same in a dense cluster and a sparse one. Exact on at most
    `max_per_stratum` rows per stratum, sampled with a generator seeded by (seed, stratum), so one
    stratum's scale does not change when other strata do. A one-row stratum has no neighbour: it gets the
    median of the other strata's scales (1.0 if there are none). Rows labelled < 0 are ignored (callers mark
    ineligible rows so instead of copying the eligible ones). Only the sampled rows are copied, so a
    million-row input costs no second copy of itself; the Gram product runs in float32 (the squared norms
    in float64), half the time of float64 for a median that needs no more precision.
    """
    strata = np.asarray(strata)
    if embeddings.ndim != 2 or strata.shape != (embeddings.shape[0],):
        raise ValueError("embeddings must be [n, d] and strata [n]")
    scales: dict[int, float] = {}
    singles = []
    for label, idx in group_positions(strata).items():
        if label < 0:
            continue
        if len(idx) < 2:
            singles.append(label)
            continue
        if len(idx) > max_per_stratum:
            rng = np.random.default_rng([seed, label % 2**32])
            idx = np.sort(rng.choice(idx, size=max_per_stratum, replace=False))
        x = np.asarray(embeddings[idx], dtype=np.float32)
        sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
        np.fill_diagonal(d2, np.inf)
        scales[label] = max(float(np.median(np.sqrt(d2.min(1)))), MIN_SCALE)
    fallback = float(np.median(list(scales.values()))) if scales else 1.0
    scales.update({label: fallback for label in singles})
    return scales


def group_positions(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Label -> ascending positions holding it; one stable sort instead of a full scan per label."""
    order = np.argsort(labels, kind="stable")
    values, starts = np.unique(labels[order], return_index=True)
    return {int(v): part for v, part in zip(values, np.split(order, starts[1:]), strict=True)}


def farthest_point_order(points: np.ndarray, k: int, first: int, batch: int = 128) -> tuple[list[int], list[float]]:
    """Greedy k-center: start at `first`, then repeatedly take the row farthest from all taken rows.

    Returns the picked indices and, for each, its Euclidean distance to the nearest row taken before it
    (inf for the first). Exact (same picks as the one-at-a-time greedy, barring float ties), but lazily
    batched so the cost is matrix-matrix products rather than one memory-bound matrix-vector product per
    pick (a 1M-row selection would otherwise stream ~2 TB through memory):

    each round takes the `batch` rows with the largest current distance as candidates. Rows outside the
    candidate set can only have shrunk since, so they are bounded by tau, the largest distance outside the
    set. Inside the set, picks continue one at a time on the candidates' exact distances (kept up to date
    from the candidates' own pairwise distances) while the best candidate still beats tau; the first pick of
    a round is the global argmax, so every round makes progress. Then all rows are updated at once with the
    round's picks.
    """
    n = points.shape[0]
    k = min(k, n)
    if k == 0:
        return [], []
    x = np.ascontiguousarray(points, dtype=np.float32)
    sq = np.einsum("ij,ij->i", x, x)

    def sq_dist(rows: np.ndarray, centres: np.ndarray) -> np.ndarray:
        # |p - q|^2 = |p|^2 + |q|^2 - 2 p.q, in float64 from the float32 product: ties in the picks stay rare.
        prod = (x[rows] if rows is not None else x) @ x[centres].T
        left = sq[rows] if rows is not None else sq
        return np.maximum(left[:, None].astype(np.float64) + sq[centres][None, :] - 2.0 * prod, 0.0)

    nearest = sq_dist(None, np.array([first]))[:, 0]
    nearest[first] = -1.0  # taken rows are never the farthest
    picks, gaps = [first], [math.inf]
    while len(picks) < k:
        untaken = n - len(picks)
        top = np.argmax(nearest)
        if untaken > batch:
            split = n - batch - 1
            part = np.argpartition(nearest, split)
            candidates = np.union1d(part[split + 1:], [top])  # ascending: argmax ties go to the lower index
            tau = float(nearest[part[split]])
        else:
            candidates = np.flatnonzero(nearest >= 0.0)
            tau = -math.inf
        values = nearest[candidates].copy()
        pair = sq_dist(candidates, candidates)
        taken_now: list[int] = []
        j = int(np.searchsorted(candidates, top))
        while True:
            taken_now.append(int(candidates[j]))
            gaps.append(math.sqrt(values[j]))
            np.minimum(values, pair[j], out=values)
            values[j] = -1.0
            if len(picks) + len(taken_now) == k:
                break
            j = int(np.argmax(values))
            if values[j] <= tau or values[j] < 0.0:
                break
        picks.extend(taken_now)
        if len(picks) < k:
            taken_idx = np.array(taken_now)
            np.minimum(nearest, sq_dist(None, taken_idx).min(axis=1), out=nearest)
            nearest[taken_idx] = -1.0
    return picks, gaps


def _pairwise(x: Tensor, y: Tensor) -> Tensor:
    # Direct differences, not the Gram trick: an exact duplicate must come out at distance 0, not ~1e-4.
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")


def relative_diversity(member_emb: Tensor, member_scale: Tensor, clip: float = 2.0) -> float:
    """D(B) = mean over members of min(nn_dist_i / scale_i, clip), nn to the nearest OTHER member.

    Clipped because an isolated outlier has an unbounded ratio and would otherwise buy a whole batch of
    near-duplicates; past `clip` typical distances, being farther earns nothing. One member is "typical"
    (1.0) and none is 0.0, so the first pick of a batch is not judged on diversity.
    """
    s = member_emb.shape[0]
    if s < 2:
        return float(s)
    d = _pairwise(member_emb, member_emb)
    d.fill_diagonal_(float("inf"))
    ratio = d.min(1).values / member_scale.to(d.dtype).clamp_min(MIN_SCALE)
    return float(ratio.clamp(max=clip).mean())


# ------------------------------------------------------------------------------------ batch composition


def batch_utility(features_B: Tensor, target: Tensor, h: Tensor, eta: float, gamma: float, emb_B: Tensor,
                  scale_B: Tensor, clip: float = 2.0, content_B: Tensor | None = None) -> dict[str, float]:
    """U(B) from scratch, split into its terms; `curvature` is the positive eta^2/2 m^T H m that is subtracted,
    `content` the mean of the members' (already weighted) per-row content values, when given.

    The reference for `greedy_batch`; U of the empty batch is 0.
    """
    if features_B.shape[0] == 0:
        return {"first_order": 0.0, "curvature": 0.0, "diversity": 0.0, "content": 0.0, "total": 0.0}
    m = features_B.mean(0)
    first = eta * float(target @ m)
    curv = 0.5 * eta**2 * float((h * m * m).sum())
    div = gamma * relative_diversity(emb_B, scale_B, clip)
    content = float(content_B.mean()) if content_B is not None else 0.0
    return {"first_order": first, "curvature": curv, "diversity": div, "content": content,
            "total": first - curv + div + content}


@dataclass
class GreedyResult:
    """Chosen pool indices in the order added; per pick its marginal gain = first_order - curvature +
    diversity + content (each the change of that term of U), and the final batch's terms in `totals`.
    `candidate_gains` (only if asked for) holds each step's gains over the whole pool, -inf where taken."""

    chosen: list[int] = field(default_factory=list)
    gains: list[float] = field(default_factory=list)
    first_order: list[float] = field(default_factory=list)
    curvature: list[float] = field(default_factory=list)
    diversity: list[float] = field(default_factory=list)
    content: list[float] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=dict)
    candidate_gains: list[Tensor] = field(default_factory=list)


def greedy_batch(pool_features: Tensor, target: Tensor, h: Tensor, eta: float, gamma: float,
                 pool_emb: Tensor, pool_scale: Tensor, batch_size: int, clip: float = 2.0,
                 keep_candidate_gains: bool = False, groups: Tensor | None = None,
                 group_caps: Tensor | None = None, content: Tensor | None = None) -> GreedyResult:
    """Grow a batch one candidate at a time by the largest marginal gain of U (ties: lowest index).

    With `groups` (a group id per candidate, e.g. its stratum) and `group_caps` (indexed by group id), at
    most group_caps[g] candidates of group g are taken: the pool may offer a stratum more candidates than
    its remaining budget, so that the scores, not the draw, decide which of them are kept. The batch stops
    early when every remaining candidate's group is full. With `content` (a value per candidate), U also counts
    the mean content of the members (`content` in the result).

    Each step scores the whole pool in closed form, O(n (D + |B|)): with S the members' feature sum,
    m' = (S + g_j) / (s + 1), so <g*, m'> needs <g*, g_j>, and m'^T H m' needs S^T H S, g_j^T H S and the
    precomputed g_j^T H g_j. Diversity uses the pool x members distance matrix and the members' current
    nearest-neighbour distances, since adding j can also bring an existing member's neighbour closer.
    """
    n, dim = pool_features.shape
    if target.shape != (dim,) or h.shape != (dim,) or pool_emb.shape[0] != n or pool_scale.shape != (n,):
        raise ValueError("pool_features [n, D], target [D], h [D], pool_emb [n, d], pool_scale [n] mismatch")
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    if content is not None and content.shape != (n,):
        raise ValueError("content must hold one value per candidate")
    g, dt = pool_features, pool_features.dtype
    c_val = content.to(dt) if content is not None else torch.zeros(n, dtype=dt, device=g.device)
    c_sum = 0.0
    emb = pool_emb.to(dt)
    scale = pool_scale.to(dt).clamp_min(MIN_SCALE)
    hg = g * h.to(dt)
    t_dot = g @ target.to(dt)
    q_self = (hg * g).sum(1)
    k = min(batch_size, n)
    dist = torch.empty(n, k, dtype=dt, device=g.device)
    member_nn = torch.empty(0, dtype=dt, device=g.device)
    s_sum = torch.zeros(dim, dtype=dt, device=g.device)
    taken = torch.zeros(n, dtype=torch.bool, device=g.device)
    room = group_caps.clone().to(torch.long) if group_caps is not None else None
    prev_first = prev_curv = prev_div = prev_content = 0.0
    result = GreedyResult()
    for step in range(k):
        s1 = step + 1
        first = eta * (float(target.to(dt) @ s_sum) + t_dot) / s1
        curv = 0.5 * eta**2 * (float(s_sum @ (h.to(dt) * s_sum)) + 2.0 * (hg @ s_sum) + q_self) / s1**2
        if step == 0:
            div = torch.ones(n, dtype=dt, device=g.device)
        else:
            d = dist[:, :step]
            members = result.chosen
            own = (d.min(1).values / scale).clamp(max=clip)
            others = (torch.minimum(d, member_nn) / scale[members]).clamp(max=clip).sum(1)
            div = (own + others) / s1
        mean_content = (c_sum + c_val) / s1
        d_first, d_curv, d_div = first - prev_first, curv - prev_curv, gamma * (div - prev_div)
        d_content = mean_content - prev_content
        blocked = taken if room is None or groups is None else taken | (room[groups] <= 0)
        if bool(blocked.all()):
            break
        gain = (d_first - d_curv + d_div + d_content).masked_fill(blocked, float("-inf"))
        j = int(torch.argmax(gain))  # first maximum -> lowest index on ties
        if keep_candidate_gains:
            result.candidate_gains.append(gain.clone())
        result.chosen.append(j)
        result.gains.append(float(gain[j]))
        result.first_order.append(float(d_first[j]))
        result.curvature.append(float(d_curv[j]))
        result.diversity.append(float(d_div[j]))
        result.content.append(float(d_content[j]))
        prev_first, prev_curv, prev_div = float(first[j]), float(curv[j]), float(div[j])
        prev_content = float(mean_content[j])
        c_sum += float(c_val[j])
        taken[j] = True
        if room is not None and groups is not None:
            room[groups[j]] -= 1
        s_sum = s_sum + g[j]
        dist[:, step] = _pairwise(emb, emb[j:j + 1]).squeeze(1)
        new_nn = dist[j, :step].min() if step else torch.tensor(float("inf"), dtype=dt, device=g.device)
        member_nn = torch.cat([torch.minimum(member_nn, dist[j, :step]), new_nn.reshape(1)])
    result.totals = {"first_order": prev_first, "curvature": prev_curv, "diversity": gamma * prev_div,
                     "content": prev_content, "total": prev_first - prev_curv + gamma * prev_div + prev_content}
    return result
