"""What the benchmarks' reports share: the code and machine measured, spreads over seeds, number formats, the
protocol's sentences about data and schedule, and matplotlib (an optional extra, imported only for a plot)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from benchlib.common import ROOT


def git(*args: str) -> str:
    """Output of a git command in the repository, or "unknown" (no git, no repository)."""
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def code_version() -> dict[str, Any]:
    """The slapcli commit measured, and whether slapcli/ had uncommitted changes (timings follow the code)."""
    return {"commit": git("rev-parse", "HEAD"), "slapcli_changes": git("status", "--short", "--", "slapcli")}


def machine_info() -> dict[str, Any]:
    """One description of the machine for every benchmark's results."""
    import torch
    import transformers

    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
    }


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample sd (0 for one value), min, max and count of a list of losses."""
    v = np.array(values, dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "min": float(v.min()),
            "max": float(v.max()), "n": len(v)}


def paired_rows(diff: Any, trim: int = 3, largest: int = 3) -> dict[str, Any]:
    """Per held-out row differences (subset A minus subset B, lower is better for A) read paired: their mean (the
    difference of the row means), median, how many rows A is lower on, the mean without the `trim` largest each way,
    and the `largest` rows by size, so one row that decides a mean shows up by its index."""
    d = np.asarray(diff, dtype=float)
    ordered = np.sort(d)
    kept = ordered[trim:len(d) - trim] if len(d) > 2 * trim else ordered
    top = np.argsort(-np.abs(d), kind="stable")[:largest]
    return {"mean": float(d.mean()), "median": float(np.median(d)), "lower": int((d < 0).sum()), "rows": len(d),
            "trimmed_mean": float(kept.mean()), "largest": [(int(i), float(d[i])) for i in top]}


def fmt_spread(s: dict[str, float]) -> str:
    """`mean ± sd [min, max]` of a `spread`, the mean alone for one value."""
    if s["n"] == 1:
        return f"{s['mean']:.4f}"
    return f"{s['mean']:.4f} ± {s['sd']:.4f} [{s['min']:.4f}, {s['max']:.4f}]"


def fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def at_keeps(keeps: list[str]) -> str:
    return f"keep {', '.join(keeps)}" if keeps else "no keep ratio"


def schedule_words(config: dict[str, Any]) -> str:
    """The learning-rate schedule of a results file's config, in words (configs before --schedule: constant)."""
    schedule, warmup = config.get("schedule", "constant"), config.get("warmup", 0.0)
    words = "constant rate" if schedule == "constant" else "cosine decay to zero"
    return words + (f" after a linear warmup over {warmup:.0%} of the steps" if warmup else "")


def data_line(d: dict[str, Any]) -> str:
    """The report's description of its data: the shared mix, or the user's files and what was dropped from them."""
    train_mix = ", ".join(f"{v} {k}" for k, v in d["train_per_domain"].items())
    if d.get("kind") != "user":
        return (f"- **Data**: {d['train_rows']} training rows from `../shared/data` ({train_mix}: the natural mix), "
                f"and a disjoint held-out set of {d['heldout_per_domain']} rows per domain; seed {d['seed']}, exact "
                "duplicates and rows with an empty output dropped. Each row has a `domain` field.")
    held = ", ".join(f"{v} {k}" for k, v in d["heldout_by_domain"].items())
    if len(d["sources"]) > 1:
        source = (f"{d['train_rows']} training rows from `{d['sources'][0]}` ({train_mix}) and {d['heldout_rows']} "
                  f"held-out rows from `{d['sources'][1]}` ({held})")
    else:
        source = (f"{d['train_rows']} training rows from `{d['sources'][0]}` ({train_mix}) and a disjoint held-out "
                  f"set split off the same file, {d['heldout_per_domain']} rows per domain ({held})")
    what = {"bad_row": "rows slap cannot use (skipped under `--on-bad-line skip`)", "duplicate": "exact repeats",
            "in_heldout": "rows also in the held-out file"}
    dropped = "; ".join(f"from {name}, " + ", ".join(f"{v} {what.get(k, k)}" for k, v in counts.items() if v)
                        for name, counts in d["dropped"].items() if any(counts.values()))
    return (f"- **Data**: {source}; seed {d['seed']}; domains from the `{d['domain_field']}` field (`all` where "
            f"missing). Dropped before anything ran: {dropped or 'nothing'}.")


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend; ImportError without the optional `bench` extra."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
