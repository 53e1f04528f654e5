"""The four commands end to end with the REAL default models (all-MiniLM-L6-v2, SmolLM2-135M-Instruct GGUF).

Slow (the GGUF conversion alone takes ~25 s once): run only these with `pytest -m integration`, skip them
with `pytest -m "not integration"`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from slapcli.artifacts import read_meta
from slapcli.cli import app

pytestmark = pytest.mark.integration

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "mixed_400.jsonl"
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On a small machine shared with other jobs, two busy-waiting intra-op threads run the 135M proxy 2x
    slower than one (measured on 2 loaded cores); restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SLAP_CACHE_DIR for the whole module, so the GGUF proxy is converted once, not once per test."""
    return tmp_path_factory.mktemp("slap-cache-shared")


@pytest.fixture(autouse=True)
def slap_cache_dir(shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Overrides conftest's per-test cache with the module's shared one; the hub stays off."""
    monkeypatch.setenv("SLAP_CACHE_DIR", str(shared_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return shared_cache


def invoke(args: list) -> object:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_four_commands_with_the_default_models(tmp_path, shared_cache):
    lines = SAMPLE.read_bytes().splitlines(keepends=True)[:30]
    data = tmp_path / "data.jsonl"
    data.write_bytes(b"".join(lines))
    emb, strata, sel, out = (tmp_path / n for n in ("e.parquet", "s.parquet", "sel.parquet", "pruned.jsonl"))

    r = invoke(["embed", data, "-o", emb, "-q"])
    assert r.exit_code == 0, r.stderr
    e = pq.read_table(emb)
    assert e.num_rows == 30
    assert e.schema.field("embedding").type.list_size == 384
    assert read_meta(str(emb)).stats["dim"] == 384

    r = invoke(["stratify", emb, "-o", strata, "-q"])
    assert r.exit_code == 0, r.stderr
    assert "GGUF tensors" not in r.stderr  # the first load converts the proxy: transformers' own bar stays off
    s = pq.read_table(strata)
    # No copies among these rows; the damage screen may flag a rare outlier (on these 30 rows it flags one list
    # of "Don't ..." tips as repetitive: its second half is far easier than its first), never many.
    pruned = [p for p in s["pruned"].to_pylist() if p is not None]
    assert set(pruned) <= {"ignores_prompt", "cut_off", "repetitive"} and len(pruned) <= 3
    assert s["direct_loss"].null_count == 0 and s["screen_score"].null_count == 0
    losses = s["loss"].to_pylist()
    assert all(x is not None and math.isfinite(x) and x > 0 for x in losses)
    assert [p for p in (shared_cache / "gguf").iterdir() if p.is_dir()]  # the proxy was converted into our cache

    r = invoke(["select", strata, "-o", sel, "--keep", "0.7", "-q"])
    assert r.exit_code == 0, r.stderr
    meta = read_meta(str(sel))
    assert meta.stats["replay_steps"] > 0
    assert meta.stats["kept"] == 21

    r = invoke(["export", sel, "-o", out, "-q"])
    assert r.exit_code == 0, r.stderr
    kept = out.read_bytes().splitlines(keepends=True)
    assert len(kept) == 21
    positions = [lines.index(line) for line in kept]  # every exported line is an input line, byte for byte
    assert positions == sorted(positions)  # in input order
    table = pq.read_table(sel)
    assert sorted(positions) == sorted(r for r, k in zip(table["row"].to_pylist(), table["kept"].to_pylist(),
                                                         strict=True) if k)
