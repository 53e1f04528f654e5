"""Settings of the process: how many threads a command computes with (`--threads`) and where its big scratch files
go (`--cache-dir`). No artifact records them, so a rerun with other values reuses the artifacts. The scratch
folder never changes a byte; the thread count may change the last bits of the proxy's losses (measured: 3 of 100
rows' losses moved by under 1e-5 between 1 and 2 threads, docs/PERFORMANCE.md), so runs that must give the same
bytes use the same `--threads`. Embeddings came out identical.

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


def apply(config: RuntimeConfig) -> None:
    """Set this process's threads and scratch folder; call before the stage's modules are imported.

    Without --threads the libraries keep their own count (torch: one per physical core, or OMP_NUM_THREADS): a
    default that followed the machine's load would have been faster on a busy machine (docs/PERFORMANCE.md) but
    would make the proxy's losses, and so stratify's bytes, depend on the load at the start.
    """
    global _scratch
    if config.threads is not None:
        for name in THREAD_VARIABLES:
            os.environ[name] = str(config.threads)
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(config.threads)
        threadpool_limits(config.threads)  # pools already loaded (their variables were read before we set them)
    if config.cache_dir is not None:
        os.makedirs(config.cache_dir, exist_ok=True)
        _scratch = os.path.abspath(config.cache_dir)
        tempfile.tempdir = _scratch  # every anonymous spool (stdin copies, export's buffers) goes there too


def chosen_cache_dir() -> str | None:
    """--cache-dir of this command, None when not given."""
    return _scratch


def scratch_dir(beside: str) -> str:
    """Where a big scratch file of the command writing `beside` goes: --cache-dir, else the output's folder (the
    disk the user chose for big files)."""
    return _scratch or os.path.dirname(os.path.abspath(beside))


def reset() -> None:
    """Back to the default places (tests run many commands in one process)."""
    global _scratch
    _scratch = None
    tempfile.tempdir = None
