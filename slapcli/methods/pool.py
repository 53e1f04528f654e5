"""The replay's candidate pools: strata drawn in proportion to their remaining budgets."""

from __future__ import annotations

from collections import deque

import numpy as np

from slapcli.slapmath import allocate_budget


class StratifiedPool:
    """Candidate pools drawn across strata in proportion to each stratum's remaining budget.

    A stratum offers up to `oversample` times its remaining budget, so the batch scores, not the draw,
    decide which of its rows are kept; the greedy step caps what it takes from each stratum at the
    remaining budget (`greedy_batch(groups=..., group_caps=...)`), so the budgets hold exactly at the end.
    Unchosen candidates the caller wants to `retain` (their cached features are still fresh) go back to the
    front of their stratum's queue and are offered again next step; the others go to the back, so every
    row of a stratum is eventually offered.
    """

    def __init__(self, stratum: np.ndarray, eligible: np.ndarray, budgets: np.ndarray,
                 rng: np.random.Generator, oversample: int = 4) -> None:
        self.stratum = stratum
        self.eligible = eligible
        self.oversample = oversample
        self.remaining = budgets.astype(np.int64).copy()
        order = rng.permutation(len(stratum))
        by_stratum: list[list[int]] = [[] for _ in range(len(budgets))]
        for pos in order[eligible[order]].tolist():
            by_stratum[stratum[pos]].append(pos)
        self.queues = [deque(q) for q in by_stratum]

    @property
    def left(self) -> int:
        return int(self.remaining.sum())

    def draw(self, size: int) -> np.ndarray:
        available = np.array([len(q) for q in self.queues], dtype=np.int64)
        room = np.minimum(available, self.remaining * self.oversample)
        take = allocate_budget(room, min(size, int(room.sum())), "proportional")
        pool: list[int] = []
        for s in np.flatnonzero(take).tolist():
            queue = self.queues[s]
            pool.extend(queue.popleft() for _ in range(int(take[s])))
        return np.array(pool, dtype=np.int64)

    def caps(self, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(group id per candidate, remaining budget per group) for `greedy_batch`."""
        strata, groups = np.unique(self.stratum[candidates], return_inverse=True)
        return groups, self.remaining[strata]

    def settle(self, pool: np.ndarray, chosen: list[int], retain: set[int] | frozenset[int] = frozenset()) -> None:
        """`chosen` are indices into `pool`; unchosen positions in `retain` go to the front of their queue."""
        chosen_set = set(chosen)
        for i, pos in reversed(list(enumerate(pool.tolist()))):
            if i in chosen_set:
                self.remaining[self.stratum[pos]] -= 1
            elif pos in retain:
                self.queues[self.stratum[pos]].appendleft(pos)
            else:
                self.queues[self.stratum[pos]].append(pos)
