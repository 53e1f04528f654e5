"""Every selection method, what it needs, and where its code lives: the one list `select`, the CLI and the docs read.

Light on purpose (no numpy, no torch): `slap --help` lists the methods from here, and a method's module is imported
only when it runs. Adding a method is one file under `slapcli/methods/` with a top-level function
`(SelectionJob) -> MethodResult` (see `slapcli.methods.base`) and one line in `REGISTRY` (README: "Adding a method").
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from slapcli.methods.base import Method


@dataclass(frozen=True)
class Needs:
    """What a method reads besides the strata table, so `select` and `run` can check and prepare it up front."""

    embeddings: bool = False  # the sentence embeddings the strata were made from
    proxy_losses: bool = False  # stratify's proxy-loss column (refused on strata made with --no-proxy-loss)
    proxy: bool = False  # loads the proxy model itself (a loss or training pass of its own)
    target: Literal["ignored", "optional", "required"] = "ignored"  # a --target dev file
    # Honours stratify's damage screen and near-duplicate labels. The published baselines choose over every row
    # that is not an exact duplicate (or a --prune-hardest row), as published, so they stay the yardstick the
    # screen is measured against.
    screened: bool = False
    target_budgets: bool = False  # with a --target, the strata budgets follow the dev rows (select.target_budgets)


@dataclass(frozen=True)
class MethodEntry:
    name: str
    implementation: str  # "module:function", imported when the method runs
    summary: str  # one line for `--method`'s help and the docs
    needs: Needs = Needs()

    def load(self) -> Method:
        module, _, attribute = self.implementation.partition(":")
        return getattr(importlib.import_module(module), attribute)


# In the order `--method` lists them; the first is the default.
REGISTRY: tuple[MethodEntry, ...] = (
    MethodEntry("slap", "slapcli.methods.slap:select_slap",
                "proxy-training replay: batches by predicted drop of the target loss plus diversity",
                Needs(embeddings=True, proxy_losses=True, proxy=True, target="optional", screened=True,
                      target_budgets=True)),
    MethodEntry("embedding", "slapcli.methods.simple:select_embedding",
                "the strata and relative-distance diversity, no proxy (for very large data)",
                Needs(embeddings=True, screened=True)),
    MethodEntry("stratified", "slapcli.methods.simple:select_stratified",
                "uniform random rows inside each stratum, up to its budget", Needs(screened=True)),
    MethodEntry("random", "slapcli.methods.simple:select_random", "uniform random rows, strata ignored (the floor)"),
    MethodEntry("nearest", "slapcli.methods.baselines:select_nearest",
                "the rows nearest to the --target dev rows in embedding space",
                Needs(embeddings=True, target="required")),
    MethodEntry("ccs", "slapcli.methods.baselines:select_ccs",
                "coverage-centric coreset selection over proxy-loss bins (Zheng et al. 2023)",
                Needs(proxy_losses=True)),
    MethodEntry("kcenter", "slapcli.methods.baselines:select_kcenter", "greedy k-center on the embeddings",
                Needs(embeddings=True)),
    MethodEntry("loss", "slapcli.methods.baselines:select_loss", "the middle of the proxy-loss ranking",
                Needs(proxy_losses=True)),
    MethodEntry("ifd", "slapcli.methods.baselines:select_ifd",
                "instruction-following difficulty, highest first (Li et al. 2024)",
                Needs(proxy_losses=True, proxy=True)),
)
_BY_NAME = {entry.name: entry for entry in REGISTRY}


def method_names() -> tuple[str, ...]:
    return tuple(_BY_NAME)


def method_entry(name: str) -> MethodEntry:
    """The registry entry of `name`; a KeyError names the known methods."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"--method must be one of {', '.join(_BY_NAME)}") from None


def methods_where(**needs: object) -> tuple[str, ...]:
    """Names of the methods whose needs have these values, e.g. `methods_where(proxy_losses=True)`."""
    return tuple(e.name for e in REGISTRY if all(getattr(e.needs, k) == v for k, v in needs.items()))


def methods_help() -> str:
    """`--method`'s help: one line per method."""
    return "; ".join(f"{e.name}: {e.summary}" for e in REGISTRY)
