"""The `ray` engine (`--engine ray`): a stage's per-chunk function on Ray actors, one per worker, across a cluster.

Each worker is an actor that receives the stage's context once (its models, as weights: workers need slapcli
installed, not the model files) and keeps it for the whole pass, then runs the stage's own per-chunk function on
the chunks sent to it. Chunks are pulled from the stage's stream lazily, at most two per worker ahead of the
result the stage waits for (one running, one queued), so the driver reads the source as the workers go and skips
the chunks a killed run finished, as the local engine does; results come back in chunk order, and the stage
writes them exactly as it would have locally: the same function on the same weights gives the same bytes.

Actors rather than Ray Data's `map_batches`: a Dataset is built from a source Ray reads itself (files, a list in
memory), not from a stream the driver pulls as it goes, and the stage's stream holds its resume logic and its
order; a Dataset built per window would load the models again per window.

This module is the only one that imports `ray` (an optional extra, `pip install 'slapcli[ray]'`).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import cycle
from typing import Any, TypeVar

import ray
from ray.exceptions import OutOfMemoryError, RayError, RayTaskError

from slapcli.errors import SlapError, UsageError

C = TypeVar("C")
B = TypeVar("B")
R = TypeVar("R")

IN_FLIGHT_PER_WORKER = 2  # one chunk running, one queued: a worker never waits for the driver to read the source
# Ray runs its workers at niceness 15 (RayConfig worker_niceness) so its own processes stay responsive. In a Ray
# the command starts itself the workers ARE the command's work: at 15 they yield the CPU to every other process,
# and on a machine other jobs keep busy a 3,000-row embed with one worker took 194 s instead of 26 s at 0
# (docs/PERFORMANCE.md). So a Ray started here runs them at the local engine's priority; RAY_worker_niceness set
# by the user wins, and a cluster joined keeps its own setting.
WORKER_NICENESS = "0"
NICENESS_ENV = "RAY_worker_niceness"  # Ray reads its config from RAY_<name>, the name as Ray spells it


class ChunkWorker:
    """One worker: holds the stage's context on its device for the whole pass and maps chunks through `fn`."""

    def __init__(self, fn: Callable[[Any, Any], Any], context: Any, device: str, threads: int) -> None:
        import torch

        # The command's own thread count: a proxy loss's last bits depend on how its sums are split over threads
        # (docs/PERFORMANCE.md, --threads), so the same threads give the local engine's bytes.
        torch.set_num_threads(threads)
        self.fn = fn
        self.context = context.for_worker(torch.device(device))

    def run(self, chunk: Any) -> Any:
        return self.fn(self.context, chunk)


@dataclass(frozen=True)
class RayEngine:
    """Chunks on `workers` Ray actors, results in chunk order. Each runs as many torch threads as the command
    (`--threads`, else torch's default here), reserves as many CPUs, and `num_gpus` GPUs."""

    workers: int | None = None  # None: as many as the cluster's nodes hold
    num_gpus: float = 0.0
    address: str | None = None  # None: ray.init's own choice (RAY_ADDRESS, a running local Ray, else a new one)

    def map(self, fn: Callable[[C, B], R], context: C, chunks: Iterable[B]) -> Iterator[R]:
        import torch

        connect(self.address)
        threads = torch.get_num_threads()
        workers = self.worker_count([node["Resources"] for node in ray.nodes() if node.get("Alive")], threads)
        # The context goes into the object store once, as CPU weights; each worker moves it to its own device.
        shipped = ray.put(context.for_worker(torch.device("cpu")))  # type: ignore[attr-defined]
        actor = ray.remote(ChunkWorker).options(num_cpus=threads, num_gpus=self.num_gpus)
        device = "cuda" if self.num_gpus > 0 else "cpu"
        actors = [actor.remote(fn, shipped, device, threads) for _ in range(workers)]
        try:
            pending: deque[Any] = deque()
            turns = cycle(actors)
            stream = iter(chunks)
            exhausted = False
            while True:
                while not exhausted and len(pending) < IN_FLIGHT_PER_WORKER * workers:
                    try:
                        chunk = next(stream)
                    except StopIteration:
                        exhausted = True
                        break
                    pending.append(next(turns).run.remote(chunk))
                if not pending:
                    return
                yield result(pending.popleft())
        finally:
            for a in actors:
                ray.kill(a)

    def worker_count(self, nodes: list[dict[str, float]], threads: int = 1) -> int:
        """`workers`, or as many as the nodes hold (`threads` CPUs and `num_gpus` GPUs each, on one node); more
        than they hold would wait forever: one line instead."""
        def fits(node: dict[str, float]) -> int:
            by_cpu = int(node.get("CPU", 0) // threads)
            return by_cpu if self.num_gpus <= 0 else min(by_cpu, int(node.get("GPU", 0) // self.num_gpus + 1e-9))

        room = sum(fits(node) for node in nodes)
        cpus, gpus = sum(n.get("CPU", 0) for n in nodes), sum(n.get("GPU", 0) for n in nodes)
        each = f"{threads} CPU{'s' if threads > 1 else ''}" + (f" and {self.num_gpus:g} GPUs" if self.num_gpus else "")
        has = f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs on {len(nodes)} node{'s' if len(nodes) > 1 else ''}"
        hint = " (--threads sets a worker's CPUs)" if threads > 1 else ""
        if self.workers is None:
            if room < 1:
                raise UsageError(f"a Ray worker needs {each} on one node; {has}{hint}")
            return room
        if self.workers > room:
            raise UsageError(f"--workers {self.workers}: each needs {each} on one node; {has}, room for {room}"
                             f"{hint}")
        return self.workers


def connect(address: str | None) -> None:
    """Join the cluster at `address`, or start a local Ray for this process; once per process (later passes reuse
    it, and Ray shuts it down when the process exits). Its own log lines stay off the user's stderr."""
    if ray.is_initialized():
        return
    os.environ.setdefault(NICENESS_ENV, WORKER_NICENESS)  # read only by a Ray this process starts
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR, include_dashboard=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = f"at {address!r}" if address else "(RAY_ADDRESS or a local one)"
        raise SlapError(f"cannot start or reach Ray {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                        ) from None


def result(ref: Any) -> Any:
    """The chunk's result, or the error the stage's function raised on the worker, as it would have raised here."""
    try:
        return ray.get(ref)
    except RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise
    except RayError as e:  # a worker died (killed, out of memory, its node gone): Ray's message is many lines
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "each worker holds the models: fewer --workers, or more memory; " if isinstance(
            e, OutOfMemoryError) else ""
        raise SlapError(f"a Ray worker died ({first}); {hint}rerun to continue (embed resumes from the chunks it "
                        "finished)") from None
