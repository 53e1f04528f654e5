"""The method registry: one list of methods and what each needs, from which select dispatches and the CLI helps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from slapcli.cli import app
from slapcli.config import EmbedConfig, SelectConfig, StratifyConfig
from slapcli.errors import UsageError
from slapcli.methods import registry
from slapcli.methods.base import MethodResult, Selection, SelectionJob
from slapcli.progress import Reporter
from slapcli.stages.embed import embed
from slapcli.stages.select import select
from slapcli.stages.stratify import stratify

QUIET = Reporter(quiet=True)


def test_every_registered_method_loads():
    assert registry.method_names()[0] == SelectConfig.method  # the default comes first
    for entry in registry.REGISTRY:
        assert callable(entry.load()), entry.name


def test_the_needs_say_what_the_stages_rely_on():
    # `run` computes stratify's proxy losses for these (and only these), and select hands the screened rows back
    # to the methods that do not honour the damage screen.
    assert registry.methods_where(proxy_losses=True) == ("slap", "ccs", "loss", "ifd")
    assert registry.methods_where(screened=True) == ("slap", "embedding", "stratified")
    assert registry.methods_where(target="required") == ("nearest",)
    with pytest.raises(KeyError, match="--method must be one of slap, embedding"):
        registry.method_entry("nope")


def test_method_help_lists_the_registry():
    out = CliRunner().invoke(app, ["select", "--help"], env={"COLUMNS": "400"}).output
    assert all(name in out for name in registry.method_names())


def first_rows(job: SelectionJob) -> MethodResult:
    """A method as the README's how-to writes one: the first budget's worth of eligible rows, in order."""
    positions = np.flatnonzero(job.eligible)[:job.m]
    return MethodResult(Selection.plain(positions), {"first_rows": True})


@pytest.fixture()
def strata(tmp_path: Path, tiny_encoder_dir: Path, tiny_proxy_dir: Path) -> Path:
    rows = [{"instruction": f"Say {i} in words", "output": f"number {i} " * (1 + i % 4)} for i in range(30)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    emb, out = tmp_path / "e.parquet", tmp_path / "s.parquet"
    embed(str(data), str(emb), EmbedConfig(embed_model=str(tiny_encoder_dir), proxy_model=str(tiny_proxy_dir),
                                           device="cpu"), QUIET)
    config = StratifyConfig(proxy_loss=False, screen=False, near_dup_cosine=0.0, clusters=3, keep=0.5, device="cpu")
    stratify(str(emb), str(out), config, QUIET)
    return out


def test_a_new_method_is_one_function_and_one_registry_line(strata: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch):
    entry = registry.MethodEntry("first", f"{__name__}:first_rows", "the first rows")
    monkeypatch.setattr(registry, "REGISTRY", (*registry.REGISTRY, entry))
    monkeypatch.setattr(registry, "_BY_NAME", {**registry._BY_NAME, "first": entry})
    out = tmp_path / "sel.parquet"
    meta = select(str(strata), str(out), SelectConfig(method="first", device="cpu"), QUIET)
    table = pq.read_table(out)
    kept = np.flatnonzero(table["kept"].to_numpy())
    assert meta.stats["first_rows"] is True and meta.stats["kept"] == len(kept) == 15
    assert kept.tolist() == list(range(15))  # 30 distinct rows: all eligible, the first 15 taken


def test_a_method_that_needs_a_target_is_refused_without_one(strata: Path, tmp_path: Path):
    with pytest.raises(UsageError, match=r"--method nearest .* give --target FILE"):
        select(str(strata), str(tmp_path / "sel.parquet"), SelectConfig(method="nearest"), QUIET)


def test_run_refuses_a_method_that_needs_a_target_before_any_work(tmp_path: Path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "Q", "output": "A"}) + "\n")
    work = tmp_path / "work"
    r = CliRunner().invoke(app, ["run", str(data), "-o", str(tmp_path / "out.jsonl"), "--method", "nearest",
                                 "--workdir", str(work)])
    assert r.exit_code == 2
    assert "--method nearest needs a --target dev file" in r.output
    assert not work.exists() and not (tmp_path / "out.jsonl").exists()
