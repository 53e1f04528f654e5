"""Settings of the process, not of the result: how many threads a command computes with (`--threads`) and where
its big scratch files go (`--cache-dir`). No artifact records them, so a rerun with other values reuses the
artifacts (the bytes are the same).

Light on purpose: the CLI applies them before a stage module is imported, because the OpenMP and BLAS runtimes
read their thread counts from the environment once, when torch, numpy or faiss first load them.
"""

from __future__ import annotations

import os
import tempfile

from slapcli.config import RuntimeConfig

# The variables the thread pools of torch (OpenMP, MKL), numpy (OpenBLAS) and faiss (OpenMP) read at load time.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

_scratch: str | None = None  # --cache-dir of this process (one command per process), None: the default places


def free_cpus() -> int:
    """The CPUs this process may run on, less those other processes keep busy (the 1-minute load average), at
    least 1. On the shared 2-core machine (load ~12) embed took 39 s with 1 thread and 52 s with 2, and 31% more
    CPU (docs/PERFORMANCE.md): threads that wait for a busy core cost more than they bring."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, cpus - busy)


def apply(config: RuntimeConfig) -> None:
    """Set this process's threads and scratch folder; call before the stage's modules are imported.

    Without --threads: the threads the libraries would take (torch's default, or the OMP_NUM_THREADS the user
    set), lowered to `free_cpus()` when other processes keep some CPUs busy; never raised.
    """
    global _scratch
    threads = config.threads
    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        free = free_cpus()
        threads = free if free < (os.cpu_count() or 1) else None
    if threads is not None:
        for name in THREAD_VARIABLES:
            os.environ[name] = str(threads)
        import torch
        from threadpoolctl import threadpool_limits

        if config.threads is None:  # the measured default only ever lowers what is already set
            threads = min(threads, torch.get_num_threads())
        torch.set_num_threads(threads)
        threadpool_limits(threads)  # pools already loaded (their variables were read before we set them)
    if config.cache_dir is not None:
        os.makedirs(config.cache_dir, exist_ok=True)
        _scratch = os.path.abspath(config.cache_dir)
        tempfile.tempdir = _scratch  # every anonymous spool (stdin copies, export's buffers) goes there too


def scratch_dir(beside: str) -> str:
    """Where a big scratch file of the command writing `beside` goes: --cache-dir, else the output's folder (the
    disk the user chose for big files)."""
    return _scratch or os.path.dirname(os.path.abspath(beside))


def reset() -> None:
    """Back to the default places (tests run many commands in one process)."""
    global _scratch
    _scratch = None
    tempfile.tempdir = None
