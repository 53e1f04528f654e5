"""`--engine ray`: the stages' per-chunk work on Ray actors writes the same artifacts as the local engine.

A local Ray with 2 CPUs is started once for the module. Artifacts are compared byte for byte: a worker runs the
same function on the same float32 weights (shipped from here, not loaded again) with one torch thread, as these
tests do here (conftest), so the embeddings and losses are not merely close but equal.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from typer.testing import CliRunner

from slapcli.cli import app
from slapcli.config import EmbedConfig, EngineConfig, StratifyConfig
from slapcli.engine import ENGINES, check_engine
from slapcli.errors import UsageError
from slapcli.progress import Reporter
from slapcli.stages.embed import embed

C = TypeVar("C")
B = TypeVar("B")
R = TypeVar("R")
QUIET = Reporter(quiet=True)
runner = CliRunner()


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    # Functions and classes of this module reach the workers by value: the workers cannot import a test module.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # "local": a Ray of the tests' own, even where a `ray start` cluster runs on this machine (which would be joined).
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def write_rows(path: Path, n: int) -> Path:
    rows = [{"instruction": f"Task {i}: say something about item {i}", "output": "word " * (1 + i % 7)}
            for i in range(n)]
    rows[12] = rows[3]  # an exact duplicate: embedded once inside its chunk, on whichever worker has it
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Counting:
    """Wraps an engine and counts the chunks the stage handed to it."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.chunks = inner, 0

    def map(self, fn: Callable[[C, B], R], context: C, chunks: Iterable[B]) -> Iterator[R]:
        def counted() -> Iterator[B]:
            for chunk in chunks:
                self.chunks += 1
                yield chunk

        return self.inner.map(fn, context, counted())


def test_embed_on_ray_writes_the_local_bytes(ray_local, tmp_path: Path, tiny_encoder_dir: Path,
                                             tiny_proxy_dir: Path):
    from slapcli.ray_engine import RayEngine

    data = write_rows(tmp_path / "data.jsonl", 36)
    config = EmbedConfig(embed_model=str(tiny_encoder_dir), proxy_model=str(tiny_proxy_dir), device="cpu",
                         chunk_rows=8)
    local = tmp_path / "local.parquet"
    embed(str(data), str(local), config, QUIET, engine=ENGINES["local"])
    for workers in (1, 2):
        out = tmp_path / f"ray{workers}.parquet"
        engine = Counting(RayEngine(workers=workers))
        embed(str(data), str(out), config, QUIET, engine=engine)
        assert engine.chunks == 5  # 36 rows in chunks of 8: all of them went to the workers
        assert out.read_bytes() == local.read_bytes()


def test_embed_on_ray_resumes_from_the_chunks_a_killed_run_finished(ray_local, tmp_path: Path,
                                                                   tiny_encoder_dir: Path, tiny_proxy_dir: Path):
    from slapcli.ray_engine import RayEngine

    class DiesAfterTwo:
        def map(self, fn: Callable[[C, B], R], context: C, chunks: Iterable[B]) -> Iterator[R]:
            for done, chunk in enumerate(chunks):
                if done == 2:
                    raise RuntimeError("killed")
                yield fn(context, chunk)

    data = write_rows(tmp_path / "data.jsonl", 36)
    config = EmbedConfig(embed_model=str(tiny_encoder_dir), proxy_model=str(tiny_proxy_dir), device="cpu",
                         chunk_rows=8)
    local, out = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    embed(str(data), str(local), config, QUIET)
    with pytest.raises(RuntimeError, match="killed"):
        embed(str(data), str(out), config, QUIET, engine=DiesAfterTwo())
    engine = Counting(RayEngine(workers=2))
    embed(str(data), str(out), config, QUIET, engine=engine)
    assert engine.chunks == 3  # chunks 0 and 1 came from the killed run's parts
    assert out.read_bytes() == local.read_bytes()


def test_stratify_on_ray_writes_the_local_bytes(ray_local, tmp_path: Path, tiny_encoder_dir: Path,
                                                tiny_proxy_dir: Path, monkeypatch: pytest.MonkeyPatch):
    from slapcli.proxy import passes
    from slapcli.ray_engine import RayEngine
    from slapcli.stages.stratify import stratify

    monkeypatch.setattr(passes, "LOSS_CHUNK_ROWS", 10)  # 3 chunks per pass: both workers get some
    data = write_rows(tmp_path / "data.jsonl", 30)
    embeddings = tmp_path / "e.parquet"
    embed(str(data), str(embeddings),
          EmbedConfig(embed_model=str(tiny_encoder_dir), proxy_model=str(tiny_proxy_dir), device="cpu"), QUIET)
    config = StratifyConfig(proxy_model=str(tiny_proxy_dir), clusters=3, near_dup_cosine=0.0, device="cpu")
    local, on_ray = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    stratify(str(embeddings), str(local), config, QUIET)
    # The loss passes are cached per embeddings file; another cache makes the second run compute them again.
    monkeypatch.setenv("SLAP_CACHE_DIR", str(tmp_path / "other_cache"))
    engine = Counting(RayEngine(workers=2))
    stratify(str(embeddings), str(on_ray), config, QUIET, engine=engine)
    assert engine.chunks == 6  # 29 distinct rows, 10 a chunk, two passes (with and without the prompt)
    assert on_ray.read_bytes() == local.read_bytes()


class Echo:
    """A context for the engine's own tests: the worker's copy says which device it was placed on."""

    def __init__(self, device: str = "here") -> None:
        self.device = device

    def for_worker(self, device: Any) -> Echo:
        return Echo(str(device))


def tag(context: Echo, chunk: int) -> tuple[str, int]:
    return context.device, chunk


def divide(context: Echo, chunk: int) -> float:
    return 1 / chunk


def test_results_in_chunk_order_and_chunks_pulled_lazily(ray_local):
    from slapcli.ray_engine import IN_FLIGHT_PER_WORKER, RayEngine

    pulled: list[int] = []

    def chunks() -> Iterator[int]:
        for i in range(20):
            pulled.append(i)
            yield i

    results = RayEngine(workers=2).map(tag, Echo(), chunks())
    assert next(results) == ("cpu", 0)
    # The stage's stream is read as the workers go, not all at once (it reads the source and skips done chunks).
    assert len(pulled) == IN_FLIGHT_PER_WORKER * 2
    assert list(results) == [("cpu", i) for i in range(1, 20)]


def threads_of(context: Echo, chunk: int) -> int:
    import torch

    return torch.get_num_threads()


def test_a_worker_computes_with_the_command_s_threads(ray_local):
    import torch

    from slapcli.ray_engine import RayEngine

    # Ray alone would give a 1-CPU worker one thread; a proxy loss's last bits depend on the count.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert list(RayEngine().map(threads_of, Echo(), [0, 1])) == [2, 2]  # one worker: 2 of the 2 CPUs
    finally:
        torch.set_num_threads(before)


def test_a_worker_s_error_is_raised_as_it_would_be_here(ray_local):
    from slapcli.ray_engine import RayEngine

    with pytest.raises(ZeroDivisionError):
        list(RayEngine(workers=2).map(divide, Echo(), [1, 2, 0, 4]))


def test_a_worker_that_dies_is_one_line(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("ray")
    from ray.exceptions import OutOfMemoryError

    from slapcli import ray_engine
    from slapcli.errors import SlapError

    def out_of_memory(ref: Any) -> Any:  # what Ray's memory monitor raises when it kills a worker
        raise OutOfMemoryError("2 worker(s) were killed due to the node running low on memory.\nRefer to ...")

    monkeypatch.setattr(ray_engine.ray, "get", out_of_memory)
    with pytest.raises(SlapError) as caught:
        ray_engine.result(object())
    assert str(caught.value) == (
        "a Ray worker died (2 worker(s) were killed due to the node running low on memory.); each worker holds the "
        "models: fewer --workers, or more memory; rerun to continue (embed resumes from the chunks it finished)")


def test_worker_count_fits_the_cluster():
    pytest.importorskip("ray")
    from slapcli.ray_engine import RayEngine

    eight, two_gpus = [{"CPU": 8.0}], [{"CPU": 8.0, "GPU": 2.0}]
    assert RayEngine().worker_count(eight) == 8
    assert RayEngine().worker_count(eight, threads=2) == 4  # a worker reserves the CPUs of its threads
    assert RayEngine().worker_count([{"CPU": 3.0}, {"CPU": 3.0}], threads=2) == 2  # one per node: 2 CPUs left over
    assert RayEngine(num_gpus=1).worker_count(two_gpus) == 2
    assert RayEngine(num_gpus=0.5).worker_count(two_gpus) == 4
    assert RayEngine(workers=3).worker_count(eight) == 3
    with pytest.raises(UsageError, match=r"--workers 9: each needs 1 CPU on one node; the Ray cluster has 8 CPUs and "
                                         r"0 GPUs on 1 node, room for 8$"):
        RayEngine(workers=9).worker_count(eight)
    with pytest.raises(UsageError, match="--workers 3: each needs 1 CPU and 1 GPUs on one node"):
        RayEngine(workers=3, num_gpus=1).worker_count(two_gpus)
    with pytest.raises(UsageError, match=r"a Ray worker needs 1 CPU and 1 GPUs on one node"):
        RayEngine(num_gpus=1).worker_count(eight)
    with pytest.raises(UsageError, match=r"needs 16 CPUs on one node; .* on 2 nodes \(--threads sets a worker's"):
        RayEngine().worker_count([{"CPU": 8.0}, {"CPU": 8.0}], threads=16)


def test_engine_options_are_checked_before_anything_loads(monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(UsageError, match="--workers, --ray-address: only with --engine ray"):
        check_engine(EngineConfig(workers=2, address="auto"))
    with pytest.raises(UsageError, match="--engine must be one of local, ray"):
        check_engine(EngineConfig(engine="spark"))
    import slapcli.engine

    monkeypatch.setattr(slapcli.engine, "find_spec", lambda name: None)  # as without the extra installed
    with pytest.raises(UsageError, match=r"needs Ray, which is not installed: pip install 'slapcli\[ray\]'"):
        check_engine(EngineConfig(engine="ray"))


@pytest.mark.parametrize("args, message", [
    (["--engine", "ray"], "--engine ray needs Ray, which is not installed: pip install 'slapcli[ray]'"),
    (["--workers", "2"], "--workers: only with --engine ray"),
    (["--engine", "ray", "--workers", "0"], "--workers must be >= 1, not 0"),
])
def test_cli_engine_mistakes_are_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      args: list[str], message: str):
    import slapcli.engine

    if "ray" in args and "0" not in args:
        monkeypatch.setattr(slapcli.engine, "find_spec", lambda name: None)
    else:  # the check needs no Ray when the options are wrong anyway
        monkeypatch.setattr(slapcli.engine, "find_spec", lambda name: object())
    data = write_rows(tmp_path / "data.jsonl", 20)
    for command in (["embed", str(data), "-o", str(tmp_path / "e.parquet")],
                    ["run", str(data), "-o", str(tmp_path / "out.jsonl"), "--workdir", str(tmp_path / "w")]):
        result = runner.invoke(app, [*command, *args])
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "e.parquet").exists()


class Elsewhere:
    """An engine that runs each chunk as a worker elsewhere would: on the context's `for_worker` copy (no Ray)."""

    def map(self, fn: Callable[[C, B], R], context: C, chunks: Iterable[B]) -> Iterator[R]:
        import torch

        worker = context.for_worker(torch.device("cpu"))  # type: ignore[attr-defined]
        for chunk in chunks:
            yield fn(worker, chunk)


class RecordingReporter(Reporter):
    """Quiet, but counts what the stage's bars advance."""

    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.advanced = 0.0

    @contextlib.contextmanager
    def progress(self, description: str, total: float | None, unit: str = "rows") -> Iterator[Any]:
        reporter = self

        class Task:
            def update(self, *, advance: float = 0.0, completed: float | None = None,
                       rows_done: int | None = None) -> None:
                reporter.advanced += advance

        yield Task()


def test_a_loss_pass_elsewhere_gives_the_same_terms_and_a_full_bar(tmp_path: Path, tiny_encoder_dir: Path,
                                                                     tiny_proxy_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch):
    import numpy as np

    from slapcli.artifacts import read_meta
    from slapcli.proxy import passes

    monkeypatch.setattr(passes, "LOSS_CHUNK_ROWS", 8)
    data = write_rows(tmp_path / "data.jsonl", 20)
    embeddings = tmp_path / "e.parquet"
    embed(str(data), str(embeddings),
          EmbedConfig(embed_model=str(tiny_encoder_dir), proxy_model=str(tiny_proxy_dir), device="cpu"), QUIET)
    meta = read_meta(str(embeddings), "embeddings")
    wanted = np.arange(20)
    loss_pass = passes.LossPass(str(tiny_proxy_dir), 64, 4, "cpu")
    here, there = RecordingReporter(), RecordingReporter()
    local, _ = passes.proxy_losses(meta, str(data), str(embeddings), wanted, loss_pass, here)
    elsewhere, _ = passes.proxy_losses(meta, str(data), str(embeddings), wanted, loss_pass, there, engine=Elsewhere())
    np.testing.assert_array_equal(elsewhere, local)
    # Locally the bar moves per batch; from a worker, whose hook stayed behind, per chunk: both reach every row.
    assert here.advanced == there.advanced == 20


def test_for_worker_moves_a_copy_and_leaves_the_hooks_here(tmp_path: Path, tiny_encoder_dir: Path,
                                                           tiny_proxy_dir: Path):
    import torch

    from slapcli.models import load_causal_lm, load_encoder, load_tokenizer, resolve_model
    from slapcli.proxy.passes import LossPass, LossWork
    from slapcli.stages.embed import EmbedWork

    cpu, elsewhere = torch.device("cpu"), torch.device("meta")  # "meta": another device, on any machine
    tokenizer, encoder = load_encoder(resolve_model(str(tiny_encoder_dir)), cpu)
    embed_work = EmbedWork(EmbedConfig(), tokenizer, encoder, load_tokenizer(resolve_model(str(tiny_proxy_dir))), cpu,
                           advance=lambda share: None)
    proxy_tokenizer, proxy = load_causal_lm(resolve_model(str(tiny_proxy_dir)), cpu)
    loss_work = LossWork(LossPass(str(tiny_proxy_dir), 64, 4, "cpu"), proxy_tokenizer, proxy, cpu,
                         advance=lambda n: None)
    for work, model, moved_model in ((embed_work, encoder, lambda w: w.encoder), (loss_work, proxy, lambda w: w.model)):
        same = work.for_worker(cpu)
        assert moved_model(same) is model and same.advance is None  # same device: nothing copied
        moved = work.for_worker(elsewhere)
        assert moved.device == elsewhere and moved.advance is None
        assert next(moved_model(moved).parameters()).device == elsewhere
        assert next(model.parameters()).device == cpu  # the driver's model stays where it was




def test_commands_hand_embed_and_the_loss_passes_to_the_engine(tmp_path: Path, tiny_encoder_dir: Path,
                                                               tiny_proxy_dir: Path, monkeypatch: pytest.MonkeyPatch):
    import slapcli.cli
    import slapcli.engine

    engines: list[Counting] = []

    def counting(config: EngineConfig) -> Counting:
        assert config == EngineConfig(engine="ray", workers=3)  # the options, as given
        engines.append(Counting(ENGINES["local"]))
        return engines[-1]

    monkeypatch.setattr(slapcli.engine, "find_spec", lambda name: object())  # as with Ray installed
    monkeypatch.setattr(slapcli.cli, "make_engine", counting)
    data = write_rows(tmp_path / "data.jsonl", 24)
    models = ["--proxy-model", str(tiny_proxy_dir), "-q", "--engine", "ray", "--workers", "3"]
    emb, strata = tmp_path / "e.parquet", tmp_path / "s.parquet"
    for command in (["embed", str(data), "-o", str(emb), "--embed-model", str(tiny_encoder_dir)],
                    ["stratify", str(emb), "-o", str(strata)],
                    ["run", str(data), "-o", str(tmp_path / "out.jsonl"), "--keep", "0.5", "--workdir",
                     str(tmp_path / "w"), "--embed-model", str(tiny_encoder_dir)]):
        monkeypatch.setenv("SLAP_CACHE_DIR", str(tmp_path / f"cache_{command[0]}"))  # no loss pass from a cache
        result = runner.invoke(app, [*command, *models])
        assert result.exit_code == 0, result.output
    # embed: its one chunk; stratify: one chunk per loss pass (with and without the prompt); run: both
    assert [e.chunks for e in engines] == [1, 2, 3]


def test_a_ray_started_here_runs_its_workers_at_normal_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray nices its workers to 15; a Ray the command starts gets RAY_worker_niceness=0 unless the user set it."""
    pytest.importorskip("ray")
    from slapcli import ray_engine

    seen: list[str | None] = []
    monkeypatch.setattr(ray_engine.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_engine.ray, "init", lambda **kw: seen.append(os.environ.get(ray_engine.NICENESS_ENV)))
    monkeypatch.delenv(ray_engine.NICENESS_ENV, raising=False)
    ray_engine.connect("local")
    monkeypatch.setenv(ray_engine.NICENESS_ENV, "7")
    ray_engine.connect("local")
    assert seen == ["0", "7"]
