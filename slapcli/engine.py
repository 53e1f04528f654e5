"""Where a stage's per-chunk work runs.

A stage names its per-chunk work as a top-level function `(context, chunk) -> result` (embed: a chunk of rows to
their embeddings table; the loss passes: a chunk of rows to their loss terms) and hands it, with a stream of chunks,
to an engine, which yields the results in chunk order. The `local` engine runs them here, one after another, as
they are pulled: what the stages always did. Another engine (a process pool, workers over shards) can map the same
functions without touching the stages: it must keep the order and pull chunks lazily (a stage's chunk stream reads
the source as it goes and may skip chunks it has already done).

An engine that runs chunks in other processes (`ray`, slapcli.ray_engine) sends the context there once per
worker: a context then defines `for_worker(device)`, the context as a worker on that device runs it (its models
moved there, at that device's dtype; progress hooks of this process left behind), and the engine moves the
results' progress here as they come back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from importlib.util import find_spec
from typing import Protocol, TypeVar

from slapcli.config import ENGINE_NAMES, EngineConfig
from slapcli.errors import UsageError

C = TypeVar("C")
B = TypeVar("B")
R = TypeVar("R")


class Engine(Protocol):
    def map(self, fn: Callable[[C, B], R], context: C, chunks: Iterable[B]) -> Iterator[R]: ...


class LocalEngine:
    """Each chunk in this process, in order, when the stage asks for its result."""

    def map(self, fn: Callable[[C, B], R], context: C, chunks: Iterable[B]) -> Iterator[R]:
        for chunk in chunks:
            yield fn(context, chunk)


ENGINES: dict[str, Engine] = {"local": LocalEngine()}

RAY_INSTALL = "pip install 'slapcli[ray]'"


def check_engine(config: EngineConfig) -> None:
    """The engine options as the CLI checks them before anything loads: one line naming the option."""
    if config.engine not in ENGINE_NAMES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINE_NAMES)}, not {config.engine!r}")
    if config.engine == "ray":
        if find_spec("ray") is None:  # looked up, not imported: `import ray` takes seconds
            raise UsageError(f"--engine ray needs Ray, which is not installed: {RAY_INSTALL}")
    else:
        given = [name for name, value in (("--workers", config.workers), ("--num-gpus", config.num_gpus or None),
                                          ("--ray-address", config.address)) if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: only with --engine ray")
    if config.workers is not None and config.workers < 1:
        raise UsageError(f"--workers must be >= 1, not {config.workers}")
    if not 0 <= config.num_gpus < float("inf"):
        raise UsageError(f"--num-gpus must be >= 0, not {config.num_gpus}")


def make_engine(config: EngineConfig) -> Engine:
    """The engine the options name; Ray is imported only here, and only for `--engine ray`."""
    check_engine(config)
    if config.engine == "local":
        return ENGINES["local"]
    from slapcli.ray_engine import RayEngine

    return RayEngine(workers=config.workers, num_gpus=config.num_gpus, address=config.address)
