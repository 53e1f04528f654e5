"""Where a stage's per-chunk work runs.

A stage names its per-chunk work as a top-level function `(context, chunk) -> result` (embed: a chunk of rows to
their embeddings table; the loss passes: a chunk of rows to their loss terms) and hands it, with a stream of chunks,
to an engine, which yields the results in chunk order. The `local` engine runs them here, one after another, as
they are pulled: what the stages always did. Another engine (a process pool, workers over shards) can map the same
functions without touching the stages: it must keep the order and pull chunks lazily (a stage's chunk stream reads
the source as it goes and may skip chunks it has already done).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar

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
