"""`slap` as the benchmarks run it: whole subprocesses (timed, with their stderr kept), cached on disk with a
timing record beside each output, and the rows a selection artifact keeps; for the cost benchmarks, a subprocess's
wall, CPU and peak memory (`run_stage`), a cold slapcli cache and a folder's bytes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from benchlib.report import git
from slapcli.models import cache_dir


def slap_executable() -> str:
    # The `slap` next to this interpreter, so the venv's editable install is measured, not some other copy.
    beside = Path(sys.executable).parent / "slap"
    return str(beside) if beside.exists() else "slap"


def run_slap(args: list[str], log_path: Path) -> dict[str, Any]:
    """Wall and CPU seconds of one whole `slap` subprocess (start, imports, model loading and I/O included)."""
    command = [slap_executable(), *args]
    load_before = os.getloadavg()[0]
    with log_path.open("wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"`{' '.join(command)}` exited with {code}:\n{tail}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "load_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)], "command": command}


def available_methods() -> list[str]:
    """The methods `slap select --method` takes, in its help's order: the method registry the CLI reads (the help
    itself now gives each method a line, which no longer parses as one list)."""
    from slapcli.methods.registry import method_names

    return list(method_names())


def cached_stage(name: str, args: list[str], output: Path, workdir: Path) -> dict[str, Any]:
    """Run a stage unless its output and timing record exist (a complete output is renamed into place)."""
    record = output.with_name(output.name + ".timing.json")
    if output.exists() and record.exists():
        t = json.loads(record.read_text())
        if "slapcli" not in t:  # a record from before versions were kept: the last commit before the stage started
            started = int(output.stat().st_mtime - t["wall_s"])
            t["slapcli"] = git("log", "-1", f"--before=@{started}", "--format=%h", "--", "slapcli") + "(by start time)"
        return {**t, "cached": True}
    force = ["--force"] if output.exists() else []
    version = slapcli_version()  # the code the subprocess imports is the code there when it starts
    t = run_slap([*args, *force], workdir / "logs" / f"{name}.stderr.txt")
    t.update(finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), slapcli=version)
    record.write_text(json.dumps(t, indent=2) + "\n")
    return {**t, "cached": False}


def slapcli_version() -> str:
    """The last commit touching slapcli/, plus "+dirty" when slapcli/ has uncommitted changes."""
    dirty = "+dirty" if git("status", "--short", "--", "slapcli") else ""
    return git("log", "-1", "--format=%h", "--", "slapcli") + dirty


def kept_rows(selection: Path) -> np.ndarray:
    """The training rows a selection artifact keeps, sorted."""
    table = pq.read_table(selection, columns=["row", "kept"])
    rows, kept = table["row"].to_numpy(), table["kept"].to_numpy(zero_copy_only=False)
    return np.sort(rows[kept.astype(bool)]).astype(np.int64)


@dataclass
class StageTime:
    stage: str
    wall_s: float
    cpu_s: float  # user + sys of the subprocess: less sensitive than wall time to other load on a shared machine
    max_rss_mib: float
    load_1m: tuple[float, float]  # load average before and after: how busy the shared machine was
    command: list[str]


# Peak RSS must be read in a slim parent: Linux carries the parent's RSS high-water mark into a child's
# ru_maxrss across fork + exec, so children of this torch-laden process all read >= its ~850 MiB. The launcher
# (a bare interpreter, ~10 MiB) forks the command, waits for it, and writes the command's own ru_maxrss (KiB).
_LAUNCHER = """import os, signal, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_stage(stage: str, args: list[str], log_dir: Path, executable: str | None = None,
              env: dict[str, str] | None = None) -> StageTime:
    """Wall time, CPU time and peak memory of one whole `slap` (or `executable`) subprocess."""
    command = [executable or slap_executable(), *args]
    log = log_dir / f"{stage}.stderr.txt"
    rss_file = log_dir / f"{stage}.maxrss_kib"
    load_before = os.getloadavg()[0]
    with log.open("wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(rss_file), *command],
                                stdout=subprocess.DEVNULL, stderr=err,
                                env=None if env is None else {**os.environ, **env})
        # The launcher's rusage from wait4 includes the command it waited for (CPU seconds of both).
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise SystemExit(f"`{' '.join(command)}` exited with {proc.returncode}:\n{tail}")
    return StageTime(stage, round(wall, 3), round(usage.ru_utime + usage.ru_stime, 3),
                     round(int(rss_file.read_text()) / 1024, 1),
                     (round(load_before, 2), round(os.getloadavg()[0], 2)), command)


def cold_cache(folder: Path) -> Path:
    """A new, empty slapcli cache whose model conversions (`gguf/`) are the user's own, linked."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    converted = cache_dir() / "gguf"
    if converted.is_dir():
        (folder / "gguf").symlink_to(converted, target_is_directory=True)
    return folder


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0
