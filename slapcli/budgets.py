"""How many rows to keep, and how a budget is split over strata (one list of allocations for every stage)."""

from __future__ import annotations

from slapcli.errors import UsageError

ALLOCATIONS = ("waterfill", "proportional", "sqrt")  # slapmath.allocate_budget's methods


def row_budget(n_rows: int, keep: float | None, budget: int | None) -> int:
    """The number of rows to keep, from --budget (rows) or --keep (share of the input rows)."""
    if budget is not None:
        if budget < 0:
            raise UsageError("--budget must be >= 0")
        return min(budget, n_rows)
    if keep is None or not 0.0 <= keep <= 1.0:
        raise UsageError("--keep must be between 0 and 1")
    return round(keep * n_rows)
